"""Dashboard sign-in: a password for a signed, expiring session cookie, and CSRF.

* The password comes from configuration (``FlowKeeper(dashboard_password=...)``
  or ``FLOWKEEPER_DASHBOARD_PASSWORD``); without one the dashboard is off.
* A successful login sets ``flowkeeper_session``: an itsdangerous timed
  signature (HMAC-SHA256) over a random session id and a random CSRF token,
  keyed by the signing keys and the password under a salt of its own, so it
  can never pass for an invocation signature, rotating the signing keys keeps
  sessions, and changing the password ends every session.  HttpOnly,
  SameSite=Lax, Secure over HTTPS, scoped to the dashboard's path.
* The session is also recorded in Postgres (the SHA-256 of its id, with its
  expiry): a cookie counts only while its row exists, so signing out ends the
  session on every instance, and a cookie captured before is refused after.
  A forged cookie fails its signature without a query; a genuine one costs
  one primary-key lookup.
* Every state-changing request carries that CSRF token (``X-CSRF-Token``
  header or a ``csrf`` form field), compared in constant time, and a
  cross-site ``Origin`` is refused outright.
* Sign-in attempts are counted per client in Postgres (so every instance of a
  scaled-out or serverless app shares the count), each one *before* its
  password is looked at, in one atomic statement: guesses sent all at once
  are evaluated no more than ``MAX_FAILURES`` times.  Each failure is slowed
  down as well.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from itsdangerous import BadData, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:
    from ..client import FlowKeeper

COOKIE = "flowkeeper_session"
CSRF_HEADER = "x-csrf-token"
_SALT = "flowkeeper.dashboard.session.v1"

#: Failed logins allowed per client within the window before logins are refused.
MAX_FAILURES = 10
FAILURE_WINDOW = timedelta(minutes=15)
#: Every failed login answers this much later, so guessing is slow even below the limit.
FAILURE_DELAY = 0.75


@dataclass(frozen=True, slots=True)
class Session:
    csrf: str
    #: SHA-256 of the session id: the key of its row in dashboard_sessions.
    digest: bytes


def _keys(fk: FlowKeeper, password: str) -> list[bytes]:
    digest = hashlib.sha256(password.encode()).digest()
    derived = [
        hmac.new(key, b"flowkeeper.dashboard\x00" + digest, hashlib.sha256).digest()
        for key in fk.signer._keys
    ]
    # itsdangerous signs with the last key and verifies with all of them; the
    # first signing key is the one that signs everywhere else in flowkeeper.
    return derived[::-1]


class Auth:
    """Sessions, CSRF checks and login throttling for one dashboard."""

    def __init__(self, fk: FlowKeeper) -> None:
        self.fk = fk
        self.password = fk.dashboard_password
        self.ttl = fk.dashboard_session_ttl
        self._serializer = (
            URLSafeTimedSerializer(_keys(fk, self.password), salt=_SALT) if self.password else None
        )

    @property
    def enabled(self) -> bool:
        return self._serializer is not None

    # password ---------------------------------------------------------------------
    def password_matches(self, given: str) -> bool:
        assert self.password is not None
        # Hash both sides so the comparison time does not depend on the lengths either.
        return hmac.compare_digest(
            hashlib.sha256(given.encode()).digest(),
            hashlib.sha256(self.password.encode()).digest(),
        )

    async def attempt(self, request: Request) -> bool:
        """Count this sign-in attempt; False when the client is over the limit.

        The attempt is counted first and the password looked at only if this
        returns True, so the count cannot be raced.
        """
        attempts = await self.fk.store.login_attempt(client_key(request), FAILURE_WINDOW)
        return attempts <= MAX_FAILURES

    async def failed(self, request: Request) -> None:
        await asyncio.sleep(FAILURE_DELAY)

    async def succeeded(self, request: Request) -> None:
        await self.fk.store.login_succeeded(client_key(request))

    # sessions -------------------------------------------------------------------------
    def _signed_sessions(self, request: Request) -> list[Session]:
        """Sessions whose cookie signature is good (not yet checked in Postgres)."""
        if self._serializer is None:
            return []
        found = []
        # Every cookie of that name counts: a stale or planted one on another
        # path (sent alongside) must not shadow the valid session.
        for raw in _cookie_values(request.headers.get("cookie", ""), COOKIE):
            try:
                data = self._serializer.loads(raw, max_age=int(self.ttl.total_seconds()))
            except BadData:
                continue
            if (
                isinstance(data, dict)
                and isinstance(data.get("csrf"), str)
                and isinstance(data.get("sid"), str)
            ):
                digest = hashlib.sha256(data["sid"].encode()).digest()
                found.append(Session(csrf=data["csrf"], digest=digest))
        return found

    async def session(self, request: Request) -> Session | None:
        """The request's valid session, or None (absent, forged, expired, old password,
        signed out)."""
        for candidate in self._signed_sessions(request):
            if await self.fk.store.session_valid(candidate.digest):
                return candidate
        return None

    async def start(self, request: Request, response: Response, base: str) -> None:
        assert self._serializer is not None
        sid = secrets.token_urlsafe(32)
        await self.fk.store.session_start(hashlib.sha256(sid.encode()).digest(), self.ttl)
        value = self._serializer.dumps({"sid": sid, "csrf": secrets.token_urlsafe(32)})
        response.set_cookie(
            COOKIE,
            str(value),
            max_age=int(self.ttl.total_seconds()),
            path=base or "/",
            httponly=True,
            samesite="lax",
            secure=is_https(request),
        )

    async def end(self, request: Request, response: Response, base: str) -> None:
        """Sign out: the session's row goes, so its cookie is refused everywhere."""
        for session in self._signed_sessions(request):
            await self.fk.store.session_end(session.digest)
        response.delete_cookie(
            COOKIE, path=base or "/", httponly=True, samesite="lax", secure=is_https(request)
        )

    # CSRF -------------------------------------------------------------------------------
    @staticmethod
    def csrf_ok(session: Session, request: Request, form: Any = None) -> bool:
        given = request.headers.get(CSRF_HEADER)
        if given is None and form is not None:
            value = form.get("csrf")
            given = value if isinstance(value, str) else None
        if not given:
            return False
        return hmac.compare_digest(given.encode(), session.csrf.encode())


def _cookie_values(header: str, name: str) -> list[str]:
    values = []
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name and value:
            values.append(value.strip('"'))
    return values


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        # No Origin (older browsers, same-origin GET-initiated forms): rely on
        # SameSite and the CSRF token.  "null" comes from sandboxed documents.
        return origin is None
    host = request.headers.get("x-forwarded-host") or request.headers.get("host", "")
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # e.g. "http://[": not an origin at all
        return False
    return netloc.lower() == host.split(",")[0].strip().lower()


def is_https(request: Request) -> bool:
    # The scope, not request.url: building a URL from a hostile Host header can fail.
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.scope.get("scheme") == "https" or proto == "https"


def client_key(request: Request) -> str:
    """Who is logging in, for throttling: the client address (an IPv6 /64 as one)."""
    host = request.client.host if request.client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:100]
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)
