"""FastAPI dependencies: settings, DB session, Temporal client, the calling principal."""

from __future__ import annotations

import base64
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client

from mailqueue.accounts import user_for_key
from mailqueue.config import Settings
from mailqueue.templating import TemplateEngine


@dataclass(frozen=True)
class Principal:
    """Who is calling: the bootstrap key (admin, sends as the system), or a user (maybe an admin)."""

    kind: str  # "admin" (bootstrap key) | "user"
    id: str | None
    role: str = "admin"

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin" or self.role == "admin"

    @property
    def sender(self) -> tuple[str, str | None]:
        return ("system", None) if self.kind == "admin" else ("user", self.id)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as session:
        yield session


def get_temporal(request: Request) -> Client:
    return request.app.state.temporal


def get_templates(request: Request) -> TemplateEngine:
    return request.app.state.templates


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")


async def _principal_for(request: Request, key: str | None) -> Principal | None:
    if not key:
        return None
    settings: Settings = request.app.state.settings
    expected = settings.bootstrap_api_key.get_secret_value() if settings.bootstrap_api_key else None
    if expected and hmac.compare_digest(key.encode(), expected.encode()):
        return Principal(kind="admin", id=None)
    async with request.app.state.sessions() as session:
        user = await user_for_key(session, key)
    return Principal(kind="user", id=user.id, role=user.role) if user else None


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    principal = await _principal_for(request, credentials.credentials if credentials else None)
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a valid API key is required: Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
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
    principal = await _principal_for(request, _basic_password(request))
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a valid API key is required: Authorization: Bearer <key>, or Basic with any user name and the key as password",
            headers={"WWW-Authenticate": 'Basic realm="mailqueue", charset="UTF-8"'},
        )
    return principal


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
TemplatesDep = Annotated[TemplateEngine, Depends(get_templates)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
BrowserPrincipalDep = Annotated[Principal, Depends(get_browser_principal)]
AdminDep = Annotated[Principal, Depends(require_admin)]
