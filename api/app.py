"""The FastAPI application: `uvicorn api.app:app`."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from starlette.types import ASGIApp, Receive, Scope, Send

from api.routes import emails, health, settings as mail_settings, stats, templates, users
from api.services.errors import Conflict, Invalid, NotFound, ServiceError, invalid
from mailqueue.config import Settings, get_settings
from mailqueue.crypto import SecretBox
from mailqueue.db import create_engine, sessionmaker
from mailqueue.delivery import TemporalUnavailable
from mailqueue.logs import configure_logging
from mailqueue.temporal import connect
from mailqueue.templating import TemplateEngine

log = logging.getLogger("mailqueue.api")

DESCRIPTION = """
Queue emails and follow them to delivery. Every accepted email is a durable Temporal
workflow (id `email-<id>`): watch it in the Temporal Web UI, or here.

Authenticate with `Authorization: Bearer <API key>`.
"""


class BodySizeLimit:
    """Refuse bodies over the configured size before anything reads them (413, not a crash)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                response = JSONResponse({"detail": f"request body larger than {self.limit} bytes"}, status_code=413)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def reject_nul_in_query(request: Request) -> None:
    """NUL cannot be stored or searched in PostgreSQL text: refuse it the same way everywhere."""
    for name, value in request.query_params.multi_items():
        if "\x00" in value:
            raise invalid(("query", name), "must not contain NUL characters")


def _printable(value: Any) -> Any:
    """What UTF-8 JSON can carry: unpaired surrogates escaped, NaN and infinities as text."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        engine = create_engine(settings.database_url)
        app.state.settings = settings
        app.state.sessions = sessionmaker(engine)
        app.state.templates = TemplateEngine(settings.default_locale)
        app.state.secrets = SecretBox.from_settings(settings)  # encrypts sender secrets; only workers decrypt
        # Lazy: the API starts (and /readyz reports) even while Temporal is still coming up.
        app.state.temporal = await connect(settings, lazy=True)
        if settings.bootstrap_api_key is None:
            log.warning("MAILQUEUE_BOOTSTRAP_API_KEY is not set: every /v1 request will get 401")
        yield
        await engine.dispose()

    app = FastAPI(
        title="mailqueue", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
        dependencies=[Depends(reject_nul_in_query)],
    )
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    app.include_router(health.router)
    app.include_router(emails.router)
    app.include_router(templates.router)
    app.include_router(users.router)
    app.include_router(mail_settings.router)
    app.include_router(stats.router)

    def unavailable(what: str) -> JSONResponse:
        return JSONResponse({"detail": f"{what} is unavailable; nothing was changed, try again"}, status_code=503, headers={"Retry-After": "5"})

    def refused(detail: Any, status: int) -> JSONResponse:
        # FastAPI's own handler echoes the input back as given: "\ud800" or NaN in a body made its 422 a 500.
        return JSONResponse({"detail": _printable(jsonable_encoder(detail))}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return refused(exc.errors(), 422)

    # What the services refuse, in HTTP's terms.
    statuses: dict[type[ServiceError], int] = {NotFound: 404, Conflict: 409, Invalid: 422}

    @app.exception_handler(ServiceError)
    async def _refused(request: Request, exc: ServiceError) -> JSONResponse:
        return refused(exc.detail, next((code for kind, code in statuses.items() if isinstance(exc, kind)), 400))

    @app.exception_handler(TemporalUnavailable)
    async def _temporal_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("temporal unavailable: %s", exc)
        return unavailable("Temporal")

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", type(exc).__name__)
        return unavailable("the database")

    @app.exception_handler(DataError)
    async def _unstorable(request: Request, exc: Exception) -> JSONResponse:
        # e.g. a NUL character, which PostgreSQL text cannot hold: the input's fault, not ours.
        return JSONResponse({"detail": "a value in the request cannot be stored or searched (NUL or invalid characters?)"}, status_code=422)

    return app


app = create_app()
