"""Request signing: the wire contract between dispatchers and the endpoint.

Every request that can start work carries a ``Flowkeeper-Signature`` header,
made with itsdangerous (HMAC-SHA256, timestamped).  The signature binds the
HTTP method, the URL path, the timestamp and the exact body bytes, so a captured
request cannot be replayed later, re-pointed at another route, or altered.

The bytes, for anyone writing a dispatcher in another language (the pg_cron
dispatcher does the same in SQL; ``tests/unit/test_signing.py`` pins vectors)::

    derived = HMAC-SHA256(key=<secret>, msg=b"flowkeeper.v1")
    ts      = base64url_nopad(<unix seconds as big-endian bytes, minimal length>)
    message = "v1\\n" + METHOD + "\\n" + path + "\\n" + hex(SHA-256(body)) + "." + ts
    sig     = base64url_nopad(HMAC-SHA256(key=derived, msg=message))
    header  = "Flowkeeper-Signature: " + ts + "." + sig

Keys rotate: configure a list; the first one signs, every one verifies.

Use :func:`sign_request` to make headers and :func:`verify_request` to check
them, or a :class:`RequestSigner` holding the keys.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from itsdangerous import BadSignature, TimestampSigner
from itsdangerous.encoding import base64_decode, bytes_to_int

from .errors import ConfigurationError, SignatureError

__all__ = [
    "MAX_AGE_SECONDS",
    "MIN_KEY_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "SIGNATURE_HEADER",
    "RequestSigner",
    "canonical_message",
    "check_dashboard_password",
    "check_signing_keys",
    "sign_request",
    "verify_request",
]

SIGNATURE_HEADER: Final = "Flowkeeper-Signature"
SALT: Final = b"flowkeeper.v1"
#: Signatures older than this are refused.
MAX_AGE_SECONDS: Final = 300
#: Tolerated clock skew for signatures that claim to come from the future.
MAX_SKEW_SECONDS: Final = 30

KeyInput = str | bytes | Sequence[str | bytes]

# "<timestamp>.<signature>", both URL-safe base64 (itsdangerous), bounded: a
# timestamp is at most 8 bytes, the signature a SHA-256 HMAC.  Anything else,
# non-ASCII bytes included, is refused before any decoding.
_HEADER_RE = re.compile(r"([A-Za-z0-9_-]{1,12})\.([A-Za-z0-9_-]{1,100})")


class _FixedTimeSigner(TimestampSigner):
    """A TimestampSigner whose clock can be pinned (test vectors, SQL parity)."""

    def __init__(self, secret_key: bytes, timestamp: int | None) -> None:
        super().__init__(
            secret_key,
            salt=SALT,
            key_derivation="hmac",
            digest_method=hashlib.sha256,
        )
        self._timestamp = timestamp

    def get_timestamp(self) -> int:
        return self._timestamp if self._timestamp is not None else int(time.time())

    def derive_key(self, secret_key: str | bytes | None = None) -> bytes:
        # itsdangerous derives the key again on every sign and verify; the
        # derivation depends on the secret alone, so it is done once per key.
        raw = self.secret_keys[-1] if secret_key is None else secret_key
        return _derived(raw if isinstance(raw, bytes) else raw.encode())


@functools.lru_cache(maxsize=32)
def _derived(key: bytes) -> bytes:
    return hmac.new(key, SALT, hashlib.sha256).digest()


@functools.lru_cache(maxsize=32)
def _verifier(key: bytes) -> _FixedTimeSigner:
    return _FixedTimeSigner(key, None)


@functools.lru_cache(maxsize=32)
def _signer(key: bytes) -> _FixedTimeSigner:
    return _FixedTimeSigner(key, None)


def canonical_message(method: str, path: str, body: bytes) -> bytes:
    """The value that gets signed for a request (without the timestamp)."""
    if "\n" in method or "\n" in path:
        raise ValueError("method and path must not contain newlines")
    return _message(method, path, hashlib.sha256(body).hexdigest())


def _message(method: str, path: str, digest: str) -> bytes:
    return f"v1\n{method.upper()}\n{path}\n{digest}".encode()


def normalize_keys(keys: KeyInput) -> list[bytes]:
    """Turn the user's key setting into a non-empty list of byte strings."""
    items: Iterable[str | bytes] = [keys] if isinstance(keys, str | bytes) else keys
    out: list[bytes] = []
    for item in items:
        raw = item.encode() if isinstance(item, str) else bytes(item)
        if not raw.strip():
            raise ConfigurationError(
                "A signing key is empty. Set FLOWKEEPER_SIGNING_KEY to a long random "
                'secret, e.g. python -c "import secrets; print(secrets.token_urlsafe(32))".'
            )
        out.append(raw)
    if not out:
        raise ConfigurationError(
            "No signing key configured. Pass signing_key=... or set FLOWKEEPER_SIGNING_KEY."
        )
    return out


# secret strength -----------------------------------------------------------------------
#: Shortest signing key FlowKeeper(...) and pgcron.install accept.
MIN_KEY_LENGTH: Final = 32
#: Shortest dashboard password FlowKeeper(...) accepts.
MIN_PASSWORD_LENGTH: Final = 12
_GENERATE = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
_ESCAPE = "(Tests that need a short secret can pass allow_weak_secrets=True.)"


def check_signing_keys(keys: KeyInput, *, allow_weak: bool = False) -> None:
    """Refuse signing keys anyone could guess: each needs ``MIN_KEY_LENGTH``
    characters besides surrounding whitespace.  ``allow_weak`` skips the check
    (tests only).  The message never repeats the key."""
    if allow_weak:
        return
    key_list = normalize_keys(keys)
    for position, key in enumerate(key_list, 1):
        length = len(key.strip())
        if length < MIN_KEY_LENGTH:
            which = (
                f"Signing key #{position} of {len(key_list)}"
                if len(key_list) > 1
                else ("The signing key")
            )
            raise ConfigurationError(
                f"{which} is {length} characters long; flowkeeper needs at least "
                f"{MIN_KEY_LENGTH}, since anyone who guesses it can start work on your "
                f"endpoint. Generate one with {_GENERATE} and set it as "
                f"FLOWKEEPER_SIGNING_KEY everywhere runs are dispatched or served. {_ESCAPE}"
            )


def check_dashboard_password(password: str, *, allow_weak: bool = False) -> None:
    """Refuse dashboard passwords that are whitespace or under ``MIN_PASSWORD_LENGTH``."""
    if allow_weak:
        return
    length = len(password.strip())
    if length < MIN_PASSWORD_LENGTH:
        what = "only whitespace" if not password.strip() else f"{length} characters long"
        raise ConfigurationError(
            f"The dashboard password is {what}; flowkeeper needs at least "
            f"{MIN_PASSWORD_LENGTH} characters, since the dashboard can replay and cancel "
            f"runs. Generate one with {_GENERATE} and set it as "
            "FLOWKEEPER_DASHBOARD_PASSWORD, or leave it unset to turn the dashboard off. "
            f"{_ESCAPE}"
        )


def sign_request(
    keys: KeyInput,
    *,
    method: str,
    path: str,
    body: bytes,
    timestamp: int | None = None,
) -> dict[str, str]:
    """Return the headers that make ``body`` a valid request to ``method path``.

    ``keys`` may be one key or a list (the first one signs).  ``timestamp``
    defaults to now; pass one only to reproduce a known signature.
    """
    key = normalize_keys(keys)[0]
    signer = _signer(key) if timestamp is None else _FixedTimeSigner(key, timestamp)
    signed = signer.sign(canonical_message(method, path, body)).decode("ascii")
    # signed = "<message>.<ts>.<sig>": the message is rebuilt by the verifier.
    ts, sig = signed.rsplit(".", 2)[1:]
    return {SIGNATURE_HEADER: f"{ts}.{sig}"}


def verify_request(
    keys: KeyInput,
    *,
    method: str,
    paths: Iterable[str],
    body: bytes,
    header: str | None,
    max_age: int = MAX_AGE_SECONDS,
    now: float | None = None,
) -> None:
    """Check a request's signature header; raise :class:`SignatureError` if bad.

    ``paths`` lists every path under which this route may legitimately have
    been addressed (the path the app sees and the path of the configured
    endpoint URL, which differ behind rewriting proxies).
    """
    if not header:
        raise SignatureError(
            f"Missing {SIGNATURE_HEADER} header. Requests to the flowkeeper endpoint must be "
            "signed with the signing key (see flowkeeper.signing).",
            code="missing_signature",
        )
    match = _HEADER_RE.fullmatch(header.strip())
    if match is None:
        raise SignatureError(
            f"Malformed {SIGNATURE_HEADER} header: expected '<timestamp>.<signature>' in "
            "URL-safe base64 (ASCII letters, digits, '-' and '_').",
            code="malformed_signature",
        )
    ts_text, sig_text = match.groups()
    try:
        signed_at = bytes_to_int(base64_decode(ts_text))
    except Exception as exc:
        raise SignatureError(
            f"Malformed {SIGNATURE_HEADER} header: the timestamp is not valid.",
            code="malformed_signature",
        ) from exc

    key_list = normalize_keys(keys)
    matched = False
    digest = hashlib.sha256(body).hexdigest()
    for path in dict.fromkeys(paths):
        if "\n" in method or "\n" in path:
            raise ValueError("method and path must not contain newlines")
        message = _message(method, path, digest)
        token = message + b"." + f"{ts_text}.{sig_text}".encode("ascii")
        for key in key_list:
            try:
                _verifier(key).unsign(token)
            except BadSignature:
                continue
            matched = True
            break
        if matched:
            break
    if not matched:
        raise SignatureError(
            "Invalid signature: the request was altered, addressed to another path, or "
            "signed with a key this endpoint does not have. Check that dispatcher and "
            "endpoint share FLOWKEEPER_SIGNING_KEY.",
            code="invalid_signature",
        )

    age = (time.time() if now is None else now) - signed_at
    if age > max_age:
        raise SignatureError(
            f"Signature expired: signed {int(age)}s ago, the limit is {max_age}s. "
            "Requests must be sent right after signing; check the sender's clock.",
            code="expired_signature",
        )
    if age < -MAX_SKEW_SECONDS:
        raise SignatureError(
            f"Signature from the future: timestamp is {int(-age)}s ahead of this server's "
            "clock. Check the sender's clock.",
            code="future_signature",
        )


class RequestSigner:
    """Signs and verifies requests with one set of keys."""

    def __init__(self, keys: KeyInput, *, max_age: int = MAX_AGE_SECONDS) -> None:
        self._keys = normalize_keys(keys)
        self.max_age = max_age

    @property
    def keys(self) -> list[bytes]:
        """The keys, the signing one first (flowkeeper doctor compares pg_cron's)."""
        return list(self._keys)

    def sign(
        self, *, method: str, path: str, body: bytes, timestamp: int | None = None
    ) -> dict[str, str]:
        """Headers for a request (see :func:`sign_request`)."""
        return sign_request(self._keys, method=method, path=path, body=body, timestamp=timestamp)

    def verify(
        self,
        *,
        method: str,
        paths: Iterable[str],
        body: bytes,
        headers: Mapping[str, str],
        now: float | None = None,
    ) -> None:
        """Raise :class:`SignatureError` unless the headers sign this request."""
        header = headers.get(SIGNATURE_HEADER) or headers.get(SIGNATURE_HEADER.lower())
        verify_request(
            self._keys,
            method=method,
            paths=paths,
            body=body,
            header=header,
            max_age=self.max_age,
            now=now,
        )
