"""SendEmailWorkflow on a real dev server, with a real worker, database and SMTP server."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDReusePolicy
from temporalio.service import RPCError

from mailqueue.contracts import (
    CancelRequest,
    EmailSpec,
    EmailState,
    EmailStatus,
    RescheduleRequest,
    TemplateRef,
    workflow_id_for,
)
from mailqueue.models import Email, EmailTemplate
from mailqueue.email_store import events_of
from mailqueue.template_store import save_template_version
from tests.helpers import EMAIL_SETTLES, UNREACHABLE_DATABASE, SmtpSink, closed_run, eventually, make_spec, sends_scheduled
from workflows.send_email import ASK_AGAIN_MAX_DELAY, UNREACHABLE_MAX_DELAY, SendEmailWorkflow

pytestmark = pytest.mark.usefixtures("worker")


async def start(client: Client, spec: EmailSpec, task_queue: str, **kw):  # type: ignore[no-untyped-def]
    return await client.start_workflow(
        SendEmailWorkflow.run, spec, id=workflow_id_for(spec.email_id), task_queue=task_queue, **kw
    )


async def record(sessions, email_id: str) -> tuple[Email, list[str]]:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        email = await s.get(Email, email_id)
        assert email is not None, "the workflow must create the record"
        return email, [e.event for e in await events_of(s, email_id)]


async def wait_status(handle, status: EmailStatus, timeout: float = EMAIL_SETTLES) -> EmailState:  # type: ignore[no-untyped-def]
    last: list[EmailState] = []

    async def reached() -> EmailState | None:
        last[:] = [await handle.query(SendEmailWorkflow.status)]
        return last[0] if last[0].status is status else None

    return await eventually(reached, timeout=timeout, what=lambda: f"status stayed {last[-1].status if last else None}, expected {status}")


def set_for(history, when: datetime) -> list[bool]:  # type: ignore[no-untyped-def]
    """For each durable timer of a run: was it set to fire at `when`? A timer's duration is
    `when` minus the workflow's time (workflow.now()) at some moment of the workflow task that
    started it, so `when` minus its duration lies between that task's start and the timer's
    start. Read from the history: a busy machine cannot change it."""
    answers, task_started = [], None
    for e in history.events:
        if e.HasField("workflow_task_started_event_attributes"):
            task_started = e.event_time.ToDatetime(tzinfo=UTC)
        elif e.HasField("timer_started_event_attributes"):
            assert task_started is not None
            set_at = when - e.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
            answers.append(task_started <= set_at <= e.event_time.ToDatetime(tzinfo=UTC))
    return answers


def send_follows_the_last_timer(history) -> bool:  # type: ignore[no-untyped-def]
    """The send was asked for in the workflow task that the last timer's firing started: nothing
    (no other timer, no other step) stood between the due time and the send."""
    events = list(history.events)
    fired = max(i for i, e in enumerate(events) if e.HasField("timer_fired_event_attributes"))
    for e in events[fired + 1:]:
        kind = e.WhichOneof("attributes")
        if kind == "activity_task_scheduled_event_attributes":
            return e.activity_task_scheduled_event_attributes.activity_type.name == "send_email"
        bookkeeping = kind in (
            "workflow_task_scheduled_event_attributes", "workflow_task_started_event_attributes",
            "workflow_task_completed_event_attributes", "upsert_workflow_search_attributes_event_attributes",
        ) or (kind == "marker_recorded_event_attributes" and e.marker_recorded_event_attributes.marker_name == "core_patch")
        if not bookkeeping:
            return False
    return False


async def test_email_is_sent_and_audited(client, task_queue, sink: SmtpSink, sessions) -> None:
    spec = make_spec()
    handle = await start(client, spec, task_queue)
    state = await handle.result()

    assert state.status is EmailStatus.SENT and state.attempts == 1
    [caught] = await sink.wait_for(1)
    assert caught.message["Message-ID"] == spec.message_id
    assert caught.rcpt_tos == ["ann@example.com"]
    email, events = await record(sessions, spec.email_id)
    assert email.status == "sent" and email.attempts == 1 and email.sent_at is not None
    assert email.provider == "smtp" and email.provider_message_id
    assert events == ["queued", "sending", "sent"]


async def test_scheduled_email_is_sent_on_time_not_early(client, task_queue, sink: SmtpSink, sessions) -> None:
    send_at = datetime.now(UTC) + timedelta(seconds=3)
    spec = make_spec(send_at=send_at)
    handle = await start(client, spec, task_queue)

    await wait_status(handle, EmailStatus.SCHEDULED)
    email, _ = await record(sessions, spec.email_id)
    assert email.status == "scheduled" and email.scheduled_for == send_at
    assert sink.messages == []

    await handle.result()
    [caught] = await sink.wait_for(1)
    assert caught.received_at >= send_at.timestamp(), "sent before its time"
    # On time by design: the one timer was set for send_at itself, and the send followed its firing
    # with nothing in between. How late the machine then is, `make bench` measures (phase E).
    history = await handle.fetch_history()
    assert set_for(history, send_at) == [True]
    assert send_follows_the_last_timer(history)


async def test_cancel_while_scheduled_never_sends(client, task_queue, sink: SmtpSink, sessions) -> None:
    spec = make_spec(send_at=datetime.now(UTC) + timedelta(seconds=2))
    handle = await start(client, spec, task_queue)
    await wait_status(handle, EmailStatus.SCHEDULED)

    state = await handle.execute_update(SendEmailWorkflow.cancel, CancelRequest(reason="customer withdrew"))
    assert state.status is EmailStatus.CANCELLED
    assert (await handle.result()).status is EmailStatus.CANCELLED

    assert sends_scheduled(await closed_run(client, spec.email_id)) == 0  # ended without a send: none can come later
    assert sink.messages == []
    email, events = await record(sessions, spec.email_id)
    assert email.status == "cancelled"
    assert events == ["queued", "scheduled", "cancelled"]


async def test_cancel_from_temporal_ui_while_scheduled_never_sends(client, task_queue, sink: SmtpSink, sessions) -> None:
    spec = make_spec(send_at=datetime.now(UTC) + timedelta(seconds=2))
    handle = await start(client, spec, task_queue)
    await wait_status(handle, EmailStatus.SCHEDULED)

    await handle.cancel()  # what the UI's and CLI's "cancel" do
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    assert (await handle.describe()).status is WorkflowExecutionStatus.CANCELED
    assert sends_scheduled(await handle.fetch_history()) == 0  # ended without a send: none can come later
    assert sink.messages == []
    email, events = await record(sessions, spec.email_id)
    assert email.status == "cancelled" and events[-1] == "cancelled"


async def test_cancel_after_sent_is_rejected(client, task_queue, sink: SmtpSink) -> None:
    spec = make_spec()
    handle = await start(client, spec, task_queue)
    await handle.result()
    with pytest.raises(RPCError, match="already completed"):
        await handle.execute_update(SendEmailWorkflow.cancel, CancelRequest())
    assert len(sink.messages) == 1


async def test_cancel_while_sending_is_rejected_and_send_completes(client, task_queue, sink: SmtpSink, sessions) -> None:
    sink.handler.data_replies.extend(["451 4.3.0 busy"] * 3)
    spec = make_spec(max_attempts=5)
    handle = await start(client, spec, task_queue)
    await wait_status(handle, EmailStatus.SENDING)

    with pytest.raises(WorkflowUpdateFailedError) as exc:
        await handle.execute_update(SendEmailWorkflow.cancel, CancelRequest())
    assert "already sending" in str(exc.value.cause)
    assert "only queued, scheduled, deferred or paused emails can be cancelled" in str(exc.value.cause)
    assert (await handle.result()).status is EmailStatus.SENT
    assert len(sink.messages) == 1
    email, _ = await record(sessions, spec.email_id)
    assert email.status == "sent" and email.attempts == 4


async def test_cancel_from_temporal_while_sending_records_the_true_outcome(client, task_queue, sink: SmtpSink, sessions) -> None:
    sink.handler.data_replies.extend(["451 4.3.0 busy"] * 2)
    spec = make_spec(max_attempts=5)
    handle = await start(client, spec, task_queue)
    await wait_status(handle, EmailStatus.SENDING)

    await handle.cancel()
    assert (await handle.result()).status is EmailStatus.SENT
    assert len(sink.messages) == 1
    email, events = await record(sessions, spec.email_id)
    assert email.status == "sent"
    assert "cancel_rejected" in events and events[-1] == "sent"


async def test_transient_failure_then_success(client, task_queue, sink: SmtpSink, sessions) -> None:
    sink.handler.data_replies.append("451 4.3.0 Try again later")
    spec = make_spec()
    state = await (await start(client, spec, task_queue)).result()

    assert state.status is EmailStatus.SENT and state.attempts == 2
    assert sink.handler.data_calls == 2 and len(sink.messages) == 1
    email, events = await record(sessions, spec.email_id)
    assert email.attempts == 2 and email.status == "sent"
    assert events == ["queued", "sending", "retrying", "sending", "sent"]


async def test_permanent_failure_fails_at_once(client, task_queue, sink: SmtpSink, sessions) -> None:
    sink.handler.data_replies.append("550 5.7.1 Message rejected as spam")
    spec = make_spec(max_attempts=5)
    handle = await start(client, spec, task_queue)

    with pytest.raises(WorkflowFailureError) as exc:
        await handle.result()
    assert "550" in str(exc.value.cause)
    assert sink.handler.data_calls == 1 and sink.messages == []
    email, events = await record(sessions, spec.email_id)
    assert email.status == "failed" and email.attempts == 1
    assert "550 5.7.1 Message rejected as spam" in (email.last_error or "")
    assert events == ["queued", "sending", "failed"]


async def test_invalid_recipient_is_permanent(client, task_queue, sink: SmtpSink, sessions) -> None:
    sink.handler.rejected_recipients["nobody@example.com"] = "550 5.1.1 No such user"
    spec = make_spec(to=["nobody@example.com"])
    with pytest.raises(WorkflowFailureError):
        await (await start(client, spec, task_queue)).result()
    email, _ = await record(sessions, spec.email_id)
    assert email.status == "failed" and email.attempts == 1
    assert "nobody@example.com: 550" in (email.last_error or "")


async def test_exhausted_retries_fail_with_every_attempt_recorded(client, task_queue, sink: SmtpSink, sessions) -> None:
    sink.handler.data_replies.extend(["421 4.4.2 Timeout"] * 3)
    spec = make_spec(max_attempts=3)
    with pytest.raises(WorkflowFailureError):
        await (await start(client, spec, task_queue)).result()
    email, events = await record(sessions, spec.email_id)
    assert email.status == "failed" and email.attempts == 3
    assert events == ["queued", "sending", "retrying", "sending", "retrying", "sending", "failed"]


async def test_retry_of_failed_email_is_a_new_run_with_same_id(client, task_queue, sink: SmtpSink, sessions) -> None:
    sink.handler.data_replies.append("554 5.0.0 Transaction failed")
    spec = make_spec()
    first = await start(client, spec, task_queue)
    with pytest.raises(WorkflowFailureError):
        await first.result()

    second = await start(client, spec, task_queue, id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY)
    assert second.id == first.id and second.result_run_id != first.result_run_id
    assert (await second.result()).status is EmailStatus.SENT
    [caught] = await sink.wait_for(1)
    assert caught.message["Message-ID"] == spec.message_id
    email, events = await record(sessions, spec.email_id)
    assert email.status == "sent"
    assert events == ["queued", "sending", "failed", "queued", "sending", "sent"]


async def test_reschedule_moves_the_send_time(client, task_queue, sink: SmtpSink, sessions) -> None:
    spec = make_spec(send_at=datetime.now(UTC) + timedelta(hours=1))
    handle = await start(client, spec, task_queue)
    await wait_status(handle, EmailStatus.SCHEDULED)

    new_time = datetime.now(UTC) + timedelta(seconds=2)
    state = await handle.execute_update(SendEmailWorkflow.reschedule, RescheduleRequest(send_at=new_time))
    assert state.send_at == new_time
    await handle.result()
    [caught] = await sink.wait_for(1)
    assert caught.received_at >= new_time.timestamp(), "sent before its new time"
    history = await handle.fetch_history()
    assert set_for(history, spec.send_at)[0] and set_for(history, new_time)[-1]  # type: ignore[arg-type]
    assert send_follows_the_last_timer(history)
    email, events = await record(sessions, spec.email_id)
    assert events == ["queued", "scheduled", "rescheduled", "sending", "sent"]


async def test_reschedule_of_cancelled_email_is_rejected(client, task_queue, sink: SmtpSink) -> None:
    spec = make_spec(send_at=datetime.now(UTC) + timedelta(hours=1))
    handle = await start(client, spec, task_queue)
    await wait_status(handle, EmailStatus.SCHEDULED)
    await handle.execute_update(SendEmailWorkflow.cancel, CancelRequest())
    with pytest.raises((WorkflowUpdateFailedError, RPCError)):
        await handle.execute_update(
            SendEmailWorkflow.reschedule, RescheduleRequest(send_at=datetime.now(UTC) + timedelta(seconds=5))
        )
    assert sink.messages == []


async def test_reschedule_of_sent_email_is_rejected(client, task_queue, sink: SmtpSink) -> None:
    spec = make_spec()
    handle = await start(client, spec, task_queue)
    assert (await handle.result()).status is EmailStatus.SENT
    with pytest.raises(RPCError, match="already completed"):
        await handle.execute_update(
            SendEmailWorkflow.reschedule, RescheduleRequest(send_at=datetime.now(UTC) + timedelta(seconds=5))
        )
    assert len(sink.messages) == 1


async def test_reschedule_while_sending_is_rejected_by_the_validator(client, task_queue, sink: SmtpSink) -> None:
    sink.handler.data_replies.extend(["451 4.3.0 busy"] * 2)
    handle = await start(client, make_spec(max_attempts=5), task_queue)
    await wait_status(handle, EmailStatus.SENDING)
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(
            SendEmailWorkflow.reschedule, RescheduleRequest(send_at=datetime.now(UTC) + timedelta(seconds=5))
        )
    assert "only scheduled emails can be rescheduled; this one is sending" in str(refused.value.cause)
    assert (await handle.result()).status is EmailStatus.SENT


async def test_templated_email_renders_pinned_version(client, task_queue, sink: SmtpSink, sessions) -> None:
    name = f"welcome-{task_queue[-8:]}"
    async with sessions() as s:
        v1 = await save_template_version(
            s, EmailTemplate(name=name, subject="Welcome {{ name }}", html="<p>Hi {{ name }}</p>", text="Hi {{ name }}")
        )
    spec = make_spec(send_at=datetime.now(UTC) + timedelta(seconds=2))
    spec.content = None
    spec.template = TemplateRef(name=name, version=v1.version, data={"name": "<Ann>"})
    handle = await start(client, spec, task_queue)
    await wait_status(handle, EmailStatus.SCHEDULED)
    async with sessions() as s:  # an edit while the email waits must not change it
        await save_template_version(s, EmailTemplate(name=name, subject="CHANGED", html="x", text="x"))

    await handle.result()
    [caught] = await sink.wait_for(1)
    msg = caught.message
    assert msg["Subject"] == "Welcome <Ann>"
    html = msg.get_body(("html",)).get_content()
    assert "&lt;Ann&gt;" in html and "<Ann>" not in html
    email, _ = await record(sessions, spec.email_id)  # the record keeps what was sent, for people reading it
    assert email.subject == "Welcome <Ann>" and email.text == "Hi <Ann>"
    assert email.html is not None and "<p>Hi &lt;Ann&gt;</p>" in email.html


async def test_template_error_fails_permanently(client, task_queue, sink: SmtpSink, sessions) -> None:
    name = f"broken-{task_queue[-8:]}"
    async with sessions() as s:
        v1 = await save_template_version(s, EmailTemplate(name=name, subject="{{ who }}", html="<p>{{ who }}</p>"))
    spec = make_spec()
    spec.content = None
    spec.template = TemplateRef(name=name, version=v1.version, data={})
    with pytest.raises(WorkflowFailureError):
        await (await start(client, spec, task_queue)).result()
    email, events = await record(sessions, spec.email_id)
    assert email.status == "failed" and "'who' is undefined" in (email.last_error or "")
    assert sink.messages == []


async def test_template_store_outage_delays_the_email_without_using_attempts(client, settings, sink: SmtpSink, sessions) -> None:
    from mailqueue.template_library import Renderer
    from mailqueue.db import create_engine, sessionmaker
    from mailqueue.templating import TemplateEngine
    from worker import build_worker

    name = f"outage-{settings.task_queue[-8:]}"
    async with sessions() as s:
        v1 = await save_template_version(s, EmailTemplate(name=name, subject="Hi {{ n }}", html="<p>{{ n }}</p>"))
    renderer = Renderer(sessionmaker(create_engine(UNREACHABLE_DATABASE)), TemplateEngine())
    tq = settings.task_queue + "-outage"
    async with build_worker(client, settings, task_queue=tq, renderer=renderer):
        spec = make_spec(max_attempts=1)  # a used-up attempt would fail it
        spec.content = None
        spec.template = TemplateRef(name=name, version=v1.version, data={"n": "there"})
        handle = await start(client, spec, tq)

        async def asked_twice() -> bool:  # and waited between the asks: the store is away
            return sends_scheduled(await handle.fetch_history()) >= 2

        await eventually(asked_twice, timeout=EMAIL_SETTLES, interval=0.2, what="the send step was not asked again")
        assert sink.messages == []
        assert (await handle.describe()).status is WorkflowExecutionStatus.RUNNING
        assert (await handle.query(SendEmailWorkflow.status)).status is EmailStatus.SENDING
        renderer.sessions = sessions  # the database is back: the next ask (at most ASK_AGAIN_MAX_DELAY away) sends
        state = await asyncio.wait_for(handle.result(), ASK_AGAIN_MAX_DELAY + EMAIL_SETTLES)
    assert state.status is EmailStatus.SENT and state.attempts == 1
    [caught] = await sink.wait_for(1)
    assert caught.message["Subject"] == "Hi there"
    email, events = await record(sessions, spec.email_id)
    assert email.status == "sent" and events == ["queued", "sending", "sent"]


async def test_log_driver_delivers_without_a_mail_server(client, settings, sessions) -> None:
    from mailqueue.config import DriverName
    from worker import build_worker

    log_settings = settings.model_copy(update={"driver": DriverName.LOG, "task_queue": settings.task_queue + "-log"})
    async with build_worker(client, log_settings):
        spec = make_spec()
        state = await (await start(client, spec, log_settings.task_queue)).result()
    assert state.status is EmailStatus.SENT and state.provider_message_id == spec.message_id
    email, events = await record(sessions, spec.email_id)
    assert email.provider == "log" and events == ["queued", "sending", "sent"]


async def test_unreachable_mail_server_is_waited_for_without_using_attempts(client, task_queue, sink: SmtpSink, sessions, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    sink.down()  # connections refused: nothing can be handed over
    spec = make_spec(max_attempts=1)  # a used-up attempt would fail it
    handle = await start(client, spec, task_queue)

    async def waited_twice() -> bool:
        async with sessions() as s:
            return [e.event for e in await events_of(s, spec.email_id)].count("retrying") >= 2

    await eventually(waited_twice, timeout=EMAIL_SETTLES, interval=0.2, what="the email did not wait for the server twice")
    assert (await handle.describe()).status is WorkflowExecutionStatus.RUNNING
    email, events = await record(sessions, spec.email_id)
    assert email.status == "retrying" and email.attempts == 0, (email.status, email.attempts)
    assert "could not be reached" in (email.last_error or "")
    assert events.count("retrying") >= 2 and "failed" not in events, events
    async with sessions() as s:
        details = [e.detail for e in await events_of(s, spec.email_id) if e.event == "retrying"]
    assert all("not counted as an attempt" in (d or "") for d in details), details
    # Each ask is one WARNING line saying why, not the SDK's failed-activity traceback (hours of
    # an outage, thousands of emails waiting: that would flood the logs).
    mine = [r for r in caplog.records if spec.email_id in r.getMessage() and "not counted as an attempt" in r.getMessage()]
    assert len(mine) >= 2 and all(r.levelno == logging.WARNING and not r.exc_info for r in mine)
    sdk = [r for r in caplog.records if r.getMessage().startswith("Completing activity as failed") and spec.email_id in str(r.__dict__)]
    assert sdk and all(r.levelno == logging.DEBUG for r in sdk), [(r.levelname, r.getMessage()) for r in sdk]

    sink.up()  # the next ask (at most UNREACHABLE_MAX_DELAY away) sends
    state = await asyncio.wait_for(handle.result(), UNREACHABLE_MAX_DELAY + EMAIL_SETTLES)
    assert state.status is EmailStatus.SENT and state.attempts == 1
    [caught] = await sink.wait_for(1)
    assert caught.message["Message-ID"] == spec.message_id
    email, events = await record(sessions, spec.email_id)
    assert email.status == "sent" and events[-2:] == ["sending", "sent"]


async def test_a_server_unreachable_for_longer_than_the_wait_fails_the_email_with_the_reason(client, task_queue, sink: SmtpSink, sessions) -> None:
    sink.down()
    spec = make_spec(max_attempts=3)
    spec.retry.unreachable_wait_seconds = 2.5
    handle = await start(client, spec, task_queue)
    with pytest.raises(WorkflowFailureError) as caught:
        await asyncio.wait_for(handle.result(), spec.retry.unreachable_wait_seconds + EMAIL_SETTLES)
    assert "still unreachable after waiting" in str(caught.value.cause)
    email, events = await record(sessions, spec.email_id)
    assert email.status == "failed" and "could not be reached" in (email.last_error or "")
    assert "still unreachable after waiting" in (email.last_error or "") and events[-1] == "failed"
    assert sink.messages == []


async def test_with_no_unreachable_wait_an_unreachable_server_is_an_ordinary_failed_attempt(client, task_queue, sink: SmtpSink, sessions) -> None:
    sink.down()
    spec = make_spec(max_attempts=2)
    spec.retry.unreachable_wait_seconds = 0
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for((await start(client, spec, task_queue)).result(), EMAIL_SETTLES)
    email, events = await record(sessions, spec.email_id)
    assert email.status == "failed" and email.attempts == 2
    assert events == ["queued", "sending", "retrying", "sending", "failed"]
    assert "could not be reached" in (email.last_error or "") and "still unreachable" not in (email.last_error or "")
