"""The event feed: every email event in one order with a cursor, and the signal that wakes its readers.

Every email_events row gets a feed row from a database trigger (migration 0007), whichever code
wrote it. The feed's order is (xid, seq): `seq` is taken when the row is inserted, `xid` is the
inserting transaction. On PostgreSQL, transactions commit in any order, so a reader that saw seq
102 could later find 101; ordering by (xid, seq) and handing out only rows whose transaction is
older than every transaction still running (`pg_snapshot_xmin`) makes the handed-out part of
the feed final: a row that appears later always sorts after every row already handed out. On
SQLite there is one writer at a time, seq order is commit order, and xid is always 0.

The cursor on the wire is "<xid>-<seq>": opaque to clients, who pass back the last one they saw.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from mailqueue.config import Settings
from mailqueue.contracts import SenderType
from mailqueue.models import Email, EmailEvent, EmailEventFeed

log = logging.getLogger("mailqueue.events")

# The channel the feed trigger notifies on PostgreSQL (migration 0007 names it too).
CHANNEL = "mailqueue_events"

CURSOR_PATTERN = r"^[0-9]{1,19}-[0-9]{1,19}$"
_CURSOR = re.compile(CURSOR_PATTERN)
START = (0, 0)  # before every event
# Every transaction older than this one has ended: its rows in the feed are final.
_XMIN = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"


@dataclass(frozen=True)
class Cursor:
    xid: int
    seq: int

    @classmethod
    def parse(cls, text: str | None) -> Cursor:
        """The cursor a client passed back; ValueError for anything this feed never handed out."""
        if text is None or text == "":
            return cls(*START)
        if not _CURSOR.match(text):
            raise ValueError("not a cursor of this feed (expected <number>-<number>, as handed out)")
        xid, seq = (int(part) for part in text.split("-"))
        if max(xid, seq) >= 2**63:
            raise ValueError("not a cursor of this feed (number too large)")
        return cls(xid, seq)

    def __str__(self) -> str:
        return f"{self.xid}-{self.seq}"


@dataclass(frozen=True)
class FeedEvent:
    """One event as the feed hands it out (never the email's content)."""

    cursor: Cursor
    email_id: str
    event: str
    status: str | None
    attempt: int | None
    detail: str | None
    created_at: datetime
    event_id: str = ""  # the email_events row's id (outbound webhooks send it as webhook-id)


@dataclass(frozen=True)
class FeedPage:
    events: Sequence[FeedEvent]
    next: Cursor  # where to go on from: the last event's cursor, or the one asked with
    more: bool  # a full page: ask again at once
    held: bool  # rows of transactions older ones are still running are waiting: ask again soon


@dataclass(frozen=True)
class FeedFilter:
    """Which events: those of the emails a sender sees (None: all, for admins), of one email, of these types."""

    sender_id: str | None = None
    everyone: bool = False
    email_id: str | None = None
    types: Sequence[str] = ()


def _feed_select(*extra: Any) -> sa.Select[Any]:
    """The feed's rows with their events' fields (never the email's content)."""
    feed, events = EmailEventFeed.__table__, EmailEvent.__table__  # type: ignore[attr-defined]
    return sa.select(
        feed.c.xid, feed.c.seq, feed.c.email_id, feed.c.event_id, events.c.event, events.c.status, events.c.attempt, events.c.detail,
        events.c.created_at, *extra,
    ).join(events, events.c.id == feed.c.event_id)


def _event(row: Any) -> FeedEvent:
    return FeedEvent(
        Cursor(row.xid, row.seq), row.email_id, row.event, row.status, row.attempt, row.detail, row.created_at,
        event_id=row.event_id,
    )


async def read_feed(session: AsyncSession, where: FeedFilter, after: Cursor, limit: int) -> FeedPage:
    """Events after `after`, in feed order, at most `limit` of them: only final rows (see the module doc)."""
    feed, events, emails = EmailEventFeed.__table__, EmailEvent.__table__, Email.__table__  # type: ignore[attr-defined]
    conn = await session.connection()
    postgres = conn.dialect.name == "postgresql"
    # Computed in the same statement as the rows, so from the same snapshot.
    horizon = sa.literal_column(_XMIN) if postgres else sa.literal(2**62)
    query = (
        _feed_select(horizon.label("horizon"))
        .where(sa.tuple_(feed.c.xid, feed.c.seq) > sa.tuple_(sa.literal(after.xid), sa.literal(after.seq)))
        .order_by(feed.c.xid, feed.c.seq)
        .limit(limit)
    )
    if not where.everyone:
        query = query.join(emails, emails.c.id == feed.c.email_id).where(
            emails.c.sender_type == SenderType.USER.value, emails.c.sender_id == where.sender_id,
        )
    if where.email_id is not None:
        query = query.where(feed.c.email_id == where.email_id)
    if where.types:
        query = query.where(events.c.event.in_(list(where.types)))
    rows = (await conn.execute(query)).all()
    await session.commit()  # nothing held between pages: a waiting stream holds no connection
    # (xid, seq) order puts every row of a still-unsafe transaction after all safe ones.
    out = [_event(row) for row in rows if row.xid < row.horizon]
    return FeedPage(
        events=out, next=out[-1].cursor if out else after, more=len(rows) == limit and len(out) == len(rows),
        held=len(out) < len(rows),
    )


async def find_event(session: AsyncSession, event_id: str) -> FeedEvent | None:
    """One event of the feed by its email event's id (a webhook redelivery sends it again as it was)."""
    feed = EmailEventFeed.__table__  # type: ignore[attr-defined]
    row = (await (await session.connection()).execute(_feed_select().where(feed.c.event_id == event_id))).first()
    return None if row is None else _event(row)


async def _max_seq(session: AsyncSession) -> int:
    feed = EmailEventFeed.__table__  # type: ignore[attr-defined]
    return int((await session.execute(sa.select(sa.func.max(feed.c.seq)))).scalar() or 0)


async def latest_seq(session: AsyncSession) -> int:
    value = await _max_seq(session)
    await session.commit()
    return value


async def feed_end(session: AsyncSession) -> Cursor:
    """A cursor behind which every event committed so far lies: a reader starting there gets what
    happens from now on (on PostgreSQL also the events of transactions still running)."""
    conn = await session.connection()
    if conn.dialect.name == "postgresql":
        return Cursor(int((await conn.execute(sa.select(sa.literal_column(_XMIN)))).scalar() or 0), 0)
    return Cursor(START[0], await _max_seq(session))


@dataclass(frozen=True)
class Committed:
    """The transactions that had committed at one moment (a PostgreSQL snapshot): an event of one of
    them happened before that moment, though its cursor may lie after feed_end's (the horizon waits
    for every transaction older than the oldest one still running)."""

    xmin: int
    xmax: int
    running: frozenset[int]

    def __contains__(self, cursor: Cursor) -> bool:
        return cursor.xid < self.xmin or (cursor.xid < self.xmax and cursor.xid not in self.running)


async def feed_now(session: AsyncSession) -> tuple[Cursor, Committed | None]:
    """Where a reader of what happens from now on starts, and (PostgreSQL) what had committed by now:
    the events after the cursor whose transaction is in `Committed` are from before now. On SQLite
    the cursor alone draws the line (None)."""
    conn = await session.connection()
    if conn.dialect.name != "postgresql":
        return await feed_end(session), None
    snapshot = str((await conn.execute(sa.select(sa.literal_column("pg_current_snapshot()::text")))).scalar())
    xmin, xmax, running = snapshot.split(":")
    committed = Committed(int(xmin), int(xmax), frozenset(int(x) for x in running.split(",") if x))
    return Cursor(committed.xmin, 0), committed


class FeedSignal:
    """Wakes every stream of this process waiting for new events.

    On PostgreSQL one LISTENing connection per process (woken by the trigger's NOTIFY at each
    commit that added events); on SQLite, which has no notifications, one short poll per process
    of the feed's highest seq. Streams wait on the signal without a database connection and read
    the feed themselves when woken."""

    def __init__(self, database_url: str, engine: AsyncEngine, poll_seconds: float, retry_seconds: float) -> None:
        self._url = make_url(database_url.replace("postgres://", "postgresql://", 1))
        self._engine = engine
        self.poll_seconds = poll_seconds
        self.retry_seconds = retry_seconds  # the wait between reconnects of the listener
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_settings(cls, settings: Settings, engine: AsyncEngine) -> FeedSignal:
        return cls(settings.database_url, engine, settings.events_poll_seconds, retry_seconds=1.0)

    def waiter(self) -> asyncio.Event:
        """The event the next wake sets: take it BEFORE reading the feed, so a wake that comes
        during the read is not lost."""
        return self._woken

    def wake(self) -> None:
        woken, self._woken = self._woken, asyncio.Event()
        woken.set()

    async def start(self) -> None:
        """Start listening (or polling), once: its users call this when they first wait, so a process
        that never streams holds no listener connection and runs no poll."""
        if self._task is not None:
            return
        postgres = self._url.get_backend_name() == "postgresql"
        self._task = asyncio.create_task(self._listen() if postgres else self._poll(), name="event-feed-signal")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.wake()

    async def _listen(self) -> None:
        conninfo = self._url.set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            try:
                # TCP keepalives: a connection that died silently (no FIN) is noticed, and replaced, within a minute.
                async with await psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True, connect_timeout=10, keepalives=1, keepalives_idle=30, keepalives_interval=10,
                    keepalives_count=3,
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.wake()  # notifications may have been missed while (re)connecting
                    async for _ in conn.notifies():
                        self.wake()
            except psycopg.Error as exc:
                log.warning("event feed listener lost its connection (%s); reconnecting", type(exc).__name__)
                self.wake()  # streams read once more: nothing waits on a notification that may never come
                await asyncio.sleep(self.retry_seconds)

    async def _poll(self) -> None:
        seen: int | None = None
        while True:
            try:
                async with AsyncSession(self._engine) as session:
                    latest = await latest_seq(session)
            except (sa.exc.SQLAlchemyError, OSError) as exc:
                log.warning("event feed poll failed (%s)", type(exc).__name__)
            else:
                if latest != seen:
                    seen = latest
                    self.wake()
            await asyncio.sleep(self.poll_seconds)
