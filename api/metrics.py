"""The API's Prometheus metrics (served at /metrics, api/routes/metrics.py): requests by route and
status, emails by what became of them, and the queue as /v1/stats counts it.

Each app has a registry of its own (tests build several apps in one process). No label names a
sender, an address or a key, and none takes a value the caller chooses: routes are templates
(`/v1/emails/{email_id}`, never the path), methods outside the standard ones are "other". The
workers' metrics are in mailqueue/metrics.py.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from enum import StrEnum

from fastapi.routing import iter_route_contexts
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.schemas.stats import StatsOut
from api.services.errors import Invalid, LimitReached, ServiceError
from mailqueue.contracts import EmailStatus
from mailqueue.db import STORE_ERRORS

log = logging.getLogger("mailqueue.api.metrics")

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Received(StrEnum):
    """What became of an email the API was asked to queue."""

    ACCEPTED = "accepted"  # queued: a new email
    DUPLICATE = "duplicate"  # an Idempotency-Key replay: answered with the email it names, nothing new queued
    INVALID = "invalid"  # refused: not valid (422), or the request too large (413)
    CONFLICT = "conflict"  # refused: the Idempotency-Key was used with another body (409)
    LIMITED = "limited"  # refused: over a rate or recipients limit (429)
    UNAVAILABLE = "unavailable"  # not queued: Temporal or the database is away (503); the client should send again


# An answer's status says what became of the email it answers for (a batch answers each email with one).
RECEIVED_BY_STATUS = {
    202: Received.ACCEPTED, 409: Received.CONFLICT, 413: Received.INVALID, 422: Received.INVALID,
    429: Received.LIMITED, 503: Received.UNAVAILABLE,
}
# One email per request, counted from its answer: a refusal before the route runs (the schema, the
# body size, the key's rate) counts too. The route counts what it queued, a replay apart.
QUEUE_ONE = ("POST", "/v1/emails")

# /metrics needs no key: however often it is asked, the queue is counted at most once a second per
# process (Prometheus asks every 15 s or so), and the counting gives up well before Prometheus's
# scrape timeout (10 s by default), so a slow database costs a scrape the queue's gauges only.
QUEUE_COUNT_EVERY_SECONDS = 1.0
QUEUE_COUNT_TIMEOUT_SECONDS = 5.0


def route_template(scope: Scope) -> str:
    """The template of the route that answered, e.g. /v1/emails/{email_id}; "unmatched" for none."""
    route = scope.get("route")  # set by the router
    if route is None and (app := scope.get("app")) is not None:
        # Answered before routing (a body over the limit, a CORS preflight): the route it was for,
        # found as the router finds it (a full match first, else one for another method).
        found = [(r.matches(scope)[0], r) for r in iter_route_contexts(app.routes)]
        route = next((r for m, r in found if m is Match.FULL), None) or next((r for m, r in found if m is Match.PARTIAL), None)
    return getattr(route, "path", None) or "unmatched"


class ApiMetrics:
    def __init__(self, count_every: float = QUEUE_COUNT_EVERY_SECONDS) -> None:
        disable_created_metrics()  # no *_created series: they double a scrape and tell Prometheus nothing it uses
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "mailqueue_http_requests", "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"], registry=self.registry,
        )
        self._duration = Histogram(
            "mailqueue_http_request_duration_seconds", "Time to answer an HTTP request, by method and route template",
            ["method", "route"], registry=self.registry,
        )
        self._received = Counter(
            "mailqueue_emails_received", "Emails the API was asked to queue (each email of a batch), by outcome: "
            "accepted, duplicate (an Idempotency-Key replay), invalid, conflict, limited, unavailable",
            ["outcome"], registry=self.registry,
        )
        for outcome in Received:
            self._received.labels(outcome.value)  # every outcome from 0, so rate() sees the first one
        self._count_every = count_every
        self._counting = asyncio.Lock()
        self._counted: tuple[float, StatsOut | None] | None = None  # when, and what (None: the database failed)

    def answered(self, scope: Scope, status: int, seconds: float) -> None:
        method = scope["method"] if scope["method"] in METHODS else "other"
        route = route_template(scope)
        self._requests.labels(method, route, str(status)).inc()
        self._duration.labels(method, route).observe(seconds)
        if (method, route) == QUEUE_ONE and status != 202 and (outcome := RECEIVED_BY_STATUS.get(status)) is not None:
            self.received(outcome)

    def received(self, outcome: Received, n: int = 1) -> None:
        if n:
            self._received.labels(outcome.value).inc(n)

    def received_batch(self, statuses: Iterable[int], replays: int) -> None:
        """A batch's emails by the status of each one's answer; `replays` of the 202s were replays."""
        tally = collections.Counter(RECEIVED_BY_STATUS[s] for s in statuses if s in RECEIVED_BY_STATUS)
        tally[Received.ACCEPTED] -= replays
        tally[Received.DUPLICATE] += replays
        for outcome, n in tally.items():
            self.received(outcome, n)

    def refused_batch(self, refusal: ServiceError, size: int) -> None:
        """An all_or_nothing batch refused whole: none of its emails was queued."""
        if isinstance(refusal, LimitReached):
            self.received(Received.LIMITED, size)
        elif isinstance(refusal, Invalid):
            self.received(Received.INVALID, size)

    async def queue(self, count: Callable[[], Awaitable[StatsOut]]) -> StatsOut | None:
        """The queue as `count()` (the /v1/stats service) counts it, at most once every
        `count_every` seconds; None while the database does not answer in time."""
        async with self._counting:
            if self._counted is None or time.monotonic() - self._counted[0] >= self._count_every:
                try:
                    async with asyncio.timeout(QUEUE_COUNT_TIMEOUT_SECONDS):
                        stats: StatsOut | None = await count()
                except STORE_ERRORS as exc:  # the timeout too
                    log.warning("metrics: the queue was not counted: %s", type(exc).__name__)
                    stats = None
                self._counted = (time.monotonic(), stats)
            return self._counted[1]

    def exposition(self, queue: StatsOut | None) -> bytes:
        """This app's metrics in Prometheus's text format, with the queue's as counted for this
        scrape (None: they could not be counted, and are left out rather than shown stale)."""
        text = generate_latest(self.registry)
        return text if queue is None else text + generate_latest(_QueueGauges(queue))


class _QueueGauges(Collector):
    def __init__(self, queue: StatsOut) -> None:
        self._queue = queue

    def collect(self) -> Iterator[Metric]:
        q = self._queue
        emails = GaugeMetricFamily("mailqueue_emails", "Emails by status, as /v1/stats counts them", labels=["status"])
        for status in EmailStatus:
            emails.add_metric([status.value], q.by_status.get(status.value, 0))
        yield emails
        yield GaugeMetricFamily(
            "mailqueue_queue_depth", "Emails queued, scheduled, deferred, sending or retrying (/v1/stats queue_depth)", value=q.queue_depth,
        )
        yield GaugeMetricFamily(
            "mailqueue_stuck_emails", f"Emails queued, sending or retrying and unchanged for {q.stuck_after_seconds} s (/v1/stats stuck)",
            value=q.stuck,
        )
        yield GaugeMetricFamily(
            "mailqueue_oldest_in_flight_seconds", "Age of the oldest email queued, sending or retrying (0: none)",
            value=q.oldest_in_flight_seconds or 0,
        )


class HttpMetrics:
    """Counts and times every answer. Outermost, so answers given before routing (413, CORS
    preflights) count too; an exception counts as the 500 it becomes."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.answered(scope, status, time.perf_counter() - began)
