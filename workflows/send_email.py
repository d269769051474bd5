"""SendEmailWorkflow: the life of one email, from accepted to sent, failed or cancelled."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, NoReturn

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeUpdate
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.exceptions import TimeoutError as TemporalTimeoutError

with workflow.unsafe.imports_passed_through():
    from activities.audit import AuditActivities
    from activities.quota import QuotaActivities
    from activities.render import RenderActivities
    from activities.send import SendActivities
    from mailqueue import search
    from mailqueue.contracts import (
        CANCEL_UPDATE,
        EMAIL_FAILED,
        NOT_SENT_ASK_AGAIN,
        PERMANENT_DELIVERY_ERROR,
        RESCHEDULE_UPDATE,
        RESUME_SIGNAL,
        SEND_EMAIL_WORKFLOW,
        SEND_QUEUE_CHANGED,
        SENDING_PAUSED,
        SERVER_UNREACHABLE,
        STATUS_QUERY,
        TEMPLATE_ERROR,
        AuditEntry,
        CancelRequest,
        Content,
        EmailSpec,
        EmailState,
        EmailStatus,
        EventType,
        QuotaRequest,
        RenderRequest,
        RescheduleRequest,
        SenderType,
        SendRequest,
        SendResult,
        cancel_refusal,
        reschedule_refusal,
        send_queue_name,
    )
    from workflows.timer import UpdatableTimer

# The steps that read or write the database (audit, quota; and, for emails from before
# SEND_RENDERS, render) are local activities: they run inside the workflow task, so they add no
# server round trips. They retry without limit: a database outage delays, never loses.
_DATABASE_STEP = dict(
    start_to_close_timeout=timedelta(seconds=15),
    retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=30)),
)
_RENDER = dict(
    start_to_close_timeout=timedelta(seconds=30),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(milliseconds=200),
        maximum_interval=timedelta(seconds=30),
        non_retryable_error_types=[TEMPLATE_ERROR],
    ),
)


# Workflow changes, each guarded by workflow.patched so that emails already in flight replay.
# The send activity renders the template (the rendered mail stays out of the history, and
# rendering runs in an activity, not inside a workflow task); a template store outage waits.
SEND_RENDERS = "send-renders-the-template"
# Emails of users with hourly/daily limits take a quota slot before sending, or wait (deferred).
SENDER_QUOTA = "sender-quota"
# A server that cannot be reached is waited for (up to RetrySettings.unreachable_wait_seconds),
# asking again at most UNREACHABLE_MAX_DELAY apart, without using up attempts.
SERVER_UNREACHABLE_WAITS = "server-unreachable-waits"
# The waits of one run must not outgrow its history (Temporal ends a run at 51,200 events or
# 50 MB; each ask carries the email): past these, a wait gives up and the email fails, recorded.
HISTORY_BUDGET_EVENTS = 20_000
HISTORY_BUDGET_BYTES = 25_000_000
UNREACHABLE_MAX_DELAY = 60
# Between asks for anything else that stops a send without being an attempt (the database away).
ASK_AGAIN_MAX_DELAY = 30
# The sender's driver changed since the email was queued, and its sends wait in another rated
# queue (MAILQUEUE_SEND_RATES): the send step said so without sending, and the workflow sends
# from that queue at once. The patch is asked only when such an answer arrives.
SEND_FOLLOWS_THE_SENDER = "send-follows-the-senders-queue"
# The email's search attributes (mailqueue/search.py) follow its status and due time, for the
# Temporal UI. Only for runs started with them (MAILQUEUE_SEARCH_ATTRIBUTES): the patch is asked
# at the first change of such a run.
SEARCH_ATTRIBUTES = "search-attributes"
# Every recipient was suppressed (a bounce, a complaint, an unsubscribe) after the email was
# accepted: the send step sent nothing and recorded it; the email ends `suppressed`, not `sent`.
# The patch is asked only when such an answer arrives.
SUPPRESSED_AT_SEND = "send-honours-suppressions"
# Sending is paused for the email (the kill switch `sending.paused`, its driver turned off, or users'
# own SMTP turned off: mailqueue/flags.py): the send step sent nothing and said so. The email waits,
# `paused` and cancellable, for the `resume` signal (sent by the API when such a flag changes) or its
# next look, PAUSE_FIRST_LOOK seconds later and doubling up to PAUSE_MAX_LOOK; a pause never fails
# it. The patch is asked only when such an answer arrives.
SEND_CAN_PAUSE = "send-can-pause"
PAUSE_FIRST_LOOK = 5
PAUSE_MAX_LOOK = 300


@workflow.defn(name=SEND_EMAIL_WORKFLOW)
class SendEmailWorkflow:
    @workflow.init
    def __init__(self, spec: EmailSpec) -> None:
        self._spec = spec
        self._status = EmailStatus.QUEUED
        self._timer = UpdatableTimer(spec.send_at)
        self._cancel_reason: str | None = None
        self._attempts = 0
        self._last_error: str | None = None
        self._provider_message_id: str | None = None
        self._resumed = False  # the `resume` signal came while paused
        self._pause_noted = False  # this pause's `paused` event is recorded
        self._pause_look = PAUSE_FIRST_LOOK
        self._fresh_flags = False

    @workflow.run
    async def run(self, spec: EmailSpec) -> EmailState:
        try:
            if not spec.recorded:
                await self._record(EventType.QUEUED, EmailStatus.QUEUED, attempt=0)
            if spec.send_at is not None and spec.send_at > workflow.now():
                self._set_status(EmailStatus.SCHEDULED)
                await self._record(
                    EventType.SCHEDULED, EmailStatus.SCHEDULED,
                    scheduled_for=spec.send_at, detail=f"due {spec.send_at.isoformat()}",
                )
            due = await self._timer.sleep()
            go = due and self._cancel_reason is None
            if go and self._spec.sender_type == SenderType.USER and workflow.patched(SENDER_QUOTA):
                go = await self._within_quota()
            content: Content | None = None  # None: the send activity renders (or takes spec.content)
            if go and not workflow.patched(SEND_RENDERS):
                content = await self._render()
        except asyncio.CancelledError:
            # Cancelled from the Temporal UI/CLI before sending began: record it, end Canceled.
            self._cancel_reason = self._cancel_reason or "cancelled in Temporal"
            await self._finish_cancelled()
            raise
        if not go or self._cancel_reason is not None:
            return await self._finish_cancelled()
        self._set_status(EmailStatus.SENDING)  # from here on, cancel is refused (but while paused)
        result = await self._send(content)
        if result is None:  # cancelled while sending was paused
            return await self._finish_cancelled()
        if result.suppressed and workflow.patched(SUPPRESSED_AT_SEND):
            self._set_status(EmailStatus.SUPPRESSED)  # the send step recorded it
            return await self._finish()
        self._set_status(EmailStatus.SENT)
        self._attempts = result.attempt
        self._provider_message_id = result.provider_message_id
        if not result.recorded:  # the send step could not write it down (database away?): do it now
            try:
                await self._record(
                    EventType.SENT, EmailStatus.SENT,
                    attempt=result.attempt, sent_at=result.accepted_at, provider=result.provider,
                    provider_message_id=result.provider_message_id, detail=result.describe(),
                )
            except asyncio.CancelledError:
                pass  # too late to cancel: the email is sent, and _record has written that down
        return await self._finish()

    # --- steps ----------------------------------------------------------------------

    async def _within_quota(self) -> bool:
        """Take a slot of the sender's hourly/daily limit; while there is none, wait (durably) for the
        window to open. Never fails the email. False: cancelled while waiting."""
        while True:
            answer = await workflow.execute_local_activity_method(
                QuotaActivities.reserve, QuotaRequest(self._spec.sender_type, self._spec.sender_id), **_DATABASE_STEP
            )
            if answer.ok or answer.retry_at is None:
                return self._cancel_reason is None
            self._set_status(EmailStatus.DEFERRED)
            await self._record(EventType.DEFERRED, EmailStatus.DEFERRED, scheduled_for=answer.retry_at, detail=answer.detail)
            remaining = (answer.retry_at - workflow.now()).total_seconds()
            if remaining > 0:
                try:
                    await workflow.wait_condition(lambda: self._cancel_reason is not None, timeout=remaining)
                except TimeoutError:
                    pass
            if self._cancel_reason is not None:
                return False

    async def _render(self) -> Content:
        """Before SEND_RENDERS: a local activity rendered, and the mail went into the history twice."""
        if self._spec.template is None:
            assert self._spec.content is not None
            return self._spec.content
        try:
            return await workflow.execute_local_activity_method(
                RenderActivities.render, RenderRequest(self._spec.email_id, self._spec.template), **_RENDER
            )
        except (ActivityError, ApplicationError) as err:  # a local activity's failure arrives unwrapped
            await self._fail(_reason(err), attempt=0)

    async def _send(self, content: Content | None) -> SendResult | None:
        """The send step until it sends, or fails for good; None: cancelled while paused."""
        waits = rerouted = 0
        unreachable_since = None
        while True:
            try:
                return await self._send_once(content)
            except ActivityError as err:
                kind, reason = _error_type(err), _reason(err)
                if kind == SENDING_PAUSED and workflow.patched(SEND_CAN_PAUSE):
                    if not await self._paused(reason):
                        return None
                    continue  # look again at once (a wait ended: resumed, or time for the next look)
                if kind == SEND_QUEUE_CHANGED and workflow.patched(SEND_FOLLOWS_THE_SENDER):
                    self._spec.send_queue = _detail(err, "send_queue")
                    rerouted += 1
                    if rerouted == 1:
                        continue  # at once, from the queue of the driver the sender uses now
                    # Moved again right away (settings changing meanwhile): wait between asks as below.
                elif kind == SERVER_UNREACHABLE and workflow.patched(SERVER_UNREACHABLE_WAITS):
                    # Nothing was handed over and no attempt is used up: wait for the server.
                    unreachable_since = unreachable_since or workflow.now()
                    waited = (workflow.now() - unreachable_since).total_seconds()
                    if waited >= self._spec.retry.unreachable_wait_seconds:
                        await self._fail(
                            f"{reason} (still unreachable after waiting {waited:.0f}s)",
                            attempt=_attempt(err, self._spec.retry.max_attempts),
                        )
                elif kind != NOT_SENT_ASK_AGAIN:
                    await self._fail(_reason(err), attempt=_attempt(err, self._spec.retry.max_attempts))
                else:
                    unreachable_since = None
                if self._history_spent() and workflow.patched(SERVER_UNREACHABLE_WAITS):
                    await self._fail(
                        f"{reason} (gave up waiting after {waits} asks: the workflow's history is full)",
                        attempt=_attempt(err, self._spec.retry.max_attempts),
                    )
            # The database that holds the template or the sender's settings is away (or so slow the
            # attempt had no time left to send), or the mail server cannot be reached, or the sender
            # keeps changing drivers: nothing was sent and no attempt is used up. Wait (durably) and
            # ask again.
            waits += 1
            delay = min(2 ** (waits - 1), UNREACHABLE_MAX_DELAY if unreachable_since is not None else ASK_AGAIN_MAX_DELAY)
            # The send step logged why (WARNING); this says when the next ask is.
            workflow.logger.info("the send step could not send (%s); asking again in %ss", reason, delay)
            try:
                await workflow.sleep(delay)
            except asyncio.CancelledError:
                await self._reject_cancel()

    async def _paused(self, reason: str) -> bool:
        """Wait, paused, for the resume signal or the next look. False: cancelled meanwhile."""
        self._set_status(EmailStatus.PAUSED)  # cancellable again
        if not self._pause_noted:  # once per pause, however many looks it takes
            self._pause_noted = True
            await self._record(EventType.PAUSED, EmailStatus.PAUSED, detail=reason)
        self._resumed = False
        try:
            await workflow.wait_condition(lambda: self._resumed or self._cancel_reason is not None, timeout=self._pause_look)
        except TimeoutError:
            self._pause_look = min(self._pause_look * 2, PAUSE_MAX_LOOK)
        except asyncio.CancelledError:  # cancelled in the Temporal UI/CLI: as cancel, which a paused email allows
            self._cancel_reason = self._cancel_reason or "cancelled in Temporal"
            await self._finish_cancelled()
            raise
        if self._cancel_reason is not None:
            return False
        if self._resumed:
            self._pause_look = PAUSE_FIRST_LOOK
        self._fresh_flags = self._resumed  # told that a flag changed: the send step reads them from the database
        self._set_status(EmailStatus.SENDING)
        return True

    def _history_spent(self) -> bool:
        info = workflow.info()
        return (
            info.get_current_history_length() > HISTORY_BUDGET_EVENTS
            or info.get_current_history_size() > HISTORY_BUDGET_BYTES
        )

    async def _send_once(self, content: Content | None) -> SendResult:
        retry = self._spec.retry
        handle = workflow.start_activity_method(
            SendActivities.send,
            SendRequest(self._spec, content, fresh_flags=self._fresh_flags),
            task_queue=send_queue_name(workflow.info().task_queue, self._spec.send_queue) if self._spec.send_queue else None,
            start_to_close_timeout=timedelta(seconds=retry.send_timeout_seconds),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=retry.initial_interval_seconds),
                backoff_coefficient=retry.backoff_coefficient,
                maximum_interval=timedelta(seconds=retry.maximum_interval_seconds),
                maximum_attempts=retry.max_attempts,
                non_retryable_error_types=[PERMANENT_DELIVERY_ERROR],
            ),
        )
        try:
            # A send in flight is never abandoned: its outcome must be recorded truthfully.
            return await asyncio.shield(handle)
        except asyncio.CancelledError:
            await self._reject_cancel()
            return await handle

    async def _reject_cancel(self) -> None:
        await self._record(EventType.CANCEL_REJECTED, detail="cancel requested while sending; the send's outcome stands")

    async def _fail(self, reason: str, *, attempt: int) -> NoReturn:
        self._set_status(EmailStatus.FAILED)
        self._attempts, self._last_error = attempt, reason
        try:
            await self._record(EventType.FAILED, EmailStatus.FAILED, attempt=attempt, last_error=reason, detail=reason)
        except asyncio.CancelledError:
            pass  # the failure is recorded either way; the run still ends as Failed
        await self._finish()
        # Failing the run makes Temporal's own status say Failed, and lets /retry start a new run.
        raise ApplicationError(f"email not delivered: {reason}", type=EMAIL_FAILED, non_retryable=True)

    async def _finish_cancelled(self) -> EmailState:
        reason = self._cancel_reason or "cancelled"
        await self._record(EventType.CANCELLED, EmailStatus.CANCELLED, detail=reason)
        self._set_status(EmailStatus.CANCELLED)
        return await self._finish()

    async def _finish(self) -> EmailState:
        try:
            await workflow.wait_condition(workflow.all_handlers_finished)
        except asyncio.CancelledError:
            pass  # the email's fate is settled and recorded; nothing is left to cancel
        return self._state()

    async def _record(self, event: EventType, status: EmailStatus | None = None, **fields) -> None:  # type: ignore[no-untyped-def]
        entry = AuditEntry(
            email_id=self._spec.email_id,
            event_id=str(workflow.uuid4()),
            event=event,
            at=workflow.now(),
            status=status,
            spec=self._spec,  # not kept in history (local activity input): lets any step create a missing record
            **fields,
        )
        write = workflow.start_local_activity_method(AuditActivities.record, entry, **_DATABASE_STEP)
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await write  # a step that happened is always written down; then the cancellation goes on
            raise

    def _set_status(self, status: EmailStatus) -> None:
        self._status = status
        self._index(search.STATUS.value_set(status.value))

    def _index(self, *updates: SearchAttributeUpdate) -> None:
        """Bring the run's search attributes up to date: those it started with (none: the API sets
        none, and neither does this), under SEARCH_ATTRIBUTES. Unchanged values are not sent again."""
        current = workflow.info().typed_search_attributes
        if search.STATUS not in current:
            return
        changed = [u for u in updates if current.get(u.key) != u.value]
        if changed and workflow.patched(SEARCH_ATTRIBUTES):
            workflow.upsert_search_attributes(changed)

    def _state(self) -> EmailState:
        return EmailState(
            email_id=self._spec.email_id,
            status=self._status,
            send_at=self._timer.deadline,
            attempts=self._attempts,
            last_error=self._last_error,
            provider_message_id=self._provider_message_id,
        )

    # --- what callers can ask and change -------------------------------------------

    @workflow.query(name=STATUS_QUERY)
    def status(self) -> EmailState:
        return self._state()

    @workflow.signal(name=RESUME_SIGNAL)
    def resume(self) -> None:
        """A flag that pauses sending changed: a paused email looks again at once (else ignored)."""
        if self._status == EmailStatus.PAUSED:
            self._resumed = True

    @workflow.update(name=CANCEL_UPDATE)
    async def cancel(self, req: CancelRequest) -> EmailState:
        self._cancel_reason = self._cancel_reason or (req.reason or "cancelled")
        self._timer.stop()
        # Usually ends cancelled; ends failed if, say, the template broke while this waited.
        await workflow.wait_condition(lambda: self._status.is_final)
        return self._state()

    @cancel.validator
    def _validate_cancel(self, req: CancelRequest) -> None:
        refusal = cancel_refusal(self._status)
        if refusal:
            raise ValueError(refusal)

    @workflow.update(name=RESCHEDULE_UPDATE)
    async def reschedule(self, req: RescheduleRequest) -> EmailState:
        self._timer.move(req.send_at)  # before any await: the timer must not fire on the old time
        self._index(search.SEND_AT.value_set(req.send_at))
        await self._record(
            EventType.RESCHEDULED, self._status, scheduled_for=req.send_at, detail=f"due {req.send_at.isoformat()}"
        )
        return self._state()

    @reschedule.validator
    def _validate_reschedule(self, req: RescheduleRequest) -> None:
        refusal = reschedule_refusal("being cancelled" if self._cancel_reason is not None else self._status)
        if refusal:
            raise ValueError(refusal)
        if req.send_at.tzinfo is None:
            raise ValueError("send_at needs a time zone")


def _reason(err: ActivityError | ApplicationError) -> str:
    cause = err.cause if isinstance(err, ActivityError) else err
    if isinstance(cause, TemporalTimeoutError):
        return f"send timed out ({cause.type.name.lower() if cause.type else 'timeout'})"
    if isinstance(cause, ApplicationError):
        return cause.message
    return str(cause or err)


def _error_type(err: ActivityError) -> str | None:
    return err.cause.type if isinstance(err.cause, ApplicationError) else None


def _detail(err: ActivityError, name: str) -> Any:
    """A value the activity put in its failure's details (a dict), or None."""
    cause = err.cause
    if isinstance(cause, ApplicationError) and cause.details and isinstance(cause.details[0], dict):
        return cause.details[0].get(name)
    return None


def _attempt(err: ActivityError, max_attempts: int) -> int:
    attempt = _detail(err, "attempt")
    return attempt if isinstance(attempt, int) else max_attempts
