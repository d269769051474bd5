"""/v1/events: the feed of email events, paged or live (server-sent events)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import ContextDep, PrincipalDep
from api.schemas.events import EVENT_TYPE_PATTERN, FeedEventOut, FeedPageOut
from api.services import events
from mailqueue.events import CURSOR_PATTERN, FeedEvent

router = APIRouter(tags=["events"])

After = Annotated[str | None, Query(pattern=CURSOR_PATTERN, description="A cursor handed out earlier: only what came after it")]
Types = Annotated[list[Annotated[str, Query(pattern=EVENT_TYPE_PATTERN)]] | None, Query(alias="type", max_length=20, description="Only these event types")]
LastEventId = Annotated[
    str | None,
    Header(alias="Last-Event-ID", pattern=CURSOR_PATTERN, description="Sent by a reconnecting client: goes on after it (wins over `after`)"),
]
STREAM = {
    200: {
        "description": "Server-sent events: `id:` is the event's cursor, `data:` the event as JSON (as in /v1/events); comment lines are heartbeats",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
}


@router.get("/v1/events", response_model=FeedPageOut, summary="The feed of email events, oldest first, after a cursor")
async def list_events(
    ctx: ContextDep, after: After = None, types: Types = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> FeedPageOut:
    return FeedPageOut.of(await events.page(ctx, after, types or [], limit))


def _stream(request: Request, feed: AsyncIterator[FeedEvent]) -> EventSourceResponse:
    async def messages() -> AsyncIterator[ServerSentEvent]:
        async for event in feed:
            yield ServerSentEvent(id=str(event.cursor), data=FeedEventOut.of(event).model_dump_json())

    return EventSourceResponse(messages(), ping=request.app.state.settings.events_heartbeat_seconds)


@router.get(
    "/v1/events/stream", response_class=EventSourceResponse, responses=STREAM,
    summary="Every event as it happens (server-sent events), from a cursor or Last-Event-ID",
)
async def stream_events(
    request: Request, principal: PrincipalDep, after: After = None, types: Types = None, last_event_id: LastEventId = None,
) -> Any:
    feed = await events.open_stream(request.app.state, principal, after=after, last_event_id=last_event_id, types=types or [])
    return _stream(request, feed)


@router.get(
    "/v1/emails/{email_id}/events/stream", response_class=EventSourceResponse, responses={**STREAM, 404: {"description": "No such email"}},
    summary="One email's events as they happen (server-sent events); stays open for later events (retries, provider events)",
)
async def stream_email_events(
    email_id: str, request: Request, principal: PrincipalDep, after: After = None, types: Types = None,
    last_event_id: LastEventId = None,
) -> Any:
    feed = await events.open_stream(
        request.app.state, principal, after=after, last_event_id=last_event_id, types=types or [], email_id=email_id,
    )
    return _stream(request, feed)
