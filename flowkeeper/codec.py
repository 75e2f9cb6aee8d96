"""Encryption at rest: ``FlowKeeper(codec=...)`` seals payloads before they reach Postgres.

Sealed: run inputs and outputs, step inputs and results (ctx.step and
ctx.transaction), event data and approval-token data, what a wait or a
cancel_on rule matches on, stream messages (ctx.publish), captured step log
lines, and the message and traceback of every error (a
run's, a step's, a failed attempt's, a replay's record of the previous
error).  Not sealed: what flowkeeper itself must read in SQL — names,
statuses, due times, error *types*, patch markers, and the field *names*
(not values) of event data.  pg_cron dispatch never reads payloads, so it
works unchanged.

Waits match events inside Postgres, so event data is stored twice: sealed
(what a wait returns), and as a *match index* — the same structure with
every value replaced by a keyed hash (HMAC-SHA-256 under a key derived from
each codec key, 128 bits).  A wait's match values are hashed the same way,
so equality — and only equality — still works in SQL, with jsonb's own
rules (``42`` equals ``42.0``, ``"42"`` does not).  An event is indexed
under every configured key and a wait under the first, so rotation never
makes a sleeping wait miss its event.

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
import hmac
import json
import os
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Protocol

from .errors import CodecKeyError, ConfigurationError, DecryptionError

__all__ = ["AesGcmCodec", "Codec", "CodecKeyError", "DecryptionError", "Sealer"]

PREFIX = "fk:enc:"
_AAD = b"flowkeeper.v1"
_TOKEN = "aesgcm1"
_SEALED_FIELDS = ("message", "traceback")
#: What a hashed match value starts with (a JSON string in the match index).
HASHED = "fk:h:"


class Codec(Protocol):
    """What ``FlowKeeper(codec=...)`` takes: bytes in, an ASCII token out, and back.

    A codec may also have ``match_keys() -> list[tuple[str, bytes]]`` (key id,
    secret; the current one first), as :class:`AesGcmCodec` does: event data
    and wait matches are then indexed by keyed hashes.  Without it, the
    values of event fields stay readable in ``event_log.data`` (the sealed
    copy is what waits return) so that waits can match on them.
    """

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
        self._match: list[tuple[str, bytes]] = []
        self._first = ""
        for key in listed:
            raw = _key_bytes(key)
            kid = hashlib.sha256(b"flowkeeper.kid" + raw).hexdigest()[:8]
            if kid in self._ciphers:
                raise CodecKeyError("The same AES-GCM key is listed twice.")
            self._ciphers[kid] = AESGCM(raw)
            # A separate secret for the match index: its hashes reveal nothing of the key.
            self._match.append((kid, hashlib.sha256(b"flowkeeper.match" + raw).digest()))
            self._first = self._first or kid

    @staticmethod
    def generate_key() -> str:
        """A new random 256-bit key, as URL-safe base64 text."""
        return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")

    @property
    def key_ids(self) -> list[str]:
        return list(self._ciphers)

    def match_keys(self) -> list[tuple[str, bytes]]:
        """(key id, match-index secret) for every key, the encrypting key's first."""
        return list(self._match)

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
        keys = getattr(codec, "match_keys", None)
        #: (key id, secret) of the match index, the current key first (empty: not hashed).
        self.match_keys: list[tuple[str, bytes]] = list(keys()) if callable(keys) else []

    @property
    def on(self) -> bool:
        return self.codec is not None

    # the match index of events and waits --------------------------------------------------
    def event_index(self, payload: str) -> str | None:
        """What SQL matches waits on for event data ``payload`` (None: the data itself).

        One hashed copy of the data per key, each under the key's scope: a wait
        registered under any listed key finds its event.
        """
        if not self.match_keys:
            return None
        # Numbers as Decimal: hashed exactly as jsonb compares them.
        data = json.loads(payload, parse_float=Decimal, parse_int=Decimal)
        return json.dumps({_scope(kid): _hashed(data, secret) for kid, secret in self.match_keys})

    def wait_index(
        self, paths: Sequence[str], values: Sequence[Any], containment: dict[str, Any]
    ) -> tuple[list[str], list[Any], dict[str, Any]]:
        """A wait's match paths, values and containment as the match index holds them."""
        if not self.match_keys:
            return list(paths), list(values), containment
        kid, secret = self.match_keys[0]
        scoped = [f"{_scope(kid)}.{p}" for p in paths]
        hashed = [_hash_scalar(_number(v), secret) for v in values]
        nested: dict[str, Any] = {}
        for path, value in zip(scoped, hashed, strict=True):
            node = nested
            *parents, last = path.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        return scoped, hashed, nested

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
        return self._walk(value, self.seal_text)

    def open_error(self, value: Any) -> Any:
        return self._walk(value, self.open_text)

    def seal_text(self, text: str) -> str:
        """A string sealed as a string (a log line); as it is without a codec."""
        if self.codec is None:
            return text
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


def _scope(kid: str) -> str:
    return f"fk-{kid}"


def _number(value: Any) -> Any:
    """A match value as the index compares it (floats by their JSON text, as jsonb reads them)."""
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    return value


def _hashed(value: Any, secret: bytes) -> Any:
    """``value`` with each scalar replaced by its keyed hash (objects and arrays kept)."""
    if isinstance(value, dict):
        return {k: _hashed(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [_hashed(v, secret) for v in value]
    if value is None:
        return None
    return _hash_scalar(value, secret)


def _hash_scalar(value: Any, secret: bytes) -> str:
    # Typed, so that "1", 1 and true stay unequal; numbers normalised, so that
    # 42, 42.0 and 4.2e1 are equal (as jsonb has them).
    if isinstance(value, bool):
        text = b"b1" if value else b"b0"
    elif isinstance(value, Decimal):
        text = b"n" + _canonical_number(value).encode()
    elif isinstance(value, str):
        text = b"s" + value.encode("utf-8", "surrogatepass")
    else:
        text = b"x" + repr(value).encode()
    digest = hmac.new(secret, text, hashlib.sha256).digest()[:16]
    return HASHED + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _canonical_number(value: Decimal) -> str:
    """One text per numeric value: digits without trailing zeros and an exponent.

    By hand rather than ``Decimal.normalize``, which rounds to the context's
    28 digits and would make two different large numbers equal.
    """
    if not value.is_finite():
        return str(value)
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    kept = list(digits)
    while len(kept) > 1 and kept[-1] == 0:
        kept.pop()
        exponent += 1
    if kept == [0]:
        return "0"
    return f"{'-' if sign else ''}{''.join(map(str, kept))}e{exponent}"
