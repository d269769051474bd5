"""Prometheus metrics, scraped over HTTP as Prometheus does: the API's /metrics and a worker's
port (a real worker process), read before and after, and moved by exactly what happened."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from temporalio.client import Client

from api.app import file_body_limits
from api.metrics import ApiMetrics
from api.schemas.stats import StatsOut
from devstack.devserver import TemporalDevServer
from devstack.net import free_port
from mailqueue.config import Settings
from mailqueue.metrics import WorkerMetrics, worker_runtime
from tests.dns_stub import DnsStub
from tests.helpers import (
    AUTH,
    EMAIL_SETTLES,
    KEY,
    PROCESS_STARTS,
    ROOT,
    ApiProcess,
    SmtpSink,
    Stack,
    email,
    eventually,
    fast_settings,
    new_user,
    start_worker,
)


@dataclass
class Metered:
    """A stack whose worker runs as its own process with its metrics port open."""

    stack: Stack
    api_metrics: str
    worker_metrics: str
    emails: list[str] = field(default_factory=list)  # every email id this module queued

    @property
    def http(self) -> httpx.AsyncClient:
        return self.stack.http

    async def queue(self, body: dict[str, Any], http: httpx.AsyncClient | None = None, **headers: str) -> str:
        answer = await (http or self.http).post("/v1/emails", json=body, headers=headers)
        assert answer.status_code == 202, answer.text
        self.emails.append(answer.json()["id"])
        return answer.json()["id"]

    async def reaches(self, email_id: str, *statuses: str) -> None:
        async def status() -> bool:
            return (await self.http.get(f"/v1/emails/{email_id}")).json()["status"] in statuses

        await eventually(status, timeout=EMAIL_SETTLES, interval=0.1, what=f"email {email_id} never became {statuses}")


@pytest.fixture(scope="module")
async def metered(
    database_url: str, temporal_server: TemporalDevServer, tmp_path_factory: pytest.TempPathFactory, dns_stub: DnsStub
) -> AsyncIterator[Metered]:
    tmp = tmp_path_factory.mktemp("metrics")
    with SmtpSink() as sink:
        settings = fast_settings(
            database_url, temporal_server.address, sink.port, f"metrics-{uuid.uuid4()}", dns_servers=[dns_stub.server],
            worker_metrics_host="127.0.0.1", worker_metrics_port=free_port(),
            quota_day_seconds=10**9,  # a "day" that outlasts the test: a deferred email waits until it is cancelled
        )
        worker = start_worker(settings, tmp / "worker.log")
        worker_metrics = f"http://127.0.0.1:{settings.worker_metrics_port}/metrics"
        try:
            async def serving() -> bool:
                assert worker.poll() is None, f"the worker exited; see {tmp / 'worker.log'}"
                try:
                    return bool(await scrape_text(worker_metrics))
                except httpx.TransportError:
                    return False

            await eventually(serving, timeout=PROCESS_STARTS, interval=0.2, what=f"no worker metrics; see {tmp / 'worker.log'}")
            async with ApiProcess(settings, tmp / "api.log") as api, httpx.AsyncClient(base_url=api.url, headers=AUTH, timeout=30) as http:
                yield Metered(Stack(http, sink, settings, tmp), f"{api.url}/metrics", worker_metrics)
        finally:
            worker.terminate()
            try:
                await asyncio.to_thread(worker.wait, 60)
            except subprocess.TimeoutExpired:
                worker.kill()


@pytest.fixture(autouse=True)
def _no_scripted_replies_left(request: pytest.FixtureRequest) -> None:
    if "metered" in request.fixturenames:
        request.getfixturevalue("metered").stack.sink.handler.reset()


async def scrape_text(url: str) -> str:
    async with httpx.AsyncClient(timeout=10) as http:  # no API key: Prometheus has none
        answer = await http.get(url)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain"), answer.headers
    return answer.text


async def scrape(url: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(await scrape_text(url)) for s in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of `name` over the series carrying these labels (and any others)."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def moved(before: list[Sample], after: list[Sample], name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


# --- the API ----------------------------------------------------------------------------------


async def test_requests_are_counted_by_route_template_and_status(metered: Metered) -> None:
    requests = "mailqueue_http_requests_total"
    before = await scrape(metered.api_metrics)
    missing = str(uuid.uuid4())
    for _ in range(2):
        assert (await metered.http.get(f"/v1/emails/{missing}")).status_code == 404
    assert (await metered.http.get("/v1/stats")).status_code == 200
    assert (await metered.http.get("/no/such/page")).status_code == 404
    after = await scrape(metered.api_metrics)
    assert moved(before, after, requests, method="GET", route="/v1/emails/{email_id}", status="404") == 2
    assert moved(before, after, "mailqueue_http_request_duration_seconds_count", method="GET", route="/v1/emails/{email_id}") == 2
    assert moved(before, after, requests, method="GET", route="/v1/stats", status="200") == 1
    assert moved(before, after, requests, method="GET", route="unmatched", status="404") == 1
    assert moved(before, after, requests, method="GET", route="/metrics", status="200") == 1  # the first scrape
    assert moved(before, after, requests) == 5
    assert not [s for s in after if any(missing in value or "/no/such" in value for value in s.labels.values())]

    # Refused before routing, still counted by its route. The API reads the rest of the body after
    # answering, and counts the request when it has: ask until it shows.
    # (/v1/emails takes attachments: its limit is the request limit plus the files in base64.)
    too_large = b"x" * (file_body_limits(metered.stack.settings)["/v1/emails"] + 1)
    assert (await metered.http.post("/v1/emails", content=too_large, headers={"Content-Type": "application/json"})).status_code == 413

    async def counted() -> bool:
        return moved(after, await scrape(metered.api_metrics), requests, method="POST", route="/v1/emails", status="413") == 1

    await eventually(counted, timeout=EMAIL_SETTLES, what="the 413 was not counted under /v1/emails")


async def test_emails_received_are_counted_by_outcome(metered: Metered) -> None:
    before = await scrape(metered.api_metrics)
    key = f"metrics-{uuid.uuid4()}"
    first = await metered.queue(email(), **{"Idempotency-Key": key})
    again = await metered.http.post("/v1/emails", json=email(), headers={"Idempotency-Key": key})
    assert again.status_code == 202 and again.json()["id"] == first
    other_body = await metered.http.post("/v1/emails", json=email(subject="Another"), headers={"Idempotency-Key": key})
    assert other_body.status_code == 409
    assert (await metered.http.post("/v1/emails", json=email(to=["not an address"]))).status_code == 422
    batch = await metered.http.post("/v1/emails/batch", json={"emails": [email(), email(to=["nobody"]), {**email(), "idempotency_key": key}]})
    assert [item["status"] for item in batch.json()["items"]] == [202, 422, 202], batch.text
    assert batch.json()["items"][2]["id"] == first
    metered.emails.append(batch.json()["items"][0]["id"])
    whole = await metered.http.post("/v1/emails/batch", json={"emails": [email(), email(to=["nobody"])], "all_or_nothing": True})
    assert whole.status_code == 422
    after = await scrape(metered.api_metrics)

    received = "mailqueue_emails_received_total"
    assert moved(before, after, received, outcome="accepted") == 2
    assert moved(before, after, received, outcome="duplicate") == 2
    assert moved(before, after, received, outcome="conflict") == 1
    assert moved(before, after, received, outcome="invalid") == 1 + 1 + 2  # the schema's 422, a batch item, a whole batch
    assert moved(before, after, received) == 9
    for email_id in (first, batch.json()["items"][0]["id"]):
        await metered.reaches(email_id, "sent")


async def test_queue_gauges_are_what_v1_stats_says(metered: Metered) -> None:
    async def agreeing() -> list[Sample]:
        """A scrape whose queue gauges are what /v1/stats says (read both until no email moved
        between the two readings, and the API's once-a-second count is fresh)."""

        async def alike() -> list[Sample] | None:
            samples = await scrape(metered.api_metrics)
            stats = (await metered.http.get("/v1/stats")).json()
            gauges = {
                "by_status": {s.labels["status"]: int(s.value) for s in samples if s.name == "mailqueue_emails" and s.value},
                "queue_depth": total(samples, "mailqueue_queue_depth"),
                "stuck": total(samples, "mailqueue_stuck_emails"),
            }
            return samples if gauges == {k: stats[k] for k in gauges} else None

        return await eventually(alike, timeout=EMAIL_SETTLES, interval=0.2, what="/metrics never agreed with /v1/stats")

    before = await agreeing()
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    scheduled = await metered.queue(email(send_at=tomorrow))
    try:
        after = await agreeing()
    finally:
        assert (await metered.http.post(f"/v1/emails/{scheduled}/cancel")).status_code == 200
    assert moved(before, after, "mailqueue_emails", status="scheduled") == 1
    assert moved(before, after, "mailqueue_queue_depth") == 1


# --- a worker ---------------------------------------------------------------------------------


async def test_the_worker_counts_sends_retries_and_failures(metered: Metered) -> None:
    sink = metered.stack.sink
    before = await scrape(metered.worker_metrics)
    for _ in range(2):
        await metered.reaches(await metered.queue(email()), "sent")
    sink.handler.data_replies.append("550 5.7.1 rejected")
    await metered.reaches(await metered.queue(email()), "failed")
    sink.handler.data_replies.append("451 4.3.0 try later")  # the first attempt fails, the second goes
    await metered.reaches(await metered.queue(email()), "sent")
    after = await scrape(metered.worker_metrics)

    sends = "mailqueue_sends_total"
    assert moved(before, after, sends, driver="smtp", outcome="sent") == 3
    assert moved(before, after, sends, outcome="failed") == 1
    assert moved(before, after, sends, outcome="retrying") == 1
    assert moved(before, after, sends) == 5
    assert moved(before, after, "mailqueue_send_duration_seconds_count", driver="smtp") == 5
    assert moved(before, after, "mailqueue_queue_lag_seconds_count", driver="smtp") == 3  # one per email handed over
    # The same port carries the Temporal SDK's own metrics, Prometheus-named too.
    assert moved(before, after, "temporal_activity_execution_latency_seconds_count", activity_type="send_email") == 5


async def test_queue_lag_of_a_scheduled_email_runs_from_its_due_time(metered: Metered) -> None:
    before = await scrape(metered.worker_metrics)
    due = datetime.now(UTC) + timedelta(seconds=3)
    await metered.queue(email(send_at=due.isoformat()))

    async def handed_over() -> list[Sample] | None:
        samples = await scrape(metered.worker_metrics)
        return samples if moved(before, samples, "mailqueue_queue_lag_seconds_count") else None

    after = await eventually(handed_over, timeout=EMAIL_SETTLES, interval=0.1, what="the scheduled email was never sent")
    seen = time.time()  # it was handed over before this (its lag recorded), and not before it was due
    assert moved(before, after, "mailqueue_queue_lag_seconds_count") == 1
    lag = moved(before, after, "mailqueue_queue_lag_seconds_sum")
    assert 0 <= lag <= seen - due.timestamp() + 0.01  # measured from acceptance it would be 3 s longer


async def test_an_unreachable_server_is_counted_as_waits_not_attempts(metered: Metered) -> None:
    sink = metered.stack.sink
    before = await scrape(metered.worker_metrics)
    sink.down()
    try:
        email_id = await metered.queue(email())

        async def waited() -> bool:
            return moved(before, await scrape(metered.worker_metrics), "mailqueue_sends_total", outcome="unreachable") >= 1

        await eventually(waited, timeout=EMAIL_SETTLES, interval=0.1, what="the send never found the server unreachable")
    finally:
        sink.up()
    await metered.reaches(email_id, "sent")
    after = await scrape(metered.worker_metrics)
    assert moved(before, after, "mailqueue_sends_total", outcome="sent") == 1
    assert moved(before, after, "mailqueue_sends_total", outcome="retrying") == 0  # no attempt was used up
    assert moved(before, after, "mailqueue_sends_total", outcome="failed") == 0


async def test_a_sender_over_their_daily_limit_is_deferred_and_counted(metered: Metered, sessions: Any) -> None:
    before = await scrape(metered.worker_metrics)
    async with new_user(metered.stack, sessions, daily_limit=1) as user:
        first = await metered.queue(user.mail(), http=user.http)
        await metered.reaches(first, "sent")
        second = await metered.queue(user.mail(), http=user.http)
        await metered.reaches(second, "deferred")
        after = await scrape(metered.worker_metrics)
        assert (await user.http.post(f"/v1/emails/{second}/cancel")).status_code == 200
    assert moved(before, after, "mailqueue_deferrals_total", window="daily") == 1
    assert moved(before, after, "mailqueue_deferrals_total") == 1
    assert moved(before, after, "mailqueue_sends_total", outcome="sent") == 1


async def test_no_label_names_an_email_an_address_or_a_key(metered: Metered) -> None:
    await metered.reaches(await metered.queue(email(to=["label-check@example.com"])), "sent")
    for url in (metered.api_metrics, metered.worker_metrics):
        values = {value for s in await scrape(url) for value in s.labels.values()}
        assert not [v for v in values if "@" in v or KEY in v or any(email_id in v for email_id in metered.emails)], url


async def test_the_readmes_queries_name_only_metrics_that_are_served(metered: Metered) -> None:
    await metered.reaches(await metered.queue(email()), "sent")
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Metrics"):]
    named = set(re.findall(r"\bmailqueue_[a-z_]+", section[: section.index("\n## ")]))
    served = set()
    for url in (metered.api_metrics, metered.worker_metrics):
        for family in text_string_to_metric_families(await scrape_text(url)):
            served |= {family.name, *(s.name for s in family.samples)}
    assert len(named) >= 11 and named <= served, sorted(named - served)


async def test_a_flood_of_scrapes_counts_the_queue_once_per_interval() -> None:
    """/metrics needs no key: asking it often must not make the database count often."""
    counted: list[int] = []

    async def count() -> StatsOut:
        counted.append(1)
        await asyncio.sleep(0.01)
        return StatsOut(
            by_status={"queued": 2}, queue_depth=2, retried=0, sent_last_minute=0, sent_last_hour=0,
            oldest_in_flight_seconds=1.0, stuck_after_seconds=300, stuck=0, stuck_examples=[],
        )

    metrics = ApiMetrics(count_every=3600)
    answers = await asyncio.gather(*(metrics.queue(count) for _ in range(20)))
    assert len(counted) == 1 and all(a is answers[0] for a in answers)

    async def database_away() -> StatsOut:
        counted.append(1)
        raise TimeoutError

    counted.clear()
    failing = ApiMetrics(count_every=3600)
    assert [await failing.queue(database_away) for _ in range(3)] == [None] * 3 and len(counted) == 1
    # Without the queue's counts a scrape still says the rest, and leaves the gauges out rather than show old ones.
    text = failing.exposition(None).decode()
    assert "mailqueue_queue_depth" not in text and "mailqueue_emails_received_total" in text


# --- off --------------------------------------------------------------------------------------


async def test_without_a_port_a_worker_serves_nothing_and_its_metrics_are_off(client: Client) -> None:
    assert worker_runtime(Settings(_env_file=None)) is None  # type: ignore[call-arg]
    # build_worker records through the runtime its client was connected with: none here (the
    # SDK's default, whose meter is a no-op), so every metrics call returns at once.
    assert client.service_client.config.runtime is None and not WorkerMetrics.of(client).on
    served = worker_runtime(Settings(worker_metrics_host="127.0.0.1", worker_metrics_port=free_port(), _env_file=None))  # type: ignore[call-arg]
    assert served is not None and WorkerMetrics(served.metric_meter).on


def test_a_port_in_use_stops_the_worker_with_the_setting_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(worker_metrics_host="127.0.0.1", worker_metrics_port=port, _env_file=None)  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="MAILQUEUE_WORKER_METRICS_HOST/_PORT 127.0.0.1:"):
            worker_runtime(settings)
