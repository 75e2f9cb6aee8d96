"""A fake payment provider on 127.0.0.1 that deduplicates by ``Idempotency-Key``, as Stripe does.

The first request with a key creates a charge; every later one with the same
key gets the same charge back.  It counts every request per key, so a test
can tell "seen twice" from "charged twice".
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


class FakeProvider:
    def __init__(self) -> None:
        self.charges: dict[str, str] = {}  # idempotency key -> charge id
        self.created: Counter[str] = Counter()  # idempotency key -> charges created
        self.seen: Counter[str] = Counter()  # idempotency key -> requests
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.app = Starlette(routes=[Route("/charges", self._charge, methods=["POST"])])

    async def _charge(self, request: Request) -> JSONResponse:
        key = request.headers.get("idempotency-key")
        if not key:
            return JSONResponse({"error": "Idempotency-Key required"}, status_code=400)
        await request.json()
        async with self._lock:
            self.seen[key] += 1
            if key not in self.charges:
                self.charges[key] = f"ch_{next(self._ids)}"
                self.created[key] += 1
            return JSONResponse({"charge_id": self.charges[key], "seen": self.seen[key]})
