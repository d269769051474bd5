"""FastAPI dependencies: the database session, the calling principal, and the services' `Context`
made of them and the running app's parts (settings, Temporal client, template engine, secrets)."""

from __future__ import annotations

import base64
import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel.ext.asyncio.session import AsyncSession

from api.services.context import Context
from mailqueue.accounts import Principal, user_for_key
from mailqueue.config import Settings
from mailqueue.flags import RATE_LIMITING_ENABLED
from mailqueue.ratelimit import Allowance, RateLimiter, rate_subject
from mailqueue.senders import sender_key


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as session:
        yield session


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")


async def _principal_for(request: Request, key: str | None) -> Principal | None:
    if not key:
        return None
    settings: Settings = request.app.state.settings
    expected = settings.bootstrap_api_key.get_secret_value() if settings.bootstrap_api_key else None
    if expected and hmac.compare_digest(key.encode(), expected.encode()):
        return Principal.bootstrap()
    async with request.app.state.sessions() as session:
        user = await user_for_key(session, key)
    return Principal.of(user) if user else None


def rate_limit_headers(allowance: Allowance) -> dict[str, str]:
    """Where the caller's key stands this minute (the IETF draft's RateLimit-* fields)."""
    return {
        "RateLimit-Limit": str(allowance.limit),
        "RateLimit-Remaining": str(allowance.remaining),
        "RateLimit-Reset": str(allowance.reset_after),
    }


async def admitted(request: Request, key: str | None) -> Principal | None:
    """The caller a valid key names, this request counted against the key's rate (429 past it).

    Only valid keys are counted: a wrong one gets its 401 without a round trip to the counter."""
    principal = await _principal_for(request, key)
    if principal is None or key is None:
        return None
    if not request.app.state.flags.is_on(RATE_LIMITING_ENABLED, sender_key(*principal.sender)):
        return principal  # the flag is off (for this sender): not counted at all, no RateLimit-* headers
    limiter: RateLimiter = request.app.state.rate_limiter
    allowance = await limiter.hit(rate_subject(principal, key))
    if allowance is not None:
        request.state.rate_limit = allowance  # api.app.RateLimitHeaders puts it on the answer
        if not allowance.allowed:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                f"too many requests: an API key may make {allowance.limit} requests a minute; "
                f"try again in {allowance.reset_after} s",
                headers={"Retry-After": str(allowance.reset_after)},
            )
    return principal


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    principal = await admitted(request, credentials.credentials if credentials else None)
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a valid API key is required: Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


async def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs an admin key")
    return principal


def _basic_password(request: Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value, validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return None
    if scheme.lower() == "bearer":
        return value.strip()
    return None


async def get_browser_principal(request: Request) -> Principal:
    """For pages a browser opens (template previews): Bearer, or Basic with the API key as the password.

    The Basic challenge makes the browser ask; the key never goes into a URL (nor into access logs).
    """
    principal = await admitted(request, _basic_password(request))
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a valid API key is required: Authorization: Bearer <key>, or Basic with any user name and the key as password",
            headers={"WWW-Authenticate": 'Basic realm="mailqueue", charset="UTF-8"'},
        )
    return principal


async def require_browser_admin(principal: Annotated[Principal, Depends(get_browser_principal)]) -> Principal:
    """Admins only, Bearer or Basic (the API docs when MAILQUEUE_PUBLIC_DOCS is off)."""
    if not principal.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs an admin key")
    return principal


SessionDep = Annotated[AsyncSession, Depends(get_session)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
BrowserPrincipalDep = Annotated[Principal, Depends(get_browser_principal)]
AdminDep = Annotated[Principal, Depends(require_admin)]


def context_for(request: Request, principal: Principal, session: AsyncSession) -> Context:
    state = request.app.state
    return Context(
        principal=principal, session=session, settings=state.settings, temporal=state.temporal,
        templates=state.templates, secrets=state.secrets, blobs=state.blobs,
        flags=state.flags,
    )


async def get_context(request: Request, principal: PrincipalDep, session: SessionDep) -> Context:
    """What a service call needs, for any caller with a valid key."""
    return context_for(request, principal, session)


async def get_admin_context(request: Request, principal: AdminDep, session: SessionDep) -> Context:
    """The same, for admins only (403 otherwise)."""
    return context_for(request, principal, session)


async def get_browser_context(request: Request, principal: BrowserPrincipalDep, session: SessionDep) -> Context:
    """The same, for pages a browser opens (Basic auth accepted)."""
    return context_for(request, principal, session)


ContextDep = Annotated[Context, Depends(get_context)]
AdminContextDep = Annotated[Context, Depends(get_admin_context)]
BrowserContextDep = Annotated[Context, Depends(get_browser_context)]
