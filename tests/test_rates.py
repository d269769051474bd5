"""Which driver, which queue, which limits: one sender resolution, read once per step; rated send queues."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities.quota import QuotaActivities
from activities.send import SendActivities
from api.schemas.emails import EmailRequest
from api.services.context import Context
from api.services.emails import prepare_email
from mailqueue.accounts import Principal, PrincipalKind
from mailqueue.config import Settings
from mailqueue.contracts import EmailStatus, QuotaRequest, SenderType, SendRequest, workflow_id_for
from mailqueue.crypto import SecretBox
from mailqueue.db import create_engine, sessionmaker
from mailqueue.drivers.base import DriverName
from mailqueue.drivers.factory import DriverFactory, driver_from_settings
from mailqueue.email_store import events_of
from mailqueue.models import Role, SenderSettings
from mailqueue.senders import route_of
from mailqueue.template_library import Renderer
from mailqueue.templating import TemplateEngine
from tests.helpers import SmtpSink, executed, make_sender, make_spec
from worker import build_worker
from workflows.send_email import SendEmailWorkflow


def test_one_resolution_answers_driver_queue_and_limits() -> None:
    rated = Settings(send_rates={"smtp": 5.0, "sendgrid": 10.0}, _env_file=None)  # type: ignore[call-arg]
    plain = Settings(_env_file=None)  # type: ignore[call-arg]
    own = SenderSettings(user_id="u1", driver="sendgrid", hourly_limit=5, daily_limit=50, default_from="Ann <ann@example.com>")
    systems = SenderSettings(user_id="u2", driver="system_smtp", hourly_limit=7)

    system = route_of(rated, SenderType.SYSTEM, None, None)
    assert (system.driver, system.send_queue, system.hourly_limit, system.own_driver) == (DriverName.SMTP, "smtp", None, False)
    user = route_of(rated, SenderType.USER, "u1", own)
    assert (user.driver, user.send_queue, user.own_driver) == (DriverName.SENDGRID, "sendgrid", True)
    assert (user.hourly_limit, user.daily_limit, user.default_from) == (5, 50, "Ann <ann@example.com>")
    on_system = route_of(rated, SenderType.USER, "u2", systems)  # system_smtp: the system's driver, its own limits
    assert (on_system.driver, on_system.send_queue, on_system.hourly_limit, on_system.own_driver) == (DriverName.SMTP, "smtp", 7, False)
    assert route_of(rated.model_copy(update={"send_rates": {"ses": 1.0}}), SenderType.USER, "u1", own).send_queue is None
    assert route_of(plain, SenderType.USER, "u1", own).send_queue is None  # no rates: the main queue
    assert route_of(plain.model_copy(update={"driver": DriverName.LOG}), SenderType.SYSTEM, None, None).driver is DriverName.LOG


def test_a_sender_cannot_be_the_systems_drivers_and_the_system_none_of_the_senders() -> None:
    with pytest.raises(ValueError, match="the system's driver"):
        Settings(driver="sendgrid", _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="unknown driver"):
        Settings(send_rates={"system_smtp": 1.0}, _env_file=None)  # type: ignore[call-arg]


async def test_each_step_reads_the_senders_settings_once(settings: Settings, database_url: str, sink: SmtpSink) -> None:
    engine = create_engine(database_url)
    sessions = sessionmaker(engine)
    try:
        user_id = await make_sender(
            sessions, driver="user_smtp", smtp_host="localhost", smtp_port=sink.port, smtp_security="none",
            hourly_limit=100, default_from="Ann <ann@example.org>", domains=("example.org",),
        )
        rated = settings.model_copy(update={"send_rates": {"user_smtp": 100.0}})
        principal = Principal(kind=PrincipalKind.USER, id=user_id, role=Role.USER)
        async with sessions() as session:
            ctx = Context(principal, session, rated, temporal=None, templates=TemplateEngine(), secrets=SecretBox.from_settings(rated))  # type: ignore[arg-type]
            with executed(engine, "FROM sender_settings") as reads:
                prepared = await prepare_email(ctx, EmailRequest(to=["bob@example.com"], subject="s", text="t"), None)
        assert len(reads) == 1, reads  # acceptance: the From, the queue
        assert prepared.spec.from_address == "Ann <ann@example.org>" and prepared.spec.send_queue == "user_smtp"

        with executed(engine, "FROM sender_settings") as reads:
            assert (await QuotaActivities(sessions, rated).reserve(QuotaRequest(SenderType.USER, user_id))).ok
        assert len(reads) == 1, reads  # the quota step: the limits

        send = SendActivities(sessions, DriverFactory(rated, driver_from_settings(rated)), Renderer(sessions, TemplateEngine()), rated)
        env = ActivityEnvironment()
        env.info = dataclasses.replace(
            env.info, attempt=1, workflow_run_id=str(uuid.uuid4()), activity_type="send_email",
            started_time=datetime.now(UTC), start_to_close_timeout=timedelta(seconds=10),
        )
        with executed(engine, "FROM sender_settings") as reads:
            result = await env.run(send.send, SendRequest(prepared.spec))
        assert len(reads) == 1, reads  # the send step: the driver
        assert result.provider == "smtp" and sink.by_message_id(prepared.spec.message_id)
    finally:
        await engine.dispose()


async def test_a_rated_driver_sends_through_its_own_queue_at_its_rate(client: Client, settings: Settings, sink: SmtpSink) -> None:
    rated = settings.model_copy(update={"send_rates": {"smtp": 2.0}, "task_queue": settings.task_queue + "-rated"})
    specs = [make_spec(send_queue="smtp") for _ in range(6)]
    async with build_worker(client, rated) as workers:
        # The main queue, the rated driver's, and the webhook deliveries' (their own slots, never a send's).
        assert [w.task_queue for w in workers.workers] == [rated.task_queue, rated.task_queue + ".smtp", rated.task_queue + "-webhooks"]
        handles = [
            await client.start_workflow(SendEmailWorkflow.run, spec, id=workflow_id_for(spec.email_id), task_queue=rated.task_queue)
            for spec in specs
        ]
        results = await asyncio.gather(*(h.result() for h in handles))
    assert all(r.status is EmailStatus.SENT for r in results)
    times = sorted(m.received_at for m in sink.messages)
    assert len(times) == 6
    # Six sends at two a second cannot all go out in the first second and a half (a lower bound:
    # a busy machine only makes it longer).
    assert times[-1] - times[0] >= 1.5, times
    for h in handles:
        history = await h.fetch_history()
        [scheduled] = [e for e in history.events if e.HasField("activity_task_scheduled_event_attributes")]
        assert scheduled.activity_task_scheduled_event_attributes.task_queue.name == rated.task_queue + ".smtp"


async def test_a_sender_who_changed_drivers_is_sent_from_the_new_drivers_queue(
    client: Client, settings: Settings, sink: SmtpSink, sessions: Any
) -> None:
    """Queued while the user sent through the system's SMTP (its rated queue), sent after they
    switched to their own server: the send step says so without sending, and the workflow sends
    from the new driver's queue, so the new driver's rate holds and the new driver sends."""
    rated = settings.model_copy(update={"send_rates": {"smtp": 100.0, "user_smtp": 100.0}, "task_queue": settings.task_queue + "-moved"})
    user_id = await make_sender(sessions, driver="user_smtp", smtp_host="localhost", smtp_port=sink.port, smtp_security="none")
    spec = make_spec(sender_type=SenderType.USER, sender_id=user_id, send_queue="smtp", max_attempts=1)
    async with build_worker(client, rated):
        handle = await client.start_workflow(SendEmailWorkflow.run, spec, id=workflow_id_for(spec.email_id), task_queue=rated.task_queue)
        state = await handle.result()
    assert state.status is EmailStatus.SENT and state.attempts == 1
    assert len(sink.by_message_id(spec.message_id)) == 1
    history = await handle.fetch_history()
    queues = [
        e.activity_task_scheduled_event_attributes.task_queue.name
        for e in history.events if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert queues == [rated.task_queue + ".smtp", rated.task_queue + ".user_smtp"]
    [moved] = [e for e in history.events if e.HasField("activity_task_failed_event_attributes")]
    assert moved.activity_task_failed_event_attributes.failure.application_failure_info.type == "SendQueueChanged"
    async with sessions() as s:
        assert [e.event for e in await events_of(s, spec.email_id)] == ["queued", "sending", "sent"]
