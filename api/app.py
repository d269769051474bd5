"""The FastAPI application: `uvicorn api.app:app`."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import rate_limit_headers, require_browser_admin
from api.graph import graphql_router
from api import ops
from api.metrics import ApiMetrics, HttpMetrics
from api.routes import (
    codec,
    domains,
    emails,
    health,
    metrics,
    stats,
    suppressions,
    templates,
    unsubscribe,
    uploads,
    users,
    webhooks,
)
from api.routes import events as email_events
from api.routes import flags as feature_flags
from api.routes import settings as mail_settings
from api.routes import inbound as provider_events
from api.services.errors import (
    RETRY_AFTER_SECONDS,
    LimitReached,
    ServiceError,
    invalid,
    refusal_of,
    unavailable_detail,
)
from api.services.flags import on_change as flag_changes
from api.services.pause import release_paused
from mailqueue.accounts import weak_bootstrap_key
from mailqueue.blobs import blob_store
from mailqueue.config import Settings, get_settings
from mailqueue.crypto import SecretBox
from mailqueue.db import create_engine, sessionmaker
from mailqueue.delivery import TemporalUnavailable
from mailqueue.domains import system_domains
from mailqueue.events import FeedSignal
from mailqueue.flags import Flags
from mailqueue.logs import configure_logging
from mailqueue.ratelimit import RateLimiter
from mailqueue.render_pool import RenderPool
from mailqueue.suppressions import UnsubscribeTokens
from mailqueue.inbound import SnsCertificates, sendgrid_public_key
from mailqueue.templating import TemplateEngine
from mailqueue.temporal import connect
from mailqueue.tracing import configure_tracing, instrument_app
from mailqueue.tracing import flush as flush_traces

log = logging.getLogger("mailqueue.api")

DESCRIPTION = """
Queue emails and follow them to delivery. Every accepted email is a durable Temporal
workflow (id `email-<id>`): watch it in the Temporal Web UI, or here.

Authenticate with `Authorization: Bearer <API key>`.
"""


# How long an answer given before its request's body ended goes on reading and dropping the
# rest of the body before the connection closes (nginx's lingering_time, 30 s there). Many
# clients (httpx's AsyncClient among them) read the answer only once they have sent the whole
# body, and a connection closed while a body is still coming is reset: they would see a broken
# connection, not the 413. Memory stays flat: what is read is dropped.
LINGER_SECONDS = 10.0


class _BodyTooLarge(Exception):
    """Raised into the app when it reads past the body limit (BodySizeLimit answers 413)."""


class BodySizeLimit:
    """Refuse bodies over the configured size with 413 before auth or parsing, counting bytes as they arrive.

    A declared Content-Length over the limit is refused before the app runs. Otherwise the bytes
    are counted as the app reads them, so a chunked body (no length) or one longer than it said
    is cut at the limit: reading past it raises into the app, and whatever the app answers to a
    body it could not finish (FastAPI makes it a 400) is replaced by the 413.

    An answer given before the body ended (the 413, or a route that reads no body) goes out at
    once; the rest of the body is then read and dropped for at most LINGER_SECONDS, and the
    connection closes. Left to itself, uvicorn would read and drop the rest however long it is.

    Not Starlette's RequestBodyLimitMiddleware (FastAPI's max_body_size): it refuses a declared
    length only once the app reads or answers (after auth and the database for routes that read
    no body), in text/plain rather than the app's `{"detail": ...}`, and reads the rest unbounded.
    """

    def __init__(self, app: ASGIApp, limit: int, larger: dict[str, int] | None = None) -> None:
        # `larger`: paths whose bodies may carry files (attachments, uploads), with their own limits,
    # for requests with an Authorization header.
        self.app, self.default, self.larger = app, limit, larger or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        # The larger limits of bodies with files only for requests that name a key (checked later, once
        # the body is read): without one, a body is refused at the default limit.
        limit = self.larger.get(scope["path"], self.default) if b"authorization" in headers else self.default
        length = headers.get(b"content-length")
        # The body was read to its end (or there is none); bytes read so far; read past the limit; answer begun.
        ended = length in (None, b"0") and b"transfer-encoding" not in headers
        received, over, started = 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, ended, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise _BodyTooLarge
                ended = not message.get("more_body", False)
            return message

        async def answer(message: Message) -> None:
            if message["type"] == "http.response.start" and not ended:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False) and not ended:
                await send({**message, "more_body": True})  # the whole answer is out; its end waits for the body's
                with suppress(TimeoutError):
                    async with asyncio.timeout(LINGER_SECONDS):
                        while (rest := await receive())["type"] == "http.request" and rest.get("more_body", False):
                            pass
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        async def app_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # the app's answer to a body it could not finish: the 413 goes instead
            started = started or message["type"] == "http.response.start"
            await answer(message)

        if length is not None and (not length.isdigit() or int(length) > limit):
            await self._too_large(scope, limit, receive, answer)
            return
        try:
            await self.app(scope, counted_receive, app_send)
        except Exception:
            if not over or started:
                raise
        if over and not started:
            await self._too_large(scope, limit, receive, answer)

    async def _too_large(self, scope: Scope, limit: int, receive: Receive, send: Send) -> None:
        await JSONResponse({"detail": f"request body larger than {limit} bytes"}, status_code=413)(scope, receive, send)


def file_body_limits(settings: Settings) -> dict[str, int]:
    """The paths whose bodies may carry files, and how large those bodies may be: an email with its
    attachments in base64 (4 bytes for 3; the batch and GraphQL alike), or one upload and its form."""
    with_files = settings.max_request_bytes + math.ceil(settings.attachments_max_total_bytes / 3) * 4
    upload = settings.attachment_max_bytes + 1024 * 1024
    return {"/v1/emails": with_files, "/v1/emails/batch": with_files, "/graphql": with_files, "/v1/uploads": upload}


class RateLimitHeaders:
    """Every answer to a counted request says where the caller's key stands this minute
    (api.deps counts the request and leaves its Allowance in the request's state)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # the dict request.state writes to

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and (allowance := state.get("rate_limit")) is not None:
                extra = [(name.lower().encode(), value.encode()) for name, value in rate_limit_headers(allowance).items()]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class WeakBootstrapKey(RuntimeError):
    """The API does not start with a guessable admin key."""


def reject_nul_in_query(request: HTTPConnection) -> None:
    """NUL cannot be stored or searched in PostgreSQL text: refuse it the same way everywhere (WebSocket handshakes too)."""
    for name, value in request.query_params.multi_items():
        if "\x00" in value:
            raise invalid(("query", name), "must not contain NUL characters")


# An input echoed in an error is cut to this many characters: a refused attachment's base64
# content (megabytes) must not come back whole.
ECHO_MAX_CHARS = 2000


def _printable(value: Any) -> Any:
    """What UTF-8 JSON can carry: unpaired surrogates escaped, NaN and infinities as text, long strings cut."""
    if isinstance(value, str):
        if len(value) > ECHO_MAX_CHARS:
            value = f"{value[:ECHO_MAX_CHARS]}... ({len(value)} characters)"
        return value.encode("utf-8", "backslashreplace").decode()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


# Swagger UI's and ReDoc's scripts, style and icon, as the fastapi-offline package ships them, served
# by the API itself: FastAPI's defaults load them from a CDN (and ReDoc a Google font), which leaves
# /docs blank on a machine without internet.
DOCS_ASSETS = "/docs-assets"


def _api_docs(app: FastAPI, *, admins_only: bool) -> None:
    """/docs and /redoc with their assets served here. With `admins_only` (MAILQUEUE_PUBLIC_DOCS=false)
    they and /openapi.json answer admin keys only: Bearer for scripts, Basic (the key as the password)
    for a browser, which then sends it for the schema too. The assets are public: they hold nothing of ours."""
    app.mount(DOCS_ASSETS, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")
    admins = [Depends(require_browser_admin)] if admins_only else []
    if admins_only:

        @app.get("/openapi.json", include_in_schema=False, dependencies=admins)
        async def _openapi() -> JSONResponse:
            return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=admins)
    async def _swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False, dependencies=admins)
    async def _redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}/openapi.json", title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js", redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        configure_tracing("mailqueue-api")  # before connecting: the Temporal client's interceptor needs it
        if settings.bootstrap_api_key is not None and (weak := weak_bootstrap_key(settings.bootstrap_api_key.get_secret_value())):
            log.error(weak)
            raise WeakBootstrapKey(weak)  # uvicorn: "Application startup failed. Exiting." (exit code 3)
        try:
            system_domains(settings)  # the domains users may not send from: known now, not at the first email
        except ValueError as exc:
            log.error("MAILQUEUE_DEFAULT_FROM, MAILQUEUE_MESSAGE_ID_DOMAIN or MAILQUEUE_SYSTEM_DOMAINS: %s", exc)
            raise
        if settings.sendgrid_webhook_public_key:  # a key that cannot verify anything stops the start, not the first event
            try:
                sendgrid_public_key(settings.sendgrid_webhook_public_key)
            except ValueError as exc:
                log.error("%s", exc)
                raise
        engine = create_engine(settings.database_url)
        app.state.settings = settings
        app.state.sessions = sessionmaker(engine)
        pool = RenderPool.from_settings(settings)
        await pool.start()  # renders run in child processes bounded in CPU, time and memory, off this event loop
        app.state.templates = TemplateEngine(settings.default_locale, pool=pool)
        # Encrypts sender secrets; only workers decrypt them, but for a user's Mailgun webhook signing key,
        # which /v1/inbound/mailgun/{user_id} decrypts to verify that user's events.
        app.state.secrets = SecretBox.from_settings(settings)
        app.state.blobs = blob_store(settings)
        # Feature flags, from this process's cache of the table (reloaded every MAILQUEUE_FLAGS_REFRESH_SECONDS);
        # a database that is away leaves the defaults (or the last values) in place, never stops the start.
        app.state.flags = Flags.from_settings(settings, app.state.sessions)
        await app.state.flags.start()
        if release_paused not in flag_changes:  # a flag that paused sending changed: paused emails look again
            flag_changes.append(release_paused)
        app.state.sns_certificates = SnsCertificates.from_settings(settings)  # /v1/inbound/ses: fetched once per URL
        if settings.public_url:  # unsubscribe links are made: a bad key must stop the start, not the first email
            try:
                UnsubscribeTokens.from_settings(settings)
            except ValueError as exc:
                log.error("MAILQUEUE_UNSUBSCRIBE_KEYS: %s", exc)
                raise
        app.state.rate_limiter = RateLimiter.for_settings(settings, engine)
        # Wakes this process's event streams (LISTEN on PostgreSQL, a short poll on SQLite), from the first stream on.
        app.state.event_signal = FeedSignal.for_settings(settings, engine)
        # Lazy: the API starts (and /readyz reports) even while Temporal is still coming up.
        app.state.temporal = await connect(settings, lazy=True)
        if settings.bootstrap_api_key is None:
            log.warning("MAILQUEUE_BOOTSTRAP_API_KEY is not set: every /v1 request will get 401")
        if not settings.require_verified_from:
            log.warning("MAILQUEUE_REQUIRE_VERIFIED_FROM is off: users may send from domains they have not verified (development only)")
        yield
        flush_traces()
        await app.state.event_signal.stop()
        await pool.close()
        await app.state.rate_limiter.aclose()
        await app.state.flags.aclose()
        await engine.dispose()

    app = FastAPI(
        title="mailqueue", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
        dependencies=[Depends(reject_nul_in_query)],
        openapi_url="/openapi.json" if settings.public_docs else None, docs_url=None, redoc_url=None,  # _api_docs serves them
    )
    _api_docs(app, admins_only=not settings.public_docs)
    if settings.rate_limit_per_minute:
        app.add_middleware(RateLimitHeaders)
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes, larger=file_body_limits(settings))
    app.add_middleware(codec.CodecCORS, origins=settings.codec_cors_origins)  # outside auth and limits: answers the UI's preflights
    app.state.metrics = ApiMetrics()  # this app's own registry (tests build several apps in one process)
    app.add_middleware(HttpMetrics, metrics=app.state.metrics)  # around the rest: 413s and preflights count too
    instrument_app(app)  # when OTEL_* asks for traces: a server span per request, outside every middleware
    app.include_router(health.router)
    app.include_router(emails.router)
    app.include_router(email_events.router)
    app.include_router(templates.router)
    app.include_router(users.router)
    app.include_router(mail_settings.router)
    app.include_router(domains.router)
    app.include_router(suppressions.router)
    app.include_router(uploads.router)
    app.include_router(unsubscribe.router)  # /u/{token}: no API key, the signed token is the credential
    app.include_router(webhooks.router)
    app.include_router(provider_events.router)  # /v1/inbound/*: no API key, the provider's signature is the credential
    app.include_router(stats.router)
    app.include_router(feature_flags.router)
    app.include_router(metrics.router)
    app.include_router(codec.router)
    app.include_router(graphql_router(settings))  # /graphql: the same services, over HTTP and WebSockets
    ops.install(app)  # /ops: the ops console (pages, their static files, login and CSRF refusals)

    def unavailable(what: str) -> JSONResponse:
        return JSONResponse({"detail": unavailable_detail(what)}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    def refused(detail: Any, status: int) -> JSONResponse:
        # FastAPI's own handler echoes the input back as given: "\ud800" or NaN in a body made its 422 a 500.
        return JSONResponse({"detail": _printable(jsonable_encoder(detail))}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return refused(exc.errors(), 422)

    @app.exception_handler(ServiceError)
    async def _refused(request: Request, exc: ServiceError) -> JSONResponse:
        answer = refused(exc.detail, refusal_of(exc)[0])  # what the services refuse, in HTTP's terms
        if isinstance(exc, LimitReached):
            answer.headers["Retry-After"] = str(exc.retry_after)
        return answer

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
