"""Encryption at rest: ``FlowKeeper(codec=...)`` seals payloads before they reach Postgres.

Sealed: run inputs and outputs, step inputs and results (ctx.step and
ctx.transaction), and the message and traceback of every error (a run's, a
step's, a failed attempt's, a replay's record of the previous error).  Not
sealed: what flowkeeper itself must read in SQL — names, statuses, due
times, error *types*, patch markers — and event data, which waits match on
inside Postgres (keep secrets out of the fields you match on, or seal them
yourself with :meth:`Codec.encrypt`).  pg_cron dispatch never reads
payloads, so it works unchanged.

A sealed value is stored as a JSON string ``"fk:enc:<token>"`` (the columns
stay valid ``json``); a value without the prefix is read as it is, so
turning a codec on leaves older runs readable.

:class:`AesGcmCodec` (``pip install flowkeeper[encryption]``, built on the
``cryptography`` package) is AES-256-GCM with a random 96-bit nonce per
value and key rotation: several keys, the first encrypts, all decrypt (each
token names its key by an id derived from the key).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

from .errors import CodecKeyError, ConfigurationError, DecryptionError

__all__ = ["AesGcmCodec", "Codec", "CodecKeyError", "DecryptionError", "Sealer"]

PREFIX = "fk:enc:"
_AAD = b"flowkeeper.v1"
_TOKEN = "aesgcm1"
_SEALED_FIELDS = ("message", "traceback")


class Codec(Protocol):
    """What ``FlowKeeper(codec=...)`` takes: bytes in, an ASCII token out, and back."""

    def encrypt(self, plaintext: bytes) -> str: ...

    def decrypt(self, token: str) -> bytes: ...


def _key_bytes(key: bytes | str) -> bytes:
    if isinstance(key, str):
        try:
            raw = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
        except ValueError as exc:
            raise CodecKeyError(
                "An AES-GCM key given as text must be base64 (AesGcmCodec.generate_key() "
                f"makes one): {exc}"
            ) from None
    elif isinstance(key, bytes | bytearray):
        raw = bytes(key)
    else:
        raise CodecKeyError(f"An AES-GCM key is bytes or base64 text, got {type(key).__name__}.")
    if len(raw) not in (16, 24, 32):
        raise CodecKeyError(
            f"An AES-GCM key is 16, 24 or 32 bytes (32 recommended), got {len(raw)} bytes. "
            'Make one with: python -c "from flowkeeper.codec import AesGcmCodec; '
            'print(AesGcmCodec.generate_key())"'
        )
    return raw


class AesGcmCodec:
    """AES-GCM with key rotation: ``AesGcmCodec([new_key, old_key])``.

    Keys are 32 random bytes (or 16/24), as bytes or URL-safe base64 text. The
    first key encrypts; every key decrypts, chosen by the key id in the
    token. To rotate: put the new key first and keep the old ones until no
    live or retained run was written with them.
    """

    def __init__(self, keys: bytes | str | Sequence[bytes | str]) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:  # pragma: no cover - the extra is installed in the test suite
            raise ConfigurationError(
                "AesGcmCodec needs the cryptography package: pip install 'flowkeeper[encryption]'"
            ) from None
        listed = [keys] if isinstance(keys, bytes | bytearray | str) else list(keys)
        if not listed:
            raise CodecKeyError("AesGcmCodec needs at least one key.")
        self._ciphers: dict[str, Any] = {}
        self._first = ""
        for key in listed:
            raw = _key_bytes(key)
            kid = hashlib.sha256(b"flowkeeper.kid" + raw).hexdigest()[:8]
            if kid in self._ciphers:
                raise CodecKeyError("The same AES-GCM key is listed twice.")
            self._ciphers[kid] = AESGCM(raw)
            self._first = self._first or kid

    @staticmethod
    def generate_key() -> str:
        """A new random 256-bit key, as URL-safe base64 text."""
        return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")

    @property
    def key_ids(self) -> list[str]:
        return list(self._ciphers)

    def encrypt(self, plaintext: bytes) -> str:
        nonce = os.urandom(12)
        sealed = self._ciphers[self._first].encrypt(nonce, plaintext, _AAD)
        body = base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")
        return f"{_TOKEN}.{self._first}.{body}"

    def decrypt(self, token: str) -> bytes:
        from cryptography.exceptions import InvalidTag

        try:
            scheme, kid, body = token.split(".", 2)
        except ValueError:
            raise DecryptionError(f"Not an AES-GCM token: {token[:40]!r}...") from None
        if scheme != _TOKEN:
            raise DecryptionError(f"Not an AES-GCM token (scheme {scheme!r}).")
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise DecryptionError(
                f"This value was encrypted with key id {kid}, which is not among the configured "
                f"keys ({', '.join(self._ciphers)}). Add that key back to AesGcmCodec([...]) "
                "(after the new one) to read it."
            )
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            return bytes(cipher.decrypt(raw[:12], raw[12:], _AAD))
        except (InvalidTag, ValueError):
            raise DecryptionError(
                f"A value encrypted with key id {kid} failed to authenticate: it was altered "
                "or truncated in the database, or another key has the same id. It cannot be "
                "read; nothing was changed."
            ) from None


class Sealer:
    """Seals and opens the payloads the store writes and reads (identity without a codec)."""

    def __init__(self, codec: Codec | None) -> None:
        if codec is not None and not (
            callable(getattr(codec, "encrypt", None)) and callable(getattr(codec, "decrypt", None))
        ):
            raise ConfigurationError(
                f"codec= takes an object with encrypt(bytes) -> str and decrypt(str) -> bytes "
                f"(e.g. flowkeeper.codec.AesGcmCodec([key])), got {codec!r}."
            )
        self.codec = codec

    @property
    def on(self) -> bool:
        return self.codec is not None

    # whole JSON values (inputs, outputs) --------------------------------------------------
    def seal_json(self, text: str | None) -> str | None:
        if self.codec is None or text is None:
            return text
        return json.dumps(PREFIX + self.codec.encrypt(text.encode("utf-8", "surrogatepass")))

    def open_json(self, text: str | None) -> str | None:
        if text is None or not text.startswith('"' + PREFIX):
            return text
        token = json.loads(text)[len(PREFIX) :]
        return self._decrypt(token).decode("utf-8", "surrogatepass")

    # error messages inside dicts (a run's error, an event's detail) --------------------------
    def seal_error(self, value: Any) -> Any:
        """A copy with every ``message``/``traceback`` string sealed, at any depth."""
        if self.codec is None:
            return value
        return self._walk(value, self._seal_text)

    def open_error(self, value: Any) -> Any:
        return self._walk(value, self.open_text)

    def _seal_text(self, text: str) -> str:
        assert self.codec is not None
        return PREFIX + self.codec.encrypt(text.encode("utf-8", "surrogatepass"))

    def open_text(self, text: str | None) -> str | None:
        if text is None or not text.startswith(PREFIX):
            return text
        return self._decrypt(text[len(PREFIX) :]).decode("utf-8", "surrogatepass")

    def _walk(self, value: Any, fn: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: fn(v) if k in _SEALED_FIELDS and isinstance(v, str) else self._walk(v, fn)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [self._walk(v, fn) for v in value]
        return value

    def _decrypt(self, token: str) -> bytes:
        if self.codec is None:
            raise DecryptionError(
                "This value was stored encrypted, but this FlowKeeper has no codec: pass "
                "codec=AesGcmCodec([...]) with the key it was written with."
            )
        return self.codec.decrypt(token)
