"""Sender quotas (hourly/daily) and test mode, on a real worker, database and SMTP server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlmodel import select
from temporalio.client import Client

from activities.quota import QuotaActivities
from mailqueue.accounts import new_id
from mailqueue.config import Settings
from mailqueue.contracts import EmailState, EmailStatus, QuotaRequest, workflow_id_for
from mailqueue.models import SenderSettings, SenderUsage, User
from mailqueue.store import events_of
from tests.helpers import SmtpSink, make_spec
from worker import build_worker
from workflows.send_email import SendEmailWorkflow


async def _sender(sessions: Any, **limits: int) -> str:
    user_id = new_id()
    async with sessions() as s:
        s.add(User(id=user_id, name=f"quota-{user_id}"))
        await s.commit()
        s.add(SenderSettings(user_id=user_id, **limits))
        await s.commit()
    return user_id


async def test_fifty_parallel_sends_never_pass_the_limit(sessions: Any, settings: Settings) -> None:
    fixed = time.time()
    quota = QuotaActivities(sessions, settings, clock=lambda: fixed)
    hourly = await _sender(sessions, hourly_limit=20)
    answers = await asyncio.gather(*(quota.reserve(QuotaRequest("user", hourly)) for _ in range(50)))
    assert sum(a.ok for a in answers) == 20
    refused = [a for a in answers if not a.ok]
    assert refused[0].retry_at is not None and refused[0].retry_at.timestamp() > fixed
    assert "hourly limit of 20" in (refused[0].detail or "")

    # The tighter limit wins, and a slot refused by one window is not kept in the other.
    both = await _sender(sessions, hourly_limit=20, daily_limit=7)
    answers = await asyncio.gather(*(quota.reserve(QuotaRequest("user", both)) for _ in range(50)))
    assert sum(a.ok for a in answers) == 7
    async with sessions() as s:
        rows = (await s.exec(select(SenderUsage).where(SenderUsage.sender == f"user:{both}"))).all()
        counts = {u.window[0]: u.count for u in rows}
    assert counts == {"h": 7, "d": 7}

    unlimited = await _sender(sessions)
    assert all(a.ok for a in await asyncio.gather(*(quota.reserve(QuotaRequest("user", unlimited)) for _ in range(10))))
    assert (await quota.reserve(QuotaRequest("system", None))).ok


async def test_over_the_hourly_limit_emails_wait_for_the_window_and_none_fails(
    client: Client, settings: Settings, sink: SmtpSink, sessions: Any
) -> None:
    window = 8
    quota_settings = settings.model_copy(update={"quota_hour_seconds": window, "task_queue": settings.task_queue + "-quota"})
    user_id = await _sender(sessions, hourly_limit=5)
    # Start right after a window opens, so that all eight ask within the same window.
    await asyncio.sleep(window - time.time() % window + 0.2)
    opened = time.time()
    async with build_worker(client, quota_settings):
        handles = []
        for _ in range(8):
            spec = make_spec(sender_type="user", sender_id=user_id)
            handles.append(await client.start_workflow(
                SendEmailWorkflow.run, spec, id=workflow_id_for(spec.email_id), task_queue=quota_settings.task_queue
            ))
        await sink.wait_for(5)

        async def settled() -> list[EmailStatus]:
            while True:
                states = [(await h.query(SendEmailWorkflow.status)).status for h in handles]
                if all(s in (EmailStatus.SENT, EmailStatus.DEFERRED) for s in states):
                    return states
                await asyncio.sleep(0.1)

        states = await asyncio.wait_for(settled(), window - 1)
        assert time.time() < opened + window, "the test ran past its window: the check below would mean nothing"
        assert states.count(EmailStatus.SENT) == 5 and states.count(EmailStatus.DEFERRED) == 3
        assert len(sink.messages) == 5

        results: list[EmailState] = await asyncio.gather(*(h.result() for h in handles))
    assert [r.status for r in results] == [EmailStatus.SENT] * 8
    late = sorted(m.received_at for m in sink.messages)[5:]
    assert len(late) == 3 and all(at >= opened + window - 1 for at in late)
    async with sessions() as s:
        deferred = 0
        for h in handles:
            events = [e.event for e in await events_of(s, h.id.removeprefix("email-"))]
            assert "failed" not in events
            deferred += "deferred" in events
    assert deferred == 3


async def test_test_mode_sends_everything_to_one_address_and_keeps_the_recipients_in_headers(
    client: Client, settings: Settings, sink: SmtpSink
) -> None:
    redirect_settings = settings.model_copy(update={"test_redirect_to": "qa@example.com", "task_queue": settings.task_queue + "-redirect"})
    spec = make_spec(to=["Ann <ann@example.com>"], cc=["cc@example.com"], bcc=["hidden@example.com"])
    async with build_worker(client, redirect_settings):
        await (await client.start_workflow(
            SendEmailWorkflow.run, spec, id=workflow_id_for(spec.email_id), task_queue=redirect_settings.task_queue
        )).result()
    [caught] = await sink.wait_for(1)
    assert caught.rcpt_tos == ["qa@example.com"]
    msg = caught.message
    assert msg["To"] == "qa@example.com" and msg["Cc"] is None
    assert msg["X-Original-To"] == "Ann <ann@example.com>" and msg["X-Original-Cc"] == "cc@example.com"
    assert msg["X-Original-Bcc"] == "hidden@example.com"


async def test_a_rated_driver_sends_through_its_own_queue_at_its_rate(client: Client, settings: Settings, sink: SmtpSink) -> None:
    rated = settings.model_copy(update={"send_rates": {"smtp": 2.0}, "task_queue": settings.task_queue + "-rated"})
    specs = [make_spec(send_queue="smtp") for _ in range(6)]
    async with build_worker(client, rated) as workers:
        assert [w.task_queue for w in workers.workers] == [rated.task_queue, rated.task_queue + ".smtp"]
        handles = [
            await client.start_workflow(SendEmailWorkflow.run, spec, id=workflow_id_for(spec.email_id), task_queue=rated.task_queue)
            for spec in specs
        ]
        results = await asyncio.gather(*(h.result() for h in handles))
    assert all(r.status is EmailStatus.SENT for r in results)
    times = sorted(m.received_at for m in sink.messages)
    assert len(times) == 6
    # Six sends at two a second cannot all go out in the first second and a half.
    assert times[-1] - times[0] >= 1.5, times
    for h in handles:
        history = await h.fetch_history()
        [scheduled] = [e for e in history.events if e.HasField("activity_task_scheduled_event_attributes")]
        assert scheduled.activity_task_scheduled_event_attributes.task_queue.name == rated.task_queue + ".smtp"


async def test_the_api_picks_the_rated_queue_of_the_driver_the_sender_uses(sessions: Any, settings: Settings) -> None:
    from mailqueue.delivery import send_queue_for

    rated = settings.model_copy(update={"send_rates": {"smtp": 5.0, "sendgrid": 10.0}})
    sendgrid_user = await _sender(sessions)
    system_user = await _sender(sessions)
    async with sessions() as s:
        row = await s.get(SenderSettings, sendgrid_user)
        assert row is not None
        row.driver = "sendgrid"
        s.add(row)
        await s.commit()
        assert await send_queue_for(s, rated, "system", None) == "smtp"  # the system's driver
        assert await send_queue_for(s, rated, "user", sendgrid_user) == "sendgrid"
        assert await send_queue_for(s, rated, "user", system_user) == "smtp"  # system_smtp: the system's driver
        assert await send_queue_for(s, rated.model_copy(update={"send_rates": {"ses": 1.0}}), "user", sendgrid_user) is None
        assert await send_queue_for(s, settings, "user", sendgrid_user) is None  # no rates: the main queue


async def test_a_deferred_email_can_be_cancelled_and_is_never_sent(client: Client, settings: Settings, sink: SmtpSink, sessions: Any) -> None:
    from mailqueue.contracts import CancelRequest

    tq = settings.model_copy(update={"task_queue": settings.task_queue + "-cancel-deferred"})
    user_id = await _sender(sessions, daily_limit=1)
    async with build_worker(client, tq):
        first, second = make_spec(sender_type="user", sender_id=user_id), make_spec(sender_type="user", sender_id=user_id)
        await (await client.start_workflow(SendEmailWorkflow.run, first, id=workflow_id_for(first.email_id), task_queue=tq.task_queue)).result()
        handle = await client.start_workflow(SendEmailWorkflow.run, second, id=workflow_id_for(second.email_id), task_queue=tq.task_queue)
        while (await handle.query(SendEmailWorkflow.status)).status is not EmailStatus.DEFERRED:
            await asyncio.sleep(0.05)
        state = await handle.execute_update(SendEmailWorkflow.cancel, CancelRequest(reason="not today"))
        assert state.status is EmailStatus.CANCELLED
        assert (await handle.result()).status is EmailStatus.CANCELLED
    assert [m.message["Message-ID"] for m in sink.messages] == [first.message_id]
    async with sessions() as s:
        events = [e.event for e in await events_of(s, second.email_id)]
    assert events == ["queued", "deferred", "cancelled"]
