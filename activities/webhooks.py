"""Webhook deliveries: wait for an endpoint's next events, POST them in order (signed), record every
attempt, advance the endpoint's cursor past each delivered one; disable an endpoint; redeliver one event.

A failed POST (refused, timed out, not 2xx) raises WebhookDeliveryFailed and leaves the cursor on
the failed event: the next attempt starts there, so nothing is skipped and nothing already
delivered goes again. The secret is read from the database here, by endpoint id: it never travels
through Temporal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from mailqueue import webhooks
from mailqueue.config import Settings
from mailqueue.crypto import SecretBox, SecretKeyError
from mailqueue.drivers._http import http_client
from mailqueue.egress import DestinationRefused
from mailqueue.events import Cursor, FeedEvent, FeedSignal, feed_end, find_event, read_feed
from mailqueue.ids import new_email_id
from mailqueue.models import WebhookDelivery, WebhookEndpoint, WebhookStatus, utcnow
from mailqueue.webhooks import (
    DELIVERY_FAILED,
    SECRET_UNREADABLE,
    DeliverRequest,
    DeliverResult,
    DisableRequest,
    RedeliverRequest,
    RedeliverResult,
)

log = logging.getLogger("mailqueue.activities.webhooks")

USER_AGENT = "mailqueue-webhooks/1"
MAX_ERROR = 300


@dataclass(frozen=True)
class Attempt:
    status_code: int | None
    latency_ms: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def failure(self) -> str:
        return self.error or f"answered {self.status_code}"


class WebhookActivities:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], settings: Settings, box: SecretBox | None = None) -> None:
        self._sessions = sessions
        self._settings = settings
        self._box = box
        self._signal: FeedSignal | None = None
        self._client: httpx.AsyncClient | None = None

    def _secrets(self) -> SecretBox:
        if self._box is None:
            self._box = SecretBox.from_settings(self._settings)
        return self._box

    async def _feed_signal(self) -> FeedSignal:
        """One waker per worker process (LISTEN on PostgreSQL, a short poll on SQLite), started at first use."""
        if self._signal is None:
            engine = self._sessions.kw["bind"]
            self._signal = FeedSignal.for_settings(self._settings, engine)
            await self._signal.start()
        return self._signal

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # Every connection goes to an address the URL policy allowed, checked at connect time.
            self._client = http_client(self._settings.webhook_timeout_seconds, webhooks.destination(self._settings))
        return self._client

    async def aclose(self) -> None:
        if self._signal is not None:
            await self._signal.stop()
        if self._client is not None:
            await self._client.aclose()

    # --- the endpoint's workflow ---------------------------------------------------------------

    @activity.defn(name="webhook_deliver")
    async def deliver(self, req: DeliverRequest) -> DeliverResult:
        """The endpoint's next events after its cursor (waiting up to req.wait_seconds for some), POSTed in order."""
        endpoint = await self._active(req.endpoint_id)
        if endpoint is None:
            return DeliverResult(gone=True)
        async with self._sessions() as session:
            where = await webhooks.owner_filter(session, endpoint)
        after = Cursor.parse(endpoint.cursor)
        events, seen = await self._next_events(where, after, req)
        if not events:
            await self._skip(endpoint.id, after, seen)
            return DeliverResult()
        for n, event in enumerate(events):
            activity.heartbeat(n)
            async with self._sessions() as session:
                # Deleted or disabled while this step waited: nothing more goes out (a cancel reaches an
                # activity only with its next heartbeat).
                current = await session.get(WebhookEndpoint, endpoint.id)
                if current is None or current.status != WebhookStatus.ACTIVE.value:
                    return DeliverResult(delivered=n, gone=True)
                attempt = await webhooks.attempts_before(session, endpoint.id, event.event_id, redelivery=False) + 1
            # The secret as it is now: a rotation signs the rest of a batch already.
            outcome = await self._post(current.url, self._secret(current), event, req.call_timeout_seconds)
            if not await self._record(endpoint.id, event, outcome, attempt, redelivery=False):
                return DeliverResult(delivered=n, gone=True)
            if not outcome.ok:
                if n > 0:
                    # Some went through: the endpoint works. The workflow's next step starts at this
                    # event with a fresh disable window ("no delivery for that long", not "failing
                    # now and then for that long").
                    return DeliverResult(delivered=n)
                raise ApplicationError(f"event {n + 1} of {len(events)}: {outcome.failure()}", type=DELIVERY_FAILED)
        return DeliverResult(delivered=len(events))

    @activity.defn(name="webhook_disable")
    async def disable(self, req: DisableRequest) -> None:
        async with self._sessions() as session:
            endpoint = await session.get(WebhookEndpoint, req.endpoint_id)
            if endpoint is None or endpoint.status == WebhookStatus.DISABLED.value:
                return
            now = utcnow()
            endpoint.status, endpoint.disabled_reason, endpoint.disabled_at, endpoint.updated_at = (
                WebhookStatus.DISABLED.value, req.reason[:MAX_ERROR * 2], now, now,
            )
            session.add(endpoint)
            await session.commit()
        log.warning("webhook endpoint %s disabled: %s", req.endpoint_id, req.reason)

    # --- redelivery ----------------------------------------------------------------------------

    @activity.defn(name="webhook_redeliver")
    async def redeliver(self, req: RedeliverRequest) -> RedeliverResult:
        """One delivery's event once more, to its endpoint as it is now (URL, secret); every attempt recorded."""
        endpoint = await self._active(req.endpoint_id)
        async with self._sessions() as session:
            original = await session.get(WebhookDelivery, req.delivery_id)
            event = await find_event(session, original.event_id) if original is not None else None
        if endpoint is None or original is None or original.endpoint_id != req.endpoint_id or event is None:
            return RedeliverResult(gone=True)
        async with self._sessions() as session:
            attempt = await webhooks.attempts_before(session, endpoint.id, event.event_id, redelivery=True) + 1
        outcome = await self._post(endpoint.url, self._secret(endpoint), event, req.policy.call_timeout_seconds)
        if not await self._record(endpoint.id, event, outcome, attempt, redelivery=True):
            return RedeliverResult(gone=True)
        if not outcome.ok:
            raise ApplicationError(outcome.failure(), type=DELIVERY_FAILED)
        return RedeliverResult(delivered=True)

    # --- parts ---------------------------------------------------------------------------------

    async def _active(self, endpoint_id: str) -> WebhookEndpoint | None:
        async with self._sessions() as session:
            endpoint = await session.get(WebhookEndpoint, endpoint_id)
        return endpoint if endpoint is not None and endpoint.status == WebhookStatus.ACTIVE.value else None

    def _secret(self, endpoint: WebhookEndpoint) -> str:
        try:
            return self._secrets().decrypt(endpoint.secret_enc)
        except SecretKeyError as exc:
            raise ApplicationError(str(exc), type=SECRET_UNREADABLE, non_retryable=True) from None

    async def _next_events(self, where: webhooks.FeedFilter, after: Cursor, req: DeliverRequest) -> tuple[list[FeedEvent], Cursor]:
        """(the events after `after` as soon as there are some, or none after req.wait_seconds; with
        none, a cursor that every event read past so far lies behind: see _skip)."""
        signal = await self._feed_signal()
        deadline = time.monotonic() + req.wait_seconds
        while True:
            woken = signal.waiter()  # before reading: a commit during the read wakes the wait
            async with self._sessions() as session:
                # Taken before the read: every event behind it was committed before the read began.
                seen = await feed_end(session)
                await session.commit()
                page = await read_feed(session, where, after, req.batch)
            if page.events:
                return list(page.events), after
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return [], seen
            activity.heartbeat()
            # Rows of a still-running older transaction bring no notification of their own: look again soon.
            timeout = min(remaining, signal.poll_seconds if page.held else 5.0)
            try:
                await asyncio.wait_for(woken.wait(), timeout)
            except TimeoutError:
                pass

    async def _skip(self, endpoint_id: str, after: Cursor, seen: Cursor) -> None:
        """Nothing for this endpoint behind `seen` (the read found none after `after`): its cursor moves
        there, so the next reads do not go over other senders' events again (an idle user's endpoint on
        a busy server would otherwise read further back every time)."""
        if (seen.xid, seen.seq) <= (after.xid, after.seq):
            return
        table = WebhookEndpoint.__table__  # type: ignore[attr-defined]
        async with self._sessions() as session:
            conn = await session.connection()
            # Only from where this step started: a delivery made meanwhile (a stale attempt) keeps its cursor.
            await conn.execute(sa.update(table).where(table.c.id == endpoint_id, table.c.cursor == str(after)).values(cursor=str(seen)))
            await session.commit()

    async def _post(self, url: str, secret: str, event: FeedEvent, timeout: float) -> Attempt:
        body = webhooks.payload(event)
        headers = webhooks.signature_headers(secret, event.event_id, body, datetime.now(UTC))
        headers |= {"content-type": "application/json", "user-agent": USER_AGENT}
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(timeout):
                # Streamed and never read: a receiver's answer body is not ours to hold.
                async with self._http().stream("POST", url, content=body.encode(), headers=headers) as answer:
                    status = answer.status_code
        except (TimeoutError, httpx.TimeoutException):
            error = f"timed out after {timeout:g} s"
        except DestinationRefused as exc:
            error = f"destination refused: {exc.reason}"
        except httpx.HTTPError as exc:
            # The type only: httpx's messages carry the URL, which may hold a token.
            error = f"could not be reached ({type(exc).__name__})"
        latency = int((time.monotonic() - started) * 1000)
        return Attempt(status, latency, error[:MAX_ERROR] if error else None)

    async def _record(self, endpoint_id: str, event: FeedEvent, outcome: Attempt, attempt: int, *, redelivery: bool) -> bool:
        """One delivery row; on success (first deliveries) the cursor moves past the event, in the same
        transaction. False when the endpoint is gone (deleted meanwhile)."""
        async with self._sessions() as session:
            if await session.get(WebhookEndpoint, endpoint_id) is None:
                return False
            session.add(WebhookDelivery(
                id=new_email_id(), endpoint_id=endpoint_id, event_id=event.event_id, event_type=event.event, attempt=attempt,
                status_code=outcome.status_code, latency_ms=outcome.latency_ms, error=outcome.error, redelivery=redelivery,
            ))
            table = WebhookEndpoint.__table__  # type: ignore[attr-defined]
            now = utcnow()
            conn = await session.connection()
            if redelivery:
                pass
            elif outcome.ok:
                await conn.execute(
                    sa.update(table).where(table.c.id == endpoint_id).values(cursor=str(event.cursor), failing_since=None, updated_at=now)
                )
            else:
                await conn.execute(
                    sa.update(table).where(table.c.id == endpoint_id, table.c.failing_since.is_(None)).values(failing_since=now)
                )
            await session.commit()
        return True
