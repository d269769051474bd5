"""Connecting to Temporal, the same way from the API, the worker and the tools."""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta
from pathlib import Path

import temporalio.converter
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleCalendarSpec,
    ScheduleIntervalSpec,
    SchedulePolicy,
    ScheduleOverlapPolicy,
    ScheduleRange,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
)
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.runtime import Runtime
from temporalio.service import GrpcCompression, RPCError, RPCStatusCode, TLSConfig

from mailqueue.codec import PayloadCipher
from mailqueue.config import Settings
from mailqueue.contracts import RECONCILE_WORKFLOW, ReconcileRequest, reconcile_schedule_id
from mailqueue.contracts import PURGE_WORKFLOW, PurgeRequest, purge_schedule_id
from mailqueue.tracing import interceptors

log = logging.getLogger("mailqueue.temporal")


class TemporalSettingsError(ValueError):
    """The Temporal connection settings do not fit together, or name a file that cannot be read."""


def data_converter(settings: Settings) -> DataConverter:
    """How every mailqueue process turns values into Temporal payloads and back: the default
    converter, with payloads encrypted (mailqueue/codec.py) and failure messages and stack traces
    moved into an encrypted payload too (a remote server's reply must not sit in clear in a history)."""
    return dataclasses.replace(
        temporalio.converter.default(),
        payload_codec=PayloadCipher.from_settings(settings),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


def _read(path: Path | None, setting: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TemporalSettingsError(f"MAILQUEUE_{setting.upper()}: cannot read {path}: {exc.strerror}") from None


def tls_config(settings: Settings) -> TLSConfig | bool | None:
    """TLS for the Temporal connection. A CA file, a client certificate (mTLS) or a server name
    turn it on with those; `temporal_tls` alone means the system's trusted roots. None: off,
    unless an API key is set (the SDK then turns TLS on, as Temporal Cloud requires)."""
    s = settings
    if (s.temporal_tls_cert_file is None) != (s.temporal_tls_key_file is None):
        raise TemporalSettingsError(
            "MAILQUEUE_TEMPORAL_TLS_CERT_FILE and MAILQUEUE_TEMPORAL_TLS_KEY_FILE go together (a client certificate and its key, for mTLS)"
        )
    if s.temporal_tls_ca_file is None and s.temporal_tls_cert_file is None and s.temporal_tls_server_name is None:
        return True if s.temporal_tls else None
    return TLSConfig(
        server_root_ca_cert=_read(s.temporal_tls_ca_file, "temporal_tls_ca_file"),
        domain=s.temporal_tls_server_name,
        client_cert=_read(s.temporal_tls_cert_file, "temporal_tls_cert_file"),
        client_private_key=_read(s.temporal_tls_key_file, "temporal_tls_key_file"),
    )


async def connect(settings: Settings, *, lazy: bool = False, runtime: Runtime | None = None) -> Client:
    """The Temporal client of the API, the workers and the tools: all of them must encode with the same keys.
    `runtime`: one serving metrics (mailqueue.metrics.worker_runtime); None: the SDK's default."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        lazy=lazy,
        runtime=runtime,
        data_converter=data_converter(settings),
        interceptors=interceptors(),  # tracing's, when on (the workers built on this client inherit them)
        tls=tls_config(settings),
        api_key=settings.temporal_api_key.get_secret_value() if settings.temporal_api_key else None,
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
    await _ensure_schedule(client, schedule_id, schedule, active=bool(interval), what=f"every {interval}s")


async def ensure_purge_schedule(client: Client, settings: Settings) -> None:
    """Create, or bring up to date, the Schedule that runs retention's purge (mailqueue/retention.py)
    once a day at `purge_hour_utc`. Like the reconcile schedule: every worker calls this at start,
    and with `retention_days` 0 an existing schedule is paused (not deleted) and none is created."""
    schedule_id = purge_schedule_id(settings.task_queue)
    days = settings.retention_days
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            PURGE_WORKFLOW,
            PurgeRequest(retention_days=days, batch=settings.purge_batch),
            id=schedule_id,
            task_queue=settings.task_queue,
        ),
        spec=ScheduleSpec(calendars=[ScheduleCalendarSpec(hour=[ScheduleRange(settings.purge_hour_utc)])]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        state=ScheduleState(paused=not days, note="" if days else "MAILQUEUE_RETENTION_DAYS=0"),
    )
    await _ensure_schedule(
        client, schedule_id, schedule, active=bool(days), what=f"daily at {settings.purge_hour_utc:02d}:00 UTC, retention {days} days",
    )


async def _ensure_schedule(client: Client, schedule_id: str, schedule: Schedule, *, active: bool, what: str) -> None:
    """Create the schedule, or update it to `schedule`; when not `active`, pause one that exists and create none."""
    handle = client.get_schedule_handle(schedule_id)
    try:
        if not active:
            await handle.update(lambda _: ScheduleUpdate(schedule=schedule))
            return
        try:
            await client.create_schedule(schedule_id, schedule)
            log.info("created schedule %s (%s)", schedule_id, what)
        except ScheduleAlreadyRunningError:
            await handle.update(lambda _: ScheduleUpdate(schedule=schedule))
    except RPCError as exc:  # the worker is still useful without it; the next start tries again
        if exc.status != RPCStatusCode.NOT_FOUND:
            log.warning("could not create or update schedule %s: %s", schedule_id, exc.message)
