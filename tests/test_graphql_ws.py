"""The GraphQL subscription onEmailStatusChanged over WebSockets (graphql-transport-ws), with gql's
WebsocketsTransport against the real stack (uvicorn API, Temporal worker, SMTP sink).

It proves: a subscription starts with a SUBSCRIBED message and then gets one CHANGED message per
status change in the feed's order (QUEUED -> SENT for a sent email, QUEUED -> SCHEDULED -> CANCELLED
for a scheduled one cancelled in time), `statuses` filters them, `emailId` narrows them to one email
(whose current status SUBSCRIBED carries), a user sees only their own emails (another user's email
is NOT_FOUND, as an unknown one), a connection without a valid key is closed with 4403 before any
data flows, queries and mutations work over the same socket, and a new subscription after a
reconnect starts afresh: what changed meanwhile is not replayed (emailHistory has it), not even a
change committed just before subscribing while an older transaction is still open (PostgreSQL's feed
horizon waits for that one; the subscription skips what its start snapshot saw committed)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import websockets
from gql import Client, GraphQLRequest, gql
from gql.client import AsyncClientSession
from gql.transport.exceptions import TransportConnectionFailed, TransportQueryError
from gql.transport.websockets import WebsocketsTransport

from tests.conftest import PG_ADMIN
from tests.helpers import EMAIL_SETTLES, KEY, Stack, eventually, new_user, wait_status
from tests.helpers import email as email_body

SUBSCRIBE = gql("""
subscription Watch($emailId: ID, $statuses: [EmailStatus!]) {
  onEmailStatusChanged(emailId: $emailId, statuses: $statuses) {
    kind emailId status event attempt detail at cursor
  }
}
""")
EMAIL_STATUS = gql("query Status($id: ID!) { emailStatus(id: $id) { id status } }")
EMAIL_HISTORY = gql("query History($id: ID!) { emailHistory(id: $id) { event status } }")
SEND_EMAIL = gql("mutation Send($input: SendEmailInput!) { sendEmail(input: $input) { id status } }")


def ws_url(stack: Stack) -> str:
    return str(stack.http.base_url).rstrip("/").replace("http://", "ws://", 1) + "/graphql"


def transport(stack: Stack, payload: dict[str, Any]) -> WebsocketsTransport:
    return WebsocketsTransport(
        url=ws_url(stack), subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL], init_payload=payload,
    )


@asynccontextmanager
async def ws_session(stack: Stack, key: str = KEY) -> AsyncIterator[AsyncClientSession]:
    """One WebSocket connection, authenticated in connection_init's payload."""
    async with Client(transport=transport(stack, {"Authorization": f"Bearer {key}"})) as session:
        yield session


def cursor_key(cursor: str) -> tuple[int, int]:
    xid, seq = cursor.split("-")
    return int(xid), int(seq)


class Watch:
    """One subscription running in a task: every message it got, in the order it got them."""

    def __init__(self, session: AsyncClientSession, variables: dict[str, Any]) -> None:
        self.messages: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._run(session, GraphQLRequest(SUBSCRIBE, variable_values=variables)))

    async def _run(self, session: AsyncClientSession, request: GraphQLRequest) -> None:
        async for data in session.subscribe(request):
            self.messages.append(data["onEmailStatusChanged"])

    def of(self, email_id: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["emailId"] == email_id]

    def statuses(self, email_id: str) -> list[str]:
        return [m["status"] for m in self.of(email_id) if m["kind"] == "CHANGED"]

    async def until(self, check: Callable[[], Any], what: str) -> Any:
        def probe() -> Any:
            if self.task.done():  # ended or failed: what it got will not grow
                self.task.result()
                raise AssertionError(f"the subscription ended: {self.messages}")
            return check()

        return await eventually(probe, timeout=EMAIL_SETTLES, what=lambda: f"{what}; got {self.messages}")

    async def reaches(self, email_id: str, status: str) -> list[str]:
        return await self.until(lambda: status in self.statuses(email_id) and self.statuses(email_id),
                                f"no {status} for {email_id}")

    async def stop(self) -> None:
        self.task.cancel()
        with suppress(asyncio.CancelledError):
            await self.task


@asynccontextmanager
async def watching(session: AsyncClientSession, **variables: Any) -> AsyncIterator[Watch]:
    """A subscription, once its SUBSCRIBED message came (so nothing after this point is missed)."""
    watch = Watch(session, variables)
    try:
        await watch.until(lambda: watch.messages, "no first message")
        first = watch.messages[0]
        assert first["kind"] == "SUBSCRIBED", first
        assert first["emailId"] == variables.get("emailId") and first["event"] is None and first["cursor"], first
        yield watch
    finally:
        await watch.stop()


async def final_in_feed(http: Any, email_id: str, event: str) -> None:
    """Wait until GET /v1/events hands out the email's `event`: it has happened (the workflow records
    some events after the API answers), so a subscription started from here on must not deliver it."""

    async def listed() -> bool:
        after = None
        while True:
            params = {"type": event, "limit": 1000} | ({"after": after} if after else {})
            resp = await http.get("/v1/events", params=params)
            assert resp.status_code == 200, resp.text
            page = resp.json()
            if any(e["email_id"] == email_id for e in page["events"]):
                return True
            if not page["more"]:
                return False
            after = page["next"]

    await eventually(listed, timeout=EMAIL_SETTLES, interval=0.1, what=f"the feed never handed out {event} of {email_id}")


async def scheduled_email(http: Any, body: dict[str, Any]) -> str:
    """An email due in an hour, once its `scheduled` event is final in the feed (its record says scheduled from the start)."""
    resp = await http.post("/v1/emails", json=body | {"send_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat()})
    assert resp.status_code == 202 and resp.json()["status"] == "scheduled", resp.text
    email_id = resp.json()["id"]
    await final_in_feed(http, email_id, "scheduled")
    return email_id


def codes(error: TransportQueryError) -> list[str]:
    return [e.get("extensions", {}).get("code") for e in error.errors or []]


# --- acceptance: what a subscriber sees of an email's life ---------------------------------------


async def test_filtered_subscription_sees_queued_then_sent(stack: Stack) -> None:
    async with ws_session(stack) as session, watching(session, statuses=["QUEUED", "SENT"]) as watch:
        resp = await stack.http.post("/v1/emails", json=email_body(subject="ws filtered"))
        assert resp.status_code == 202, resp.text
        email_id = resp.json()["id"]
        assert await watch.reaches(email_id, "SENT") == ["QUEUED", "SENT"]  # SENDING and the rest filtered out
        assert {m["status"] for m in watch.messages[1:]} <= {"QUEUED", "SENT"}  # of any email
        queued, sent = watch.of(email_id)
        assert (queued["event"], sent["event"]) == ("queued", "sent")
        assert cursor_key(queued["cursor"]) < cursor_key(sent["cursor"])
        assert (await wait_status(stack.http, email_id, "sent"))["status"] == "sent"


async def test_unfiltered_subscription_follows_the_feed_in_its_order(stack: Stack) -> None:
    async with ws_session(stack) as session, watching(session) as watch:
        start = watch.messages[0]["cursor"]
        email_id = (await stack.http.post("/v1/emails", json=email_body(subject="ws unfiltered"))).json()["id"]
        got = await watch.reaches(email_id, "SENT")
        assert got.index("QUEUED") < got.index("SENT"), got

        # Exactly the email's events that carry a status, as REST and the feed record them, in that order.
        async def same_as_recorded() -> bool:
            events = (await stack.http.get(f"/v1/emails/{email_id}")).json()["events"]
            return [(e["event"], e["status"].upper()) for e in events if e["status"]] == [
                (m["event"], m["status"]) for m in watch.of(email_id)
            ]

        await watch.until(same_as_recorded, f"the subscription's statuses of {email_id} differ from its REST events")
        page = (await stack.http.get("/v1/events", params={"after": start, "limit": 1000})).json()
        in_feed = [(e["cursor"], e["status"].upper()) for e in page["events"] if e["email_id"] == email_id and e["status"]]
        assert in_feed == [(m["cursor"], m["status"]) for m in watch.of(email_id)]
        cursors = [cursor_key(m["cursor"]) for m in watch.messages[1:]]
        assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)  # every email's, in feed order


async def test_scheduled_then_cancelled(stack: Stack) -> None:
    async with ws_session(stack) as session, watching(session) as watch:
        send_at = datetime.now(UTC) + timedelta(seconds=30)  # cancelled long before it is due
        resp = await stack.http.post("/v1/emails", json=email_body(subject="ws scheduled", send_at=send_at.isoformat()))
        assert resp.status_code == 202 and resp.json()["status"] == "scheduled", resp.text
        email_id = resp.json()["id"]
        assert await watch.reaches(email_id, "SCHEDULED") == ["QUEUED", "SCHEDULED"]
        cancelled = await stack.http.post(f"/v1/emails/{email_id}/cancel", json={"reason": "ws test"})
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        assert await watch.reaches(email_id, "CANCELLED") == ["QUEUED", "SCHEDULED", "CANCELLED"]
        assert [m["event"] for m in watch.of(email_id)] == ["queued", "scheduled", "cancelled"]
        assert watch.of(email_id)[-1]["detail"] == "ws test"
        recorded = [(e["event"], e["status"]) for e in cancelled.json()["events"]]
        assert recorded == [("queued", "queued"), ("scheduled", "scheduled"), ("cancelled", "cancelled")]


# --- one email ------------------------------------------------------------------------------------


async def test_email_id_subscription_starts_with_its_status_and_sees_only_it(stack: Stack) -> None:
    email_id = await scheduled_email(stack.http, email_body(subject="ws one email"))
    async with ws_session(stack) as session, watching(session, emailId=email_id) as watch:
        assert watch.messages[0]["status"] == "SCHEDULED"  # its status now
        other = (await stack.http.post("/v1/emails", json=email_body(subject="ws another"))).json()["id"]
        await wait_status(stack.http, other, "sent")  # its events are in the feed before the cancel's
        assert (await stack.http.post(f"/v1/emails/{email_id}/cancel")).status_code == 200
        assert await watch.reaches(email_id, "CANCELLED") == ["CANCELLED"]
        assert [m["emailId"] for m in watch.messages] == [email_id, email_id]


# --- isolation ------------------------------------------------------------------------------------


async def test_a_user_sees_only_their_own_emails(stack: Stack, sessions: Any) -> None:
    async with new_user(stack, sessions) as a, new_user(stack, sessions) as b:
        async with ws_session(stack, a.key) as session, watching(session) as watch:
            theirs = (await b.http.post("/v1/emails", json=b.mail(subject="b's"))).json()["id"]
            await wait_status(b.http, theirs, "sent")
            mine = (await a.http.post("/v1/emails", json=a.mail(subject="a's"))).json()["id"]
            assert await watch.reaches(mine, "SENT")  # after b's events in the feed
            assert {m["emailId"] for m in watch.messages[1:]} == {mine}

            for email_id in (theirs, str(uuid.uuid4()), "not-an-id"):
                with pytest.raises(TransportQueryError) as refused:
                    async for _ in session.subscribe(GraphQLRequest(SUBSCRIBE, variable_values={"emailId": email_id})):
                        raise AssertionError(f"a's subscription to {email_id} got a message")
                assert codes(refused.value) == ["NOT_FOUND"], refused.value.errors
            with pytest.raises(TransportQueryError) as refused:
                await session.execute(GraphQLRequest(EMAIL_STATUS, variable_values={"id": theirs}))
            assert codes(refused.value) == ["NOT_FOUND"]

        async with ws_session(stack, b.key) as session, watching(session, emailId=theirs) as watch:
            assert watch.messages[0]["status"] == "SENT"


# --- auth and the socket's other operations -------------------------------------------------------


@pytest.mark.parametrize("payload", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEY}"}],
                         ids=["no key", "wrong key", "not bearer"])
async def test_connection_without_a_valid_key_is_closed_with_4403(stack: Stack, payload: dict[str, str]) -> None:
    with pytest.raises(TransportConnectionFailed) as failed:
        async with Client(transport=transport(stack, payload)) as session:
            raise AssertionError(f"connected without a valid key: {session}")
    closed = failed.value.__cause__
    assert isinstance(closed, websockets.ConnectionClosed) and closed.rcvd is not None, repr(closed)
    assert (closed.rcvd.code, closed.rcvd.reason) == (4403, "Forbidden")

    # On the wire: a subscribe sent right after connection_init gets nothing, the socket is closed.
    async with websockets.connect(ws_url(stack), subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL]) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": "subscription { onEmailStatusChanged { kind } }"}}))
        with pytest.raises(websockets.ConnectionClosed) as ended:
            raise AssertionError(f"the server sent {await ws.recv()!r}")
        assert ended.value.rcvd is not None and ended.value.rcvd.code == 4403

    async with ws_session(stack) as session, watching(session) as watch:  # the same connection with a valid key works
        assert watch.messages[0]["kind"] == "SUBSCRIBED"


async def test_queries_and_mutations_share_the_websocket_with_a_subscription(stack: Stack) -> None:
    async with ws_session(stack) as session, watching(session) as watch:
        sent = await session.execute(GraphQLRequest(SEND_EMAIL, variable_values={"input": email_body(subject="ws mutation")}))
        email_id = sent["sendEmail"]["id"]
        assert sent["sendEmail"]["status"] == "QUEUED"
        assert await watch.reaches(email_id, "SENT")
        status = await session.execute(GraphQLRequest(EMAIL_STATUS, variable_values={"id": email_id}))
        assert status["emailStatus"] == {"id": email_id, "status": "SENT"}
        history = (await session.execute(GraphQLRequest(EMAIL_HISTORY, variable_values={"id": email_id})))["emailHistory"]
        assert [h["status"].upper() for h in history if h["status"]] == [m["status"] for m in watch.of(email_id)]


# --- reconnect ------------------------------------------------------------------------------------


async def test_a_new_subscription_after_a_reconnect_does_not_replay(stack: Stack, sessions: Any) -> None:
    async with new_user(stack, sessions) as user:
        email_id = await scheduled_email(user.http, user.mail(subject="ws reconnect"))
        async with ws_session(stack, user.key) as session, watching(session, emailId=email_id) as before:
            assert before.messages[0]["status"] == "SCHEDULED"
        # Disconnected: the email is cancelled meanwhile (and that is final in the feed before reconnecting).
        assert (await user.http.post(f"/v1/emails/{email_id}/cancel")).status_code == 200
        await final_in_feed(user.http, email_id, "cancelled")

        async with ws_session(stack, user.key) as session:
            async with watching(session) as watch, watching(session, emailId=email_id) as one:
                assert one.messages[0]["status"] == "CANCELLED"  # where it is now, as SUBSCRIBED
                later = (await user.http.post("/v1/emails", json=user.mail(subject="ws after reconnect"))).json()["id"]
                assert await watch.reaches(later, "SENT")  # committed after the cancel: a replay would come first
                assert watch.of(email_id) == [] and watch.messages[0]["kind"] == "SUBSCRIBED"
                assert one.messages[1:] == []
            history = (await session.execute(GraphQLRequest(EMAIL_HISTORY, variable_values={"id": email_id})))["emailHistory"]
            assert [(h["event"], h["status"]) for h in history] == [
                ("queued", "queued"), ("scheduled", "scheduled"), ("cancelled", "cancelled"),
            ]


@asynccontextmanager
async def older_transaction_open(stack: Stack) -> AsyncIterator[Callable[[], Any]]:
    """On PostgreSQL, a transaction with an xid open in another database of the cluster (it holds the
    feed's horizon back) until the block calls what it yields. SQLite has one writer and starts a
    subscription at the highest committed row: nothing there to hold open."""
    if not stack.settings.database_url.startswith("postgresql"):
        async def nothing() -> None:
            return None

        yield nothing
        return
    async with await psycopg.AsyncConnection.connect(PG_ADMIN) as held:
        await held.execute("SELECT pg_current_xact_id()")
        yield held.commit


async def test_a_change_committed_just_before_subscribing_is_not_replayed(stack: Stack) -> None:
    email_id = await scheduled_email(stack.http, email_body(subject="ws just before"))
    async with older_transaction_open(stack) as release:
        assert (await stack.http.post(f"/v1/emails/{email_id}/cancel")).status_code == 200  # committed
        async with ws_session(stack) as session, watching(session) as watch:
            await release()
            later = (await stack.http.post("/v1/emails", json=email_body(subject="ws just after"))).json()["id"]
            assert await watch.reaches(later, "SENT")  # committed after the cancel: a replay would come first
            assert watch.of(email_id) == [], watch.messages
