"""The event feed for callers: pages of it, and live streams that wait for new events.

A user sees the events of their own emails; admins see all (as api/services/emails.py's `visible_to`)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.services.context import Context
from api.services.errors import NotFound, invalid
from mailqueue.accounts import Principal
from mailqueue.events import (
    Cursor,
    FeedEvent,
    FeedFilter,
    FeedPage,
    FeedSignal,
    read_feed,
)
from mailqueue.models import Email

# Events a stream reads at a time: a reconnect far behind catches up in pages of this size.
STREAM_BATCH = 200
_EMAIL_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def cursor(text: str | None, loc: tuple[str, str]) -> Cursor:
    try:
        return Cursor.parse(text)
    except ValueError as exc:
        raise invalid(loc, str(exc), value=text) from None


def feed_filter(principal: Principal, *, email_id: str | None = None, types: Sequence[str] = ()) -> FeedFilter:
    return FeedFilter(sender_id=principal.id, everyone=principal.is_admin, email_id=email_id, types=tuple(types))


async def page(ctx: Context, after: str | None, types: Sequence[str], limit: int) -> FeedPage:
    """One page of the feed after `after`, oldest first."""
    return await read_feed(ctx.session, feed_filter(ctx.principal, types=types), cursor(after, ("query", "after")), limit)


async def open_stream(
    state: Any, principal: Principal, *, after: str | None, last_event_id: str | None, types: Sequence[str],
    email_id: str | None = None,
) -> AsyncIterator[FeedEvent]:
    """The feed from where the client left it, then every new event as it commits; endless.

    Last-Event-ID (sent by a reconnecting client) wins over `after` (which stays in the URL it
    reconnects to). Refusals (a bad cursor, an email that is not the caller's) come before the
    stream starts, so they are ordinary 4xx answers."""
    start = cursor(last_event_id, ("header", "Last-Event-ID")) if last_event_id else cursor(after, ("query", "after"))
    sessions: async_sessionmaker[AsyncSession] = state.sessions
    if email_id is not None:
        async with sessions() as session:
            email = await session.get(Email, email_id) if _EMAIL_ID.match(email_id) else None
        if email is None or not principal.may_see(email.sender_type, email.sender_id):
            raise NotFound(f"no email with id {email_id!r}")
    where = feed_filter(principal, email_id=email_id, types=types)
    return _follow(sessions, state.event_signal, where, start)


async def _follow(
    sessions: async_sessionmaker[AsyncSession], signal: FeedSignal, where: FeedFilter, after: Cursor,
) -> AsyncIterator[FeedEvent]:
    """Read, hand out, wait for the signal; a database connection only while reading."""
    await signal.start()
    while True:
        woken = signal.waiter()  # before reading: a commit during the read wakes the next wait
        async with sessions() as session:
            got = await read_feed(session, where, after, STREAM_BATCH)
        for event in got.events:
            yield event
        after = got.next
        if got.more:
            continue
        # Rows of a transaction that started before a still-running one wait for it to end; that
        # end may bring no notification of its own, so look again shortly.
        timeout = signal.poll_seconds if got.held else None
        try:
            await asyncio.wait_for(woken.wait(), timeout)
        except TimeoutError:
            pass
