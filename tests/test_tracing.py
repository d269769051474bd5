"""OpenTelemetry tracing: the API and a worker, each its own process, export to a real OTLP/HTTP
receiver, and one POST /v1/emails is one trace from the HTTP request to the SMTP conversation."""

from __future__ import annotations

import json
import logging
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from devstack.devserver import TemporalDevServer
from mailqueue import tracing
from mailqueue.config import Settings
from mailqueue.contracts import workflow_id_for
from mailqueue.logs import JsonFormatter
from mailqueue.temporal import connect
from tests.dns_stub import DnsStub
from tests.fake_providers import FakeSendGrid
from tests.helpers import (
    AUTH, EMAIL_SETTLES, ApiProcess, SmtpSink, delivered, email, eventually, fast_settings, post_email, start_worker, verify_domain,
    wait_status,
)
from tests.otlp_receiver import CLIENT, SERVER, STATUS_ERROR, OtlpReceiver, ReceivedSpan

# What must never reach a span: the recipients, the subject, the body.
RECIPIENT = "ann.traced@example.com"
REFUSED = "bob.refused@example.com"
SENDGRID_KEY = "SG.trace-test-key-0b5e1d"
SUBJECT = "Quarterly plan 7f3a9c"
BODY = "the body text 51d0e2"
OTEL_VARIABLES = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


@dataclass
class Traced:
    http: httpx.AsyncClient
    sink: SmtpSink
    sendgrid: FakeSendGrid
    receiver: OtlpReceiver


@pytest.fixture(scope="module")
async def traced(
    database_url: str, temporal_server: TemporalDevServer, dns_stub: DnsStub, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Traced]:
    """The API and a worker as child processes, both exporting to one receiver (the worker's batches gzipped)."""
    tmp = tmp_path_factory.mktemp("tracing")
    with SmtpSink() as sink, FakeSendGrid(SENDGRID_KEY) as sendgrid, OtlpReceiver() as receiver:
        settings = fast_settings(
            database_url, temporal_server.address, sink.port, f"tracing-{uuid.uuid4()}",
            sendgrid_base_url=sendgrid.url, dns_servers=[dns_stub.server],
        )
        # A short batch delay: spans reach the receiver a moment after they end.
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
        worker = start_worker(settings, tmp / "worker.log", env=env | {"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"})
        try:
            async with (
                ApiProcess(settings, tmp / "api.log", env=env) as api,
                httpx.AsyncClient(base_url=api.url, headers=AUTH, timeout=30) as http,
            ):
                yield Traced(http, sink, sendgrid, receiver)
        finally:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()


async def _trace_of(receiver: OtlpReceiver, email_id: str, *, needed: set[str]) -> list[ReceivedSpan]:
    """The spans of the trace the email's deliver span is in, once the spans named `needed` are all there."""
    found: list[ReceivedSpan] = []

    def complete() -> list[ReceivedSpan] | None:
        spans = receiver.snapshot()
        deliver = [s for s in spans if s.name == "deliver" and s.attributes.get("mailqueue.email_id") == email_id]
        if not deliver:
            return None
        found[:] = [s for s in spans if s.trace_id == deliver[0].trace_id]
        return found if needed <= {s.name for s in found} else None

    return await eventually(
        complete, timeout=EMAIL_SETTLES, what=lambda: f"spans of email {email_id}: {sorted(s.name for s in found)}, needed {sorted(needed)}"
    )


def _one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    [span] = [s for s in spans if s.name == name]
    return span


async def test_one_post_is_one_trace_from_the_request_to_the_smtp_conversation(traced: Traced) -> None:
    r = await post_email(traced.http, email(to=[f"Ann <{RECIPIENT}>"], subject=SUBJECT, text=BODY), str(uuid.uuid4()))
    assert r.status_code == 202, r.text
    email_id = r.json()["id"]
    await delivered(traced.sink, email_id)

    spans = await _trace_of(traced.receiver, email_id, needed={
        "POST /v1/emails", "StartWorkflow:SendEmailWorkflow", "RunWorkflow:SendEmailWorkflow", "StartActivity:send_email",
        "RunActivity:send_email", "deliver", "smtp send", "CompleteWorkflow:SendEmailWorkflow",
    })

    # The API: the request's server span is the root; starting the workflow is its child.
    request = _one(spans, "POST /v1/emails")
    assert (request.service, request.kind, request.parent_id) == ("mailqueue-api", SERVER, "")
    start = _one(spans, "StartWorkflow:SendEmailWorkflow")
    assert (start.service, start.kind, start.parent_id) == ("mailqueue-api", CLIENT, request.span_id)
    assert start.attributes["temporalWorkflowID"] == workflow_id_for(email_id)

    # The worker, another process, continues the API's span from the workflow's Temporal headers.
    # (Temporal's interceptor makes each workflow span a zero-length child of the start.)
    run = _one(spans, "RunWorkflow:SendEmailWorkflow")
    assert (run.service, run.parent_id) == ("mailqueue-worker", start.span_id)
    assert _one(spans, "CompleteWorkflow:SendEmailWorkflow").parent_id == start.span_id
    schedule = _one(spans, "StartActivity:send_email")
    assert (schedule.service, schedule.parent_id) == ("mailqueue-worker", start.span_id)
    attempt = _one(spans, "RunActivity:send_email")
    assert (attempt.service, attempt.kind, attempt.parent_id) == ("mailqueue-worker", SERVER, schedule.span_id)

    # The driver: the send within the attempt, the SMTP conversation within the send.
    deliver = _one(spans, "deliver")
    assert deliver.parent_id == attempt.span_id
    assert deliver.attributes == {
        "mailqueue.email_id": email_id, "mailqueue.attempt": 1, "mailqueue.driver": "smtp", "mailqueue.recipients": 1,
    }
    smtp = _one(spans, "smtp send")
    assert (smtp.kind, smtp.parent_id, smtp.attributes["server.port"]) == (CLIENT, deliver.span_id, traced.sink.port)

    # One trace per email: every span that names the email's workflow is in this one.
    named = [s for s in traced.receiver.snapshot() if s.attributes.get("temporalWorkflowID") == workflow_id_for(email_id)]
    assert named and {s.trace_id for s in named} == {request.trace_id}


async def test_a_provider_request_is_a_client_span_of_the_send(traced: Traced, sessions: Any) -> None:
    """A user's SendGrid: the HTTP request to the provider is the send's child, and no key shows."""
    made = await traced.http.post("/v1/users", json={"name": f"traced-{uuid.uuid4().hex[:6]}"})
    assert made.status_code == 201, made.text
    user_id = made.json()["id"]
    key = (await traced.http.post(f"/v1/users/{user_id}/api-keys", json={"name": "tests"})).json()["key"]
    await verify_domain(sessions, user_id, "example.org")
    user = httpx.AsyncClient(base_url=str(traced.http.base_url), headers={"Authorization": f"Bearer {key}"}, timeout=30)
    async with user:
        mail = {"driver": "sendgrid", "api_key": SENDGRID_KEY, "default_from": "Ann <ann@example.org>"}
        assert (await user.put("/v1/settings/mail", json=mail)).status_code == 200
        r = await post_email(user, email(to=[f"Ann <{RECIPIENT}>"], subject=SUBJECT, text=BODY), str(uuid.uuid4()))
        assert r.status_code == 202, r.text
        email_id = r.json()["id"]
        await wait_status(user, email_id, "sent")

    spans = await _trace_of(traced.receiver, email_id, needed={"POST /v1/emails", "deliver", "POST"})
    deliver = _one(spans, "deliver")
    assert deliver.attributes["mailqueue.driver"] == "sendgrid"
    request = _one(spans, "POST")
    assert (request.service, request.kind, request.parent_id) == ("mailqueue-worker", CLIENT, deliver.span_id)
    assert request.attributes["http.url"] == f"{traced.sendgrid.url}/v3/mail/send"
    assert request.attributes["http.status_code"] == 202
    assert not [text for s in spans for text in s.texts() if SENDGRID_KEY in text or key in text]


async def test_no_span_carries_an_address_a_subject_or_a_body(traced: Traced) -> None:
    """Not from a query string (the emails list filters by recipient), nor from a mail server's
    refusal that quotes the address (it reaches exception messages and error descriptions)."""
    listed = await traced.http.get("/v1/emails", params={"recipient": RECIPIENT})
    assert listed.status_code == 200, listed.text
    traced.sink.handler.rejected_recipients[REFUSED] = f"550 5.1.1 <{REFUSED}>: Recipient address rejected"
    r = await post_email(traced.http, email(to=[REFUSED], subject=SUBJECT, text=BODY), str(uuid.uuid4()))
    assert r.status_code == 202, r.text
    email_id = r.json()["id"]
    failed = await wait_status(traced.http, email_id, "failed")
    assert REFUSED in json.dumps(failed)  # the refusal quotes the address: the record keeps it, the trace must not

    spans = await _trace_of(
        traced.receiver, email_id, needed={"RunActivity:send_email", "RunActivity:record_email_event", "CompleteWorkflow:SendEmailWorkflow"}
    )
    # The failure is written down by a local activity: in the trace too, under the workflow's scheduling span.
    by_id = {s.span_id: s for s in spans}
    start = _one(spans, "StartWorkflow:SendEmailWorkflow")
    for record in [s for s in spans if s.name == "RunActivity:record_email_event"]:
        assert (by_id[record.parent_id].name, by_id[record.parent_id].parent_id) == ("StartActivity:record_email_event", start.span_id)

    deliver = _one(spans, "deliver")
    assert (deliver.status_code, deliver.status_message) == (STATUS_ERROR, "PermanentDeliveryError")
    attempt = _one(spans, "RunActivity:send_email")
    assert (attempt.status_code, attempt.status_message) == (STATUS_ERROR, "ApplicationError")
    exceptions = [attrs for s in spans for name, attrs in s.events if name == "exception"]
    assert exceptions and all(set(e) <= {"exception.type", "exception.escaped"} for e in exceptions)

    def list_span() -> ReceivedSpan | None:
        return next((s for s in traced.receiver.snapshot() if s.name == "GET /v1/emails"), None)

    query = await eventually(list_span, timeout=EMAIL_SETTLES, what="no span for GET /v1/emails")
    assert query.attributes["http.url"].endswith("/v1/emails")

    leaks = {
        (s.service, s.name, text)
        for s in traced.receiver.snapshot()
        for text in s.texts()
        if "@" in text or "%40" in text or SUBJECT in text or BODY in text
    }
    assert not leaks


async def test_without_an_endpoint_nothing_is_installed(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not tracing.enabled()
    assert tracing.configure_tracing("mailqueue-test") is False
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)  # OpenTelemetry's no-op proxy: no SDK, no exporter

    client = await connect(settings, lazy=True)
    assert client.config()["interceptors"] == []

    from api.app import create_app

    assert not getattr(create_app(settings), "_is_instrumented_by_opentelemetry", False)
    with tracing.span("deliver", {"mailqueue.email_id": "x"}) as current:
        assert not current.get_span_context().is_valid  # a no-op span: nothing recorded, nothing to export

    # An endpoint turns tracing on, unless the standard variables turn the SDK or the exporter off.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:4318/v1/traces")
    assert tracing.enabled()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not tracing.enabled()
    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.enabled()
    assert tracing.configure_tracing("mailqueue-test") is False


def test_log_lines_carry_the_current_span() -> None:
    formatter = JsonFormatter()

    def line(**extra: str) -> dict[str, str]:
        record = logging.LogRecord("mailqueue.test", logging.INFO, __file__, 1, "sent", None, None)
        record.__dict__.update(extra)
        return json.loads(formatter.format(record))

    assert "trace_id" not in line(email_id="e1")
    # A provider of this test's own: the process's global one stays untouched.
    with TracerProvider().get_tracer("test").start_as_current_span("send") as current:
        got = line(email_id="e1", workflow_id="email-e1")
    context = current.get_span_context()
    assert got["trace_id"] == f"{context.trace_id:032x}" and got["span_id"] == f"{context.span_id:016x}"
    assert (got["email_id"], got["workflow_id"]) == ("e1", "email-e1")


def test_scrubbing_keeps_a_clean_span_as_it_is() -> None:
    """Spans with nothing to scrub leave as they are (no copy per span on the hot path)."""
    provider = TracerProvider()
    with provider.get_tracer("test").start_as_current_span("deliver", attributes={"mailqueue.attempt": 1}) as span:
        pass
    assert tracing.scrub(span) is span
    with provider.get_tracer("test").start_as_current_span("GET /v1/emails", attributes={
        "http.url": f"http://api/v1/emails?recipient={RECIPIENT}", "url.query": f"recipient={RECIPIENT}", "http.route": "/v1/emails",
    }) as span:
        pass
    scrubbed = tracing.scrub(span)
    assert dict(scrubbed.attributes or {}) == {"http.url": "http://api/v1/emails", "http.route": "/v1/emails"}

