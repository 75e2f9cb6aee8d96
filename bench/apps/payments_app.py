"""The app bench/payments.py serves: ``uvicorn bench.apps.payments_app:app``."""

from __future__ import annotations

import os

from flowkeeper import FlowKeeper
from flowkeeper.codec import AesGcmCodec

from .payments_workflows import PAYMENT_WORKFLOWS
from .workflows import WORKFLOWS

_key = os.environ.get("BENCH_CODEC_KEY")
fk = FlowKeeper(
    pool_size=int(os.environ.get("FLOWKEEPER_POOL_SIZE", "5")),
    codec=AesGcmCodec([_key]) if _key else None,  # bench/payments.py: the codec's cost
)
for wf in (*WORKFLOWS.values(), *PAYMENT_WORKFLOWS.values()):
    fk.register(wf)

app = fk.asgi()
