"""The ops console's login: a signed session cookie that names the API key (never holds it), and its CSRF token.

The cookie carries who logged in (the key's id, or "bootstrap" with a fingerprint of the bootstrap
key) and a random CSRF token, signed (itsdangerous, HMAC-SHA256) with a key derived from the secret
box's keys: no new secret to configure, and rotating MAILQUEUE_SECRET_KEY ends every session. It is
not a bearer of the key: every request looks the key up again, so a revoked key or a deactivated user
is logged out at once. A visitor who has not logged in gets a cookie with a CSRF token only, so the
login form is protected like the others.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from mailqueue.accounts import Principal, hash_key, user_for_key
from mailqueue.config import Settings
from mailqueue.crypto import secret_keys
from mailqueue.models import ApiKey, User

COOKIE = "mailqueue_ops"
COOKIE_PATH = "/ops"
CSRF_FIELD = "csrf_token"
BOOTSTRAP = "bootstrap"
_LABEL = b"mailqueue ops session v1"


class NotLoggedIn(Exception):
    """No valid session (none, expired, badly signed, or its key no longer works): the login page."""


class CsrfRefused(Exception):
    """A POST without this session's CSRF token (403)."""


class AdminsOnly(Exception):
    """An admin page asked for with a user's key (403)."""


@dataclass
class OpsSession:
    """What the cookie holds: the CSRF token, and who logged in (None: nobody yet)."""

    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    key_id: str | None = None  # an ApiKey id, or BOOTSTRAP
    fingerprint: str | None = None  # the bootstrap key's, so that a new bootstrap key ends the old sessions


class SessionSigner:
    """Makes and reads the cookie; one per app."""

    def __init__(self, settings: Settings) -> None:
        derived = [hmac.new(k.encode(), _LABEL, hashlib.sha256).hexdigest() for k in secret_keys(settings)]
        # itsdangerous signs with the last key and accepts all: oldest first.
        self._serializer = URLSafeTimedSerializer(list(reversed(derived)), salt="mailqueue-ops")
        self._fingerprint_key = derived[0].encode()
        self.max_age = int(settings.ops_session_hours * 3600)

    def fingerprint(self, key: str) -> str:
        return hmac.new(self._fingerprint_key, key.encode(), hashlib.sha256).hexdigest()[:32]

    def read(self, request: Request) -> OpsSession | None:
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data = self._serializer.loads(raw, max_age=self.max_age)
        except BadSignature:  # SignatureExpired is one: an old login is no login
            return None
        if not isinstance(data, dict) or not isinstance(data.get("csrf"), str):
            return None
        return OpsSession(csrf=data["csrf"], key_id=data.get("key"), fingerprint=data.get("fp"))

    def write(self, request: Request, response: Response, session: OpsSession) -> None:
        value = self._serializer.dumps({"csrf": session.csrf, "key": session.key_id, "fp": session.fingerprint})
        response.set_cookie(
            COOKIE, value, max_age=self.max_age, path=COOKIE_PATH, httponly=True, samesite="strict",
            secure=request.url.scheme == "https",
        )

    def clear(self, response: Response) -> None:
        response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")


def check_csrf(session: OpsSession | None, given: object) -> None:
    if session is None or not isinstance(given, str) or not hmac.compare_digest(given.encode(), session.csrf.encode()):
        raise CsrfRefused


async def log_in(settings: Settings, signer: SessionSigner, db: AsyncSession, key: str) -> OpsSession | None:
    """A new session (and a new CSRF token) for a valid key, or None."""
    key = key.strip()
    if not key:
        return None
    bootstrap = settings.bootstrap_api_key.get_secret_value() if settings.bootstrap_api_key else None
    if bootstrap and hmac.compare_digest(key.encode(), bootstrap.encode()):
        return OpsSession(key_id=BOOTSTRAP, fingerprint=signer.fingerprint(key))
    user = await user_for_key(db, key)
    if user is None:
        return None
    api_key = (await db.exec(select(ApiKey).where(col(ApiKey.key_hash) == hash_key(key)))).one()
    return OpsSession(key_id=api_key.id)


async def principal_of(settings: Settings, signer: SessionSigner, db: AsyncSession, session: OpsSession | None) -> Principal:
    """Who the session's key names, checked now: the key not revoked, its user active (else NotLoggedIn)."""
    if session is None or session.key_id is None:
        raise NotLoggedIn
    if session.key_id == BOOTSTRAP:
        bootstrap = settings.bootstrap_api_key.get_secret_value() if settings.bootstrap_api_key else None
        if bootstrap and session.fingerprint and hmac.compare_digest(signer.fingerprint(bootstrap), session.fingerprint):
            return Principal.bootstrap()
        raise NotLoggedIn
    found = (
        await db.exec(select(ApiKey, User).join(User, col(User.id) == col(ApiKey.user_id)).where(col(ApiKey.id) == session.key_id))
    ).first()
    if found is None:
        raise NotLoggedIn
    api_key, user = found
    if api_key.revoked_at is not None or not user.is_active:
        raise NotLoggedIn
    return Principal.of(user)
