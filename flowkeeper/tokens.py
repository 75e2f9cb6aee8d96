"""Approval tokens: a run waits until a person (or a system) completes a URL.

``ctx.create_token`` makes a token: a random id, signed with the app's signing
key so that only URLs this app issued are accepted, and the URL under the
endpoint (``<endpoint>/tokens/<signed id>``) that completes it when POSTed
with a JSON body.  ``ctx.wait_for_token`` suspends the run until then (or the
token's timeout); ``fk.complete_token`` does the same from code.  A token is
completed once; no third-party service is involved.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

from itsdangerous import BadSignature, Signer

from .signing import KeyInput, normalize_keys

_SALT = "flowkeeper.approval-token"


@dataclass(frozen=True, slots=True)
class Token:
    """An approval token, as ``ctx.create_token`` returns it (and replays it).

    A dataclass, not a pydantic model: defining a model class at import would
    cost every ``import flowkeeper`` pydantic's model machinery (~50 ms).
    """

    id: str  # the signed id: what the URL carries and fk.complete_token takes
    name: str
    url: str | None  # None when this process does not know its endpoint URL
    expires_at: datetime | None


class TokenSigner:
    """Issues token ids and checks the ones that come back."""

    def __init__(self, keys: KeyInput, endpoint: str | None) -> None:
        keys_list = normalize_keys(keys)
        # itsdangerous signs with the last key and accepts any: ours sign with the first.
        self._signer = Signer(list(reversed(keys_list)), salt=_SALT)
        self.endpoint = endpoint.rstrip("/") if endpoint else None

    def new(self) -> tuple[str, str]:
        """(raw id, signed id) of a fresh token."""
        raw = secrets.token_urlsafe(24)
        return raw, self._signer.sign(raw).decode()

    def url(self, signed: str) -> str | None:
        return f"{self.endpoint}/tokens/{signed}" if self.endpoint else None

    def raw_id(self, signed: str) -> str | None:
        """The raw id of a signed token id, or None when this app did not sign it."""
        if not isinstance(signed, str) or len(signed) > 200:
            return None
        try:
            return self._signer.unsign(signed).decode()
        except (BadSignature, UnicodeDecodeError, ValueError):
            return None
