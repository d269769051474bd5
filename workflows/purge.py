"""PurgeEmailsWorkflow: one retention run, started daily by a Temporal Schedule (`<task queue>-purge`)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.purge import PurgeActivities
    from mailqueue.contracts import PURGE_WORKFLOW, PurgeReport, PurgeRequest


@workflow.defn(name=PURGE_WORKFLOW)
class PurgeEmailsWorkflow:
    @workflow.run
    async def run(self, req: PurgeRequest) -> PurgeReport:
        return await workflow.execute_activity_method(
            PurgeActivities.purge,
            req,
            # The first run after retention is turned on may have years of mail to delete; it
            # heartbeats after every batch, so a worker that died is noticed within minutes.
            start_to_close_timeout=timedelta(hours=6),
            heartbeat_timeout=timedelta(minutes=5),
            # A run that cannot finish (the database away) leaves the rest to tomorrow's run.
            retry_policy=RetryPolicy(maximum_attempts=3, initial_interval=timedelta(minutes=1)),
        )
