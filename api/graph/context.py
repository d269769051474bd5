"""GraphQL's side of the door: who is calling (the same API keys as REST: the Authorization header
over HTTP, the `connection_init` payload over WebSockets), the services' Context for each resolver,
and what the services refuse as GraphQL errors with `extensions.code` (the table in
api/services/errors.py, one to one with REST's status codes). Auth and the admin guard live here only."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import HTTPException
from graphql import GraphQLError
from pydantic import ValidationError
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from starlette.requests import HTTPConnection
from strawberry.dataloader import DataLoader
from strawberry.fastapi import BaseContext
from strawberry.types import Info

from api.deps import admitted
from api.services.context import Context
from api.services.errors import (
    OUTSIDE,
    RETRY_AFTER_SECONDS,
    Invalid,
    LimitReached,
    ServiceError,
    TooLarge,
    refusal_of,
    unavailable_detail,
)
from mailqueue.accounts import Principal
from mailqueue.delivery import TemporalUnavailable
from mailqueue.email_store import events_of_many
from mailqueue.models import EmailEvent

log = logging.getLogger("mailqueue.api.graphql")

UNAUTHENTICATED = (
    "a valid API key is required: the Authorization header (Bearer <key>), or over WebSockets "
    "{\"Authorization\": \"Bearer <key>\"} in connection_init's payload"
)


def refused(message: str, code: str, **extensions: Any) -> GraphQLError:
    """An error the client is meant to read: its message as said, `extensions.code` to branch on."""
    return GraphQLError(message, extensions={"code": code, **extensions})


def _camel(part: str | int) -> str | int:
    if not isinstance(part, str):
        return part
    head, *rest = part.rstrip("_").split("_")
    return head + "".join(word[:1].upper() + word[1:] for word in rest)


def field_errors(errors: Sequence[dict[str, Any]], arg: str | None) -> list[dict[str, Any]]:
    """Field errors (pydantic's shape, as REST answers them) with GraphQL's paths: the argument, then its fields in camelCase."""
    out = []
    for error in errors:
        loc = [_camel(p) for p in error.get("loc", ()) if p not in ("body", "query", "header")]
        out.append({"path": ([arg] if arg else []) + loc, "message": error.get("msg", ""), "type": error.get("type")}
                   | ({"missing": error["missing"]} if "missing" in error else {}))
    return out


def bad_input(errors: Sequence[dict[str, Any]], arg: str | None) -> GraphQLError:
    fields = field_errors(errors, arg)
    first = fields[0] if fields else {"path": [arg] if arg else [], "message": "invalid input"}
    where = ".".join(str(p) for p in first["path"])
    return refused(f"{where}: {first['message']}" if where else first["message"], "BAD_USER_INPUT", fields=fields)


def as_graphql_error(exc: Exception, arg: str | None) -> GraphQLError | None:
    """What a service (or the request's validation) refused, as a GraphQL error; None for a fault of ours."""
    if isinstance(exc, GraphQLError):
        return exc
    if isinstance(exc, ValidationError):
        return bad_input(exc.errors(include_url=False, include_context=False, include_input=False), arg)
    if isinstance(exc, TooLarge):  # a file over a size limit: the message names it
        return refused(str(exc.detail[0]["msg"]), refusal_of(exc)[1])
    if isinstance(exc, Invalid):
        detail = exc.detail
        if isinstance(detail, dict):  # a batch refused as a whole: its summary and the items
            return refused(str(detail.get("msg", "invalid input")), "BAD_USER_INPUT", items=detail.get("items", []))
        return bad_input(detail, arg)
    if isinstance(exc, ServiceError):
        code = refusal_of(exc)[1]
        extra = {"retryAfter": exc.retry_after} if isinstance(exc, LimitReached) else {}
        return refused(str(exc.detail), code, **extra)
    if isinstance(exc, TemporalUnavailable):
        log.warning("temporal unavailable: %s", exc)
        return refused(unavailable_detail("Temporal"), "UNAVAILABLE", retryAfter=RETRY_AFTER_SECONDS)
    if isinstance(exc, OperationalError | InterfaceError):
        log.warning("database unavailable: %s", type(exc).__name__)
        return refused(unavailable_detail("the database"), "UNAVAILABLE", retryAfter=RETRY_AFTER_SECONDS)
    if isinstance(exc, DataError):
        return refused("a value in the request cannot be stored or searched (NUL or invalid characters?)", "BAD_USER_INPUT",
                       fields=[{"path": [arg] if arg else [], "message": "cannot be stored"}])
    if isinstance(exc, HTTPException) and exc.status_code in OUTSIDE:
        extra = {"retryAfter": int(exc.headers["Retry-After"])} if exc.headers and "Retry-After" in exc.headers else {}
        return refused(str(exc.detail), OUTSIDE[exc.status_code], **extra)
    return None


class Loaders:
    """Batched reads for one operation's nested fields (`emails { events }` is one query, not one per email).

    Not cached: a WebSocket's context outlives its operations, and a later one must see new events."""

    def __init__(self, state: Any) -> None:
        async def events(email_ids: list[str]) -> list[list[EmailEvent]]:
            async with state.sessions() as session:
                found = await events_of_many(session, email_ids)
            return [found[email_id] for email_id in email_ids]

        self.events: DataLoader[str, list[EmailEvent]] = DataLoader(load_fn=events, cache=False)


class GraphContext(BaseContext):
    """What every resolver gets: the caller (None: no valid key; `refusal` then says why), the running
    app's parts, and the loaders."""

    def __init__(self, state: Any, principal: Principal | None, refusal: GraphQLError | None) -> None:
        super().__init__()
        self.state, self.principal, self.refusal = state, principal, refusal
        self.loaders = Loaders(state)

    def caller(self, *, admin: bool = False) -> Principal:
        """The guard, for every field and mutation: a valid key, and for `admin` an admin's."""
        if self.principal is None:
            raise self.refusal or refused(UNAUTHENTICATED, "UNAUTHENTICATED")
        if admin and not self.principal.is_admin:
            raise refused("this needs an admin key", "FORBIDDEN")
        return self.principal

    async def admit(self, connection: HTTPConnection, key: str | None) -> None:
        """Check the key (and count it against the key's rate, as REST does)."""
        try:
            self.principal = await admitted(connection, key)  # type: ignore[arg-type]
        except HTTPException as exc:
            self.principal, self.refusal = None, as_graphql_error(exc, None)


def bearer(value: Any) -> str | None:
    """The key in "Bearer <key>" (or the bare key, as some WebSocket clients send it)."""
    if not isinstance(value, str) or not value.strip():
        return None
    scheme, _, rest = value.strip().partition(" ")
    return rest.strip() if scheme.lower() == "bearer" and rest.strip() else (value.strip() if " " not in value.strip() else None)


async def context_getter(connection: HTTPConnection) -> GraphContext:
    """HTTP: the key comes with the request. WebSockets: with connection_init (api.graph.router checks it there)."""
    context = GraphContext(connection.app.state, None, None)
    if connection.scope["type"] == "http":
        await context.admit(connection, bearer(connection.headers.get("authorization")))
    return context


@asynccontextmanager
async def service(info: Info[GraphContext, Any], *, admin: bool = False, arg: str | None = None) -> AsyncIterator[Context]:
    """A resolver's call into the service layer: the guard, a database session of its own, and the
    refusals as GraphQL errors (field paths under `arg`, the argument the input came in)."""
    context = info.context
    principal = context.caller(admin=admin)
    state = context.state
    try:
        async with state.sessions() as session:
            yield Context(
                principal=principal, session=session, settings=state.settings, temporal=state.temporal,
                templates=state.templates, secrets=state.secrets, blobs=state.blobs,
                flags=state.flags,
            )
    except Exception as exc:
        error = as_graphql_error(exc, arg)
        if error is None:
            raise
        raise error from None


def checked(arg: str | None, build: Any, *args: Any, **kwargs: Any) -> Any:
    """Validate an input with the REST body's pydantic model: its errors come back as BAD_USER_INPUT under `arg`."""
    try:
        return build(*args, **kwargs)
    except (ValidationError, Invalid) as exc:
        raise as_graphql_error(exc, arg) from None
