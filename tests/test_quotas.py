"""Sender quotas (hourly/daily): counted atomically, and an email over a limit waits, never fails."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlmodel import select
from temporalio.client import Client

from activities.quota import QuotaActivities
from mailqueue.config import Settings
from mailqueue.contracts import CancelRequest, EmailState, EmailStatus, QuotaRequest, SenderType, workflow_id_for
from mailqueue.email_store import events_of
from mailqueue.models import SenderUsage, User
from tests.helpers import EMAIL_SETTLES, SmtpSink, eventually, make_sender, make_spec
from worker import build_worker
from workflows.send_email import SendEmailWorkflow


class FrozenClock:
    """A clock for the quota step that stands still until the test moves it: a quota window then
    lasts exactly as long as the test wants, however slow the machine is."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_fifty_parallel_sends_never_pass_the_limit(sessions: Any, settings: Settings) -> None:
    fixed = time.time()
    quota = QuotaActivities(sessions, settings, clock=lambda: fixed)
    hourly = await make_sender(sessions, hourly_limit=20)
    answers = await asyncio.gather(*(quota.reserve(QuotaRequest(SenderType.USER, hourly)) for _ in range(50)))
    assert sum(a.ok for a in answers) == 20
    refused = [a for a in answers if not a.ok]
    assert refused[0].retry_at is not None and refused[0].retry_at.timestamp() > fixed
    assert "hourly limit of 20" in (refused[0].detail or "")

    # The tighter limit wins, and a slot refused by one window is not kept in the other.
    both = await make_sender(sessions, hourly_limit=20, daily_limit=7)
    answers = await asyncio.gather(*(quota.reserve(QuotaRequest(SenderType.USER, both)) for _ in range(50)))
    assert sum(a.ok for a in answers) == 7
    async with sessions() as s:
        rows = (await s.exec(select(SenderUsage).where(SenderUsage.sender == f"user:{both}"))).all()
        counts = {u.window[0]: u.count for u in rows}
    assert counts == {"h": 7, "d": 7}

    unlimited = await make_sender(sessions)
    assert all(a.ok for a in await asyncio.gather(*(quota.reserve(QuotaRequest(SenderType.USER, unlimited)) for _ in range(10))))
    assert (await quota.reserve(QuotaRequest(SenderType.SYSTEM, None))).ok


async def test_the_admins_ceiling_is_the_limit_when_it_is_lower_than_the_users_own(sessions: Any, settings: Settings) -> None:
    quota = QuotaActivities(sessions, settings, clock=FrozenClock(3600 * 2000 + 10))
    capped = await make_sender(sessions, hourly_limit=20)
    free = await make_sender(sessions)  # no limit of their own: the ceiling alone counts
    looser = await make_sender(sessions, hourly_limit=2)  # their own is lower than the ceiling: theirs counts
    async with sessions() as s:
        for user_id in (capped, free, looser):
            user = await s.get(User, user_id)
            assert user is not None
            user.hourly_limit, user.daily_limit = 3, (4 if user_id == free else None)
            s.add(user)
        await s.commit()
    for user_id, hourly, allowed in ((capped, 3, 3), (free, 3, 3), (looser, 2, 2)):
        answers = await asyncio.gather(*(quota.reserve(QuotaRequest(SenderType.USER, user_id)) for _ in range(10)))
        assert sum(a.ok for a in answers) == allowed, user_id
        assert f"hourly limit of {hourly} " in next(a.detail for a in answers if not a.ok)
    # The next hour: the free user's daily ceiling of 4 leaves one.
    later = QuotaActivities(sessions, settings, clock=FrozenClock(3600 * 2001 + 10))
    answers = [await later.reserve(QuotaRequest(SenderType.USER, free)) for _ in range(3)]
    assert [a.ok for a in answers] == [True, False, False] and "daily limit of 4 " in (answers[1].detail or "")


async def test_the_retry_time_is_the_window_end_in_real_time(sessions: Any, settings: Settings) -> None:
    """With the real clock the answer names the window's end; with another clock, the same
    remaining length from now (the workflow's timer runs on real time)."""
    user_id = await make_sender(sessions, hourly_limit=1)
    real = QuotaActivities(sessions, settings)
    assert (await real.reserve(QuotaRequest(SenderType.USER, user_id))).ok
    answer = await real.reserve(QuotaRequest(SenderType.USER, user_id))
    assert not answer.ok and answer.retry_at is not None
    assert answer.retry_at.timestamp() % 3600 == 0 and 0 < answer.retry_at.timestamp() - time.time() <= 3600

    other = await make_sender(sessions, hourly_limit=1)
    frozen = QuotaActivities(sessions, settings, clock=FrozenClock(3600 * 1000 - 2))  # 2 s before a window ends
    assert (await frozen.reserve(QuotaRequest(SenderType.USER, other))).ok
    before = time.time()
    answer = await frozen.reserve(QuotaRequest(SenderType.USER, other))
    assert answer.retry_at is not None and before + 2 - 0.001 <= answer.retry_at.timestamp() <= time.time() + 2 + 0.001


async def test_over_the_hourly_limit_emails_wait_for_the_window_and_none_fails(
    client: Client, settings: Settings, sink: SmtpSink, sessions: Any
) -> None:
    clock = FrozenClock(3600 * 1_000_000 - 1)  # a second before an hour ends, and it stays there until moved
    queue = settings.task_queue + "-quota"
    user_id = await make_sender(sessions, hourly_limit=5)
    async with build_worker(client, settings.model_copy(update={"task_queue": queue}), clock=clock):
        handles = []
        for _ in range(8):
            spec = make_spec(sender_type=SenderType.USER, sender_id=user_id)
            handles.append(await client.start_workflow(SendEmailWorkflow.run, spec, id=workflow_id_for(spec.email_id), task_queue=queue))

        async def settled() -> list[EmailStatus] | None:
            states = [(await h.query(SendEmailWorkflow.status)).status for h in handles]
            return states if states.count(EmailStatus.SENT) == 5 and states.count(EmailStatus.DEFERRED) == 3 else None

        await eventually(settled, timeout=EMAIL_SETTLES, interval=0.1, what="not 5 sent and 3 deferred")
        deferred = [h for h in handles if (await h.query(SendEmailWorkflow.status)).status is EmailStatus.DEFERRED]

        async def refused_again() -> bool:  # each asked again when its wait was over, and was told to wait again
            async with sessions() as s:
                counts = [[e.event for e in await events_of(s, h.id.removeprefix("email-"))].count("deferred") for h in deferred]
            return all(n >= 2 for n in counts)

        await eventually(refused_again, timeout=EMAIL_SETTLES, interval=0.1, what="the deferred emails did not ask again")
        assert len(sink.messages) == 5

        clock.now += 2  # the next hour's window opens
        results: list[EmailState] = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), EMAIL_SETTLES)
    assert [r.status for r in results] == [EmailStatus.SENT] * 8
    late = {str(m.message["Message-ID"]) for m in sink.messages[5:]}
    assert late == {f"<{h.id.removeprefix('email-')}@example.com>" for h in deferred}, "only the deferred ones went out after the window opened"
    async with sessions() as s:
        for h in handles:
            events = [e.event for e in await events_of(s, h.id.removeprefix("email-"))]
            assert "failed" not in events
            assert ("deferred" in events) == (h in deferred)


async def test_a_deferred_email_can_be_cancelled_and_is_never_sent(client: Client, settings: Settings, sink: SmtpSink, sessions: Any) -> None:
    tq = settings.model_copy(update={"task_queue": settings.task_queue + "-cancel-deferred"})
    user_id = await make_sender(sessions, daily_limit=1)
    async with build_worker(client, tq):
        first, second = make_spec(sender_type=SenderType.USER, sender_id=user_id), make_spec(sender_type=SenderType.USER, sender_id=user_id)
        await (await client.start_workflow(SendEmailWorkflow.run, first, id=workflow_id_for(first.email_id), task_queue=tq.task_queue)).result()
        handle = await client.start_workflow(SendEmailWorkflow.run, second, id=workflow_id_for(second.email_id), task_queue=tq.task_queue)

        async def deferred() -> bool:
            return (await handle.query(SendEmailWorkflow.status)).status is EmailStatus.DEFERRED

        await eventually(deferred, timeout=EMAIL_SETTLES, what="the second email was never deferred")
        state = await handle.execute_update(SendEmailWorkflow.cancel, CancelRequest(reason="not today"))
        assert state.status is EmailStatus.CANCELLED
        assert (await handle.result()).status is EmailStatus.CANCELLED
    assert [m.message["Message-ID"] for m in sink.messages] == [first.message_id]
    async with sessions() as s:
        events = [e.event for e in await events_of(s, second.email_id)]
    assert events == ["queued", "deferred", "cancelled"]
