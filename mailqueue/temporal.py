"""Connecting to Temporal, the same way from the API, the worker and the tools."""

from __future__ import annotations

import logging
from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    SchedulePolicy,
    ScheduleOverlapPolicy,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
)
from temporalio.service import GrpcCompression, RPCError, RPCStatusCode

from mailqueue.config import Settings
from mailqueue.contracts import RECONCILE_WORKFLOW, ReconcileRequest, reconcile_schedule_id

log = logging.getLogger("mailqueue.temporal")


async def connect(settings: Settings, *, lazy: bool = False) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        lazy=lazy,
        # gzip costs CPU on both ends and saves nothing on a local network (about 5 % of
        # throughput in bench/bench.py); turn it on for a Temporal reached over a WAN.
        grpc_compression=GrpcCompression.GZIP if settings.temporal_grpc_gzip else GrpcCompression.NONE,
    )


async def ensure_reconcile_schedule(client: Client, settings: Settings) -> None:
    """Create, or bring up to date, the Schedule that runs the reconciler (see activities/reconcile.py).

    Every worker calls this at start; the first creates it, the others update it to the same
    thing. With `reconcile_interval_seconds` 0 an existing schedule is paused (not deleted), and
    none is created."""
    schedule_id = reconcile_schedule_id(settings.task_queue)
    interval = settings.reconcile_interval_seconds
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            RECONCILE_WORKFLOW,
            ReconcileRequest(stale_after_seconds=settings.reconcile_after_seconds),
            id=schedule_id,
            task_queue=settings.task_queue,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(seconds=interval or 60))]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        state=ScheduleState(paused=not interval, note="" if interval else "MAILQUEUE_RECONCILE_INTERVAL_SECONDS=0"),
    )
    handle = client.get_schedule_handle(schedule_id)
    try:
        if not interval:  # pause one that exists; create none
            await handle.update(lambda _: ScheduleUpdate(schedule=schedule))
            return
        try:
            await client.create_schedule(schedule_id, schedule)
            log.info("created schedule %s (every %ss)", schedule_id, interval)
        except ScheduleAlreadyRunningError:
            await handle.update(lambda _: ScheduleUpdate(schedule=schedule))
    except RPCError as exc:  # the worker is still useful without it; the next start tries again
        if exc.status != RPCStatusCode.NOT_FOUND:
            log.warning("could not create or update schedule %s: %s", schedule_id, exc.message)
