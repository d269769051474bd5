"""The reconciler: no record stays unfinished because its workflow closed or vanished unseen.

Workflows record every step themselves; this is the safety net for when that could not happen
(a workflow terminated from the Temporal UI, a final write lost with the database away for
longer than the workflow waited, an API that died between writing a record and starting its
workflow, a Temporal server that lost its state). It runs as an activity of a small workflow
that a Temporal Schedule starts every `reconcile_interval_seconds`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.api.enums.v1 import EventType as HistoryEventType
from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHistoryEventFilterType,
)
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from mailqueue.config import Settings
from mailqueue.contracts import (
    CANCELLABLE,
    IN_FLIGHT,
    WAITING,
    AuditEntry,
    EmailState,
    EmailStatus,
    EventType,
    ReconcileReport,
    ReconcileRequest,
    status_values,
)
from mailqueue.delivery import redelivery_spec, start_delivery
from mailqueue.email_store import apply_audit
from mailqueue.models import Email

log = logging.getLogger("mailqueue.activities.reconcile")

PAGE = 200
CONCURRENCY = 10  # describe calls in flight: enough to be quick, little load on the server


class ReconcileActivities:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], client: Client, settings: Settings) -> None:
        self._sessions = sessions
        self._client = client
        self._settings = settings

    @activity.defn(name="reconcile_emails")
    async def reconcile(self, req: ReconcileRequest) -> ReconcileReport:
        report = ReconcileReport()
        outcomes: Counter[str] = Counter()
        limit = asyncio.Semaphore(CONCURRENCY)
        cutoff = datetime.now(UTC) - timedelta(seconds=req.stale_after_seconds)
        after: tuple[datetime, str] | None = None
        while report.checked < req.limit:
            page = await self._stale(cutoff, after, min(PAGE, req.limit - report.checked))
            if not page:
                break
            after = (page[-1].updated_at, page[-1].id)

            async def one(email: Email) -> str:
                async with limit:
                    return await self._reconcile(email)

            outcomes.update(await asyncio.gather(*(one(e) for e in page)))
            report.checked += len(page)
            activity.heartbeat(report.checked)
        report.running = outcomes.pop("running", 0)
        report.restarted = outcomes.pop("restarted", 0)
        outcomes.pop("unchanged", None)
        report.settled = dict(outcomes)
        if report.restarted or report.settled:
            log.warning("reconciled: %s", report)
        return report

    async def _stale(self, cutoff: datetime, after: tuple[datetime, str] | None, n: int) -> list[Email]:
        """Unfinished records with no change since `cutoff`; scheduled and deferred ones only once overdue."""
        e = Email.__table__.c  # type: ignore[attr-defined]
        query = (
            select(Email)
            .where(
                e.updated_at < cutoff,
                sa.or_(
                    e.status.in_(status_values(IN_FLIGHT)) & (sa.func.coalesce(e.next_attempt_at, e.updated_at) < cutoff),
                    e.status.in_(status_values(WAITING)) & (sa.func.coalesce(e.scheduled_for, e.updated_at) < cutoff),
                ),
            )
            .order_by(e.updated_at, e.id)
            .limit(n)
        )
        if after is not None:
            query = query.where(sa.tuple_(e.updated_at, e.id) > sa.tuple_(*after))
        async with self._sessions() as session:
            return list((await session.exec(query)).all())

    async def _reconcile(self, email: Email) -> str:
        handle = self._client.get_workflow_handle(email.workflow_id, result_type=EmailState)
        try:
            desc = await handle.describe()
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            return await self._restart(email)
        status = desc.status
        if status == WorkflowExecutionStatus.RUNNING:
            return "running"
        if status == WorkflowExecutionStatus.COMPLETED:
            state: EmailState = await handle.result()
            fields = dict(attempt=state.attempts, provider_message_id=state.provider_message_id)
            if state.status is EmailStatus.SENT:
                fields["sent_at"] = desc.close_time
            if state.last_error:
                fields["last_error"] = state.last_error
            return await self._settle(email, desc, state.status, f"its workflow ended {state.status.value}", **fields)
        if status == WorkflowExecutionStatus.FAILED:
            try:
                await handle.result()
                reason = "its workflow failed"
            except WorkflowFailureError as err:
                reason = getattr(err.cause, "message", None) or str(err)
            return await self._settle(email, desc, EmailStatus.FAILED, reason, last_error=reason)
        if status == WorkflowExecutionStatus.CANCELED:
            return await self._settle(email, desc, EmailStatus.CANCELLED, "its workflow was cancelled in Temporal")
        # Terminated or timed out: the workflow could not write down how it ended, and a send it
        # had in flight may or may not have gone out. Failed, with the reason; /retry can send it.
        what = "terminated in Temporal" if status == WorkflowExecutionStatus.TERMINATED else "timed out"
        what += await self._termination_reason(handle, status)
        before_sending = email.status in CANCELLABLE  # not handed to the send step yet
        reason = f"its workflow was {what} " + ("before sending; not delivered" if before_sending else "while sending; delivery not confirmed")
        return await self._settle(email, desc, EmailStatus.FAILED, reason, last_error=reason)

    async def _termination_reason(self, handle, status: WorkflowExecutionStatus) -> str:  # type: ignore[no-untyped-def]
        if status != WorkflowExecutionStatus.TERMINATED:
            return ""
        async for event in handle.fetch_history_events(event_filter_type=WorkflowHistoryEventFilterType.CLOSE_EVENT):
            if event.event_type == HistoryEventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED:
                why = event.workflow_execution_terminated_event_attributes.reason
                return f" ({why})" if why else ""
        return ""

    async def _settle(
        self, email: Email, desc: WorkflowExecutionDescription, status: EmailStatus, detail: str, **fields: object
    ) -> str:
        if email.status == status.value:
            return "unchanged"
        await self._record(email, desc.run_id, status, f"reconciled from Temporal: {detail}", **fields)
        return status.value

    async def _restart(self, email: Email) -> str:
        """No workflow: never started (the API stopped between the two steps) or lost by Temporal.
        The record is the durable acceptance, so delivery starts (again) from it; a mail an
        earlier run may have sent carries the same Message-ID."""
        async with self._sessions() as session:
            spec = await redelivery_spec(session, self._settings, email)
        if email.status == EmailStatus.SCHEDULED.value:
            spec.send_at = email.scheduled_for
        # Written before the run starts, so it can never overwrite the run's own steps; if the
        # start fails, the record is stale again after a while and the next run tries again.
        await self._record(
            email, "restart", EmailStatus.QUEUED,
            f"reconciled: Temporal had no workflow for this {email.status} email; delivery started again",
        )
        try:
            await start_delivery(
                self._client, spec, self._settings.task_queue, WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                searchable=self._settings.search_attributes,
            )
        except WorkflowAlreadyStartedError:
            return "running"  # started meanwhile (a client's retry with the same Idempotency-Key)
        return "restarted"

    async def _record(self, email: Email, run: str, status: EmailStatus | None, detail: str, **fields: object) -> None:
        async with self._sessions() as session:
            await apply_audit(
                session,
                AuditEntry(
                    email_id=email.id,
                    event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"mailqueue:{email.id}:{run}:{email.updated_at}:reconciled")),
                    event=EventType.RECONCILED,
                    at=datetime.now(UTC),
                    status=status,
                    detail=detail,
                    **fields,  # type: ignore[arg-type]
                ),
            )
