"""The event feed: every event of every email in one order, paged (/v1/events) or live (server-sent
events), each caller seeing only their own emails' events; a cursor that never skips an event,
even while many transactions commit out of order; streams that survive a reconnect and cross
API processes (LISTEN/NOTIFY on PostgreSQL, a short poll on SQLite)."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from alembic import command

from mailqueue.db import alembic_config, create_engine, migrate, sessionmaker
from mailqueue.email_store import queued_event, record_from_spec
from mailqueue.events import Cursor, FeedFilter, read_feed
from mailqueue.models import Email, EmailEvent, utcnow
from tests.conftest import scratch_database
from tests.helpers import (
    EMAIL_SETTLES,
    ApiProcess,
    Sender,
    Stack,
    eventually,
    make_spec,
    new_user,
    wait_status,
)

# Heartbeats of the second API process: short, so an idle stream shows some within the test.
HEARTBEAT_SECONDS = 0.3


@pytest.fixture(scope="module")
async def second(stack: Stack) -> AsyncIterator[str]:
    """Another API process on the same database and Temporal: streams are read from it while emails go through the first."""
    settings = stack.settings.model_copy(update={"events_heartbeat_seconds": HEARTBEAT_SECONDS})
    async with ApiProcess(settings, stack.tmp / "api-2.log") as api:
        yield api.url


def order(event: dict[str, Any]) -> Cursor:
    return Cursor.parse(event["cursor"])


def key_of(c: Cursor) -> tuple[int, int]:
    return (c.xid, c.seq)


async def whole_feed(http: httpx.AsyncClient, after: str | None = None, **params: Any) -> tuple[list[dict[str, Any]], str | None]:
    """Every event the caller sees after `after`, a page at a time, and the cursor to go on from."""
    seen: list[dict[str, Any]] = []
    while True:
        page = await http.get("/v1/events", params={**({"after": after} if after else {}), **params})
        assert page.status_code == 200, page.text
        body = page.json()
        seen += body["events"]
        after = body["next"]
        if not body["more"]:
            return seen, after


class Subscription:
    """A server-sent event stream read as a client reads it: messages (`id:` and JSON `data:`) and comment lines."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()
        self.events: list[dict[str, Any]] = []
        self.comments: list[str] = []

    async def _message(self) -> None:
        fields: dict[str, str] = {}
        async for line in self._lines:
            if line.startswith(":"):
                self.comments.append(line)
            elif line:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
            elif fields:
                break
        else:
            raise AssertionError("the stream ended")
        data = json.loads(fields["data"])
        assert fields["id"] == data["cursor"], fields  # the SSE id is the cursor: what Last-Event-ID sends back
        self.events.append(data)

    async def heartbeats(self, count: int) -> None:
        """Read `count` comment lines, and nothing else: the stream is idle."""
        seen = 0
        while seen < count:
            try:
                async with asyncio.timeout(EMAIL_SETTLES):
                    line = await anext(self._lines)
            except TimeoutError:
                raise AssertionError(f"no heartbeat within {EMAIL_SETTLES:g}s") from None
            assert not line or line.startswith(":"), f"a message on an idle stream: {line!r}"
            seen += line.startswith(":")

    async def until(self, done: Callable[[list[dict[str, Any]]], bool], what: str, timeout: float = EMAIL_SETTLES) -> list[dict[str, Any]]:
        """Read until `done(events)`; the deadline restarts with every message (a busy machine is slow, not stuck)."""
        while not done(self.events):
            try:
                async with asyncio.timeout(timeout):
                    await self._message()
            except TimeoutError:
                raise AssertionError(f"not within {timeout:g}s of the last message: {what}; got {self.events}") from None
        return self.events


@asynccontextmanager
async def subscribe(base_url: str, key: str, path: str, **kwargs: Any) -> AsyncIterator[Subscription]:
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=httpx.Timeout(30)) as http:
        async with http.stream("GET", path, **kwargs) as response:
            assert response.status_code == 200, (await response.aread()).decode()
            assert response.headers["content-type"].startswith("text/event-stream")
            yield Subscription(response)


def all_sent(ids: list[str]) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: {e["email_id"] for e in events if e["event"] == "sent"} >= set(ids)


async def story(http: httpx.AsyncClient, email_id: str) -> list[str]:
    """An email's events as GET /v1/emails/{id} tells them."""
    return [e["event"] for e in (await http.get(f"/v1/emails/{email_id}")).json()["events"]]


def assert_feed_order(events: list[dict[str, Any]]) -> None:
    """Cursors strictly increase: no event twice, none out of order."""
    cursors = [key_of(order(e)) for e in events]
    assert cursors == sorted(set(cursors)), cursors


async def send(user: Sender, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        r = await user.http.post("/v1/emails", json=user.mail())
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


# --- paging -----------------------------------------------------------------------------


async def test_pages_after_a_cursor_by_type_and_limit_each_user_seeing_only_their_own(stack: Stack, sessions: Any) -> None:
    _, mark = await whole_feed(stack.http, limit=1000)  # the admin's end of the feed before this test
    async with new_user(stack, sessions) as ann, new_user(stack, sessions) as bob:
        anns, bobs = await send(ann, 2), await send(bob, 1)
        for email_id in anns:
            await wait_status(ann.http, email_id, "sent")
        await wait_status(bob.http, bobs[0], "sent")

        mine, _ = await whole_feed(ann.http)
        assert {e["email_id"] for e in mine} == set(anns)
        assert_feed_order(mine)
        for email_id in anns:  # every event, in the order the email tells its story
            assert [e["event"] for e in mine if e["email_id"] == email_id] == await story(ann.http, email_id)
        first = mine[0]
        assert set(first) == {"cursor", "email_id", "event", "status", "attempt", "detail", "created_at"}  # never the body

        # One at a time, each page going on from the last: the same events, none twice.
        paged, after = [], None
        while True:
            body = (await ann.http.get("/v1/events", params={"limit": 1, **({"after": after} if after else {})})).json()
            paged += body["events"]
            if not body["events"]:
                assert body["next"] == after and not body["more"]
                break
            assert len(body["events"]) == 1 and body["more"]
            after = body["next"]
        assert paged == mine

        # Only some types; after a cursor, only what came later.
        sent, _ = await whole_feed(ann.http, type="sent")
        assert [e["email_id"] for e in sent] == [e["email_id"] for e in mine if e["event"] == "sent"] and len(sent) == 2
        both, _ = await whole_feed(ann.http, type=["queued", "sent"])
        assert {e["event"] for e in both} == {"queued", "sent"} and len(both) == 4
        later, _ = await whole_feed(ann.http, after=first["cursor"])
        assert later == mine[1:]

        theirs, _ = await whole_feed(bob.http)
        assert {e["email_id"] for e in theirs} == set(bobs)
        everyone, _ = await whole_feed(stack.http, after=mark)  # an admin sees all
        assert {e["email_id"] for e in everyone} >= set(anns + bobs)
        assert [e for e in everyone if e["email_id"] in anns] == mine


async def test_bad_cursors_and_types_are_refused(stack: Stack, second: str, sessions: Any) -> None:
    async with new_user(stack, sessions) as ann, new_user(stack, sessions) as bob:
        for params in ({"after": "12"}, {"after": "x-1"}, {"after": "99999999999999999999-1"}, {"after": "9223372036854775808-1"},
                       {"type": "Sent!"}, {"limit": 0}, {"limit": 1001}):
            r = await ann.http.get("/v1/events", params=params)
            assert r.status_code == 422 and "detail" in r.json(), (params, r.text)
        r = await ann.http.get("/v1/events/stream", headers={"Last-Event-ID": "nonsense"})
        assert r.status_code == 422, r.text
        assert (await ann.http.get("/v1/events/stream", headers={"Authorization": "Bearer wrong"})).status_code == 401
        (email_id,) = await send(ann, 1)
        for who, path in ((bob, f"/v1/emails/{email_id}/events/stream"), (ann, f"/v1/emails/{uuid.uuid4()}/events/stream"),
                          (ann, "/v1/emails/not-an-id/events/stream")):
            r = await who.http.get(path)
            assert r.status_code == 404, r.text


# --- live -------------------------------------------------------------------------------


async def test_a_stream_on_another_api_process_sees_every_status_change_in_order(stack: Stack, second: str, sessions: Any) -> None:
    async with new_user(stack, sessions) as ann, new_user(stack, sessions) as bob:
        async with subscribe(second, ann.key, "/v1/events/stream") as live:
            ids = await send(ann, 5)  # through the first process
            await send(bob, 1)  # not Ann's: never on her stream
            events = await live.until(all_sent(ids), "every email sent")
        assert_feed_order(events)
        assert {e["email_id"] for e in events} == set(ids)
        for email_id in ids:
            told = [e["event"] for e in events if e["email_id"] == email_id]
            assert told == await story(ann.http, email_id) and told[0] == "queued" and told[-1] == "sent"
        assert events == (await whole_feed(ann.http))[0]  # live and paged agree, event for event


async def test_reconnecting_with_last_event_id_loses_nothing_and_repeats_nothing(stack: Stack, second: str, sessions: Any) -> None:
    async with new_user(stack, sessions) as ann:
        async with subscribe(second, ann.key, "/v1/events/stream") as live:
            first = await send(ann, 3)
            before = list(await live.until(lambda events: len(events) >= 4, "four events"))
        # Disconnected: more happens meanwhile.
        more = await send(ann, 3)
        # A reconnecting EventSource keeps its URL (here ?after= the start) and sends Last-Event-ID: that wins.
        start = before[0]["cursor"]
        async with subscribe(second, ann.key, "/v1/events/stream", params={"after": start}, headers={"Last-Event-ID": before[-1]["cursor"]}) as live:
            after = await live.until(
                lambda events: all_sent(first + more)(before + events), "every email sent, across the reconnect",
            )
        joined = before + after
        assert_feed_order(joined)
        assert joined == (await whole_feed(ann.http))[0]


async def test_one_emails_stream_tells_its_story_with_heartbeats_while_idle(stack: Stack, second: str, sessions: Any) -> None:
    async with new_user(stack, sessions) as ann:
        later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
        scheduled = (await ann.http.post("/v1/emails", json=ann.mail(send_at=later))).json()["id"]
        (other,) = await send(ann, 1)
        async with subscribe(second, ann.key, f"/v1/emails/{scheduled}/events/stream") as live:
            await live.until(lambda events: any(e["event"] == "scheduled" for e in events), "the email scheduled")
            await wait_status(ann.http, other, "sent")  # another email's events go by, not on this stream
            # Idle: nothing happens to this email, and comment lines keep the connection busy.
            await live.heartbeats(2)
            assert (await ann.http.post(f"/v1/emails/{scheduled}/cancel", json={})).status_code == 200
            events = await live.until(lambda events: events[-1]["event"] == "cancelled", "the email cancelled")
        assert {e["email_id"] for e in events} == {scheduled}
        assert [e["event"] for e in events] == await story(ann.http, scheduled)


# --- the feed's table ----------------------------------------------------------------------


AFTER_0006 = {"attachments"}  # emails' columns added by later migrations (0014)


async def test_events_written_before_the_feed_existed_get_cursors_in_their_order(tmp_path: Path) -> None:
    """Migration 0007 gives existing events cursors, oldest first; after it, the trigger adds new ones."""
    with scratch_database(tmp_path) as url:
        command.downgrade(alembic_config(url), "0006")
        engine = create_engine(url)
        sessions = sessionmaker(engine)
        try:
            spec = make_spec()
            async with sessions() as session:  # the columns the table had then (the model has grown since)
                record, columns = record_from_spec(spec), sa.inspect(Email).column_attrs
                values = {c.columns[0].name: getattr(record, c.key) for c in columns if c.key not in AFTER_0006}
                await (await session.connection()).execute(sa.insert(Email.__table__).values(**values))  # type: ignore[attr-defined]
                session.add(queued_event(spec.email_id, "accepted"))
                await session.commit()
            async with sessions() as session:
                session.add(EmailEvent(id=str(uuid.uuid4()), email_id=spec.email_id, event="scheduled", created_at=utcnow() + timedelta(seconds=1)))
                await session.commit()
            await asyncio.to_thread(migrate, url)
            async with sessions() as session:
                session.add(EmailEvent(id=str(uuid.uuid4()), email_id=spec.email_id, event="cancelled", created_at=utcnow() + timedelta(seconds=2)))
                await session.commit()

            async def whole() -> Any:  # once no older transaction is running (other tests' may be, on the same server)
                async with sessions() as session:
                    page = await read_feed(session, FeedFilter(everyone=True), Cursor.parse(None), 10)
                return not page.held and page

            page = await eventually(whole, timeout=60, what="the feed still holds events back")
        finally:
            await engine.dispose()
    assert [e.event for e in page.events] == ["queued", "scheduled", "cancelled"]


# --- the cursor never skips ----------------------------------------------------------------


async def test_the_cursor_never_skips_an_event_while_transactions_commit_out_of_order(stack: Stack, database_url: str) -> None:
    """Many writers, each holding its transaction open a random while after inserting (so later
    cursors often commit first), and one reader following the cursor as fast as it can: the reader
    sees every event, in the order the whole feed has once all have committed."""
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    parent = (await stack.http.post("/v1/emails", json={"to": ["a@example.com"], "subject": "s", "text": "t", "send_at": later})).json()["id"]
    engine = create_engine(database_url)
    sessions = sessionmaker(engine)
    where = FeedFilter(everyone=True, email_id=parent, types=("probe",))
    writers, each = 8, 25
    written: set[str] = set()
    finished = asyncio.Event()

    async def writer(number: int) -> None:
        rng = random.Random(number)
        for _ in range(each):
            event_id = str(uuid.uuid4())
            async with sessions() as session:
                session.add(EmailEvent(id=event_id, email_id=parent, event="probe"))
                await session.flush()  # the row, its feed row and its cursor exist; the commit comes later
                await asyncio.sleep(rng.random() * 0.02)
                await session.commit()
            written.add(event_id)

    followed: list[Cursor] = []

    async def reader() -> None:
        after = Cursor.parse(None)
        while True:
            done = finished.is_set()  # read once more after the last commit
            async with sessions() as session:
                page = await read_feed(session, where, after, 50)
            followed.extend(e.cursor for e in page.events)
            after = page.next
            if done and not page.more and not page.held:
                return
            await asyncio.sleep(0)

    try:
        follower = asyncio.create_task(reader())
        await asyncio.gather(*(writer(n) for n in range(writers)))
        finished.set()
        await asyncio.wait_for(follower, EMAIL_SETTLES)
        async with sessions() as session:
            everything = await read_feed(session, where, Cursor.parse(None), writers * each + 1)
    finally:
        await engine.dispose()
    assert len(written) == writers * each == len(everything.events)
    assert [key_of(c) for c in followed] == [key_of(e.cursor) for e in everything.events]
