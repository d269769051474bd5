"""ReconcileEmailsWorkflow: one reconciler run, started by a Temporal Schedule."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.reconcile import ReconcileActivities
    from mailqueue.contracts import RECONCILE_WORKFLOW, ReconcileReport, ReconcileRequest


@workflow.defn(name=RECONCILE_WORKFLOW)
class ReconcileEmailsWorkflow:
    @workflow.run
    async def run(self, req: ReconcileRequest) -> ReconcileReport:
        return await workflow.execute_activity_method(
            ReconcileActivities.reconcile,
            req,
            start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=timedelta(minutes=2),
            # A run that cannot finish (Temporal or the database away) gives way to the next
            # scheduled one rather than piling up retries.
            retry_policy=RetryPolicy(maximum_attempts=3, initial_interval=timedelta(seconds=5)),
        )
