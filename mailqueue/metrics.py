"""The workers' Prometheus metrics: mailqueue's own, recorded through the Temporal SDK's meter, so
one port (MAILQUEUE_WORKER_METRICS_PORT) serves them with the SDK's (temporal_*). The API's are
in api/metrics.py.

No label names a sender, an address or a key: drivers, outcomes and quota windows only. With the
port unset the SDK's meter is a no-op, and so is every call here.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum

import uuid6
from temporalio.client import Client
from temporalio.common import MetricMeter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from mailqueue.config import Settings

# Bucket bounds in seconds: a send takes milliseconds to a minute (the SMTP timeout); an email
# waits from sub-second (a quiet queue) to hours (a server unreachable, retries backing off).
SEND_DURATION_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
QUEUE_LAG_BUCKETS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 21600]

# The limits activities/quota.py counts sends against.
QUOTA_WINDOWS = ("hourly", "daily")


class SendOutcome(StrEnum):
    """What one call of a driver came to (named as the email's status it leads to)."""

    SENT = "sent"  # the server accepted the mail
    RETRYING = "retrying"  # failed; Temporal tries again (a retry)
    FAILED = "failed"  # refused for good, or the last attempt failed
    UNREACHABLE = "unreachable"  # the server could not be reached: not an attempt, the workflow waits for it


def worker_runtime(settings: Settings) -> Runtime | None:
    """A Temporal runtime serving Prometheus metrics on the worker metrics port (None: off).

    Names follow Prometheus conventions: counters end in _total, durations are histograms in
    seconds named *_seconds. Raises ValueError if the port cannot be bound."""
    if not settings.worker_metrics_port:
        return None
    address = f"{settings.worker_metrics_host}:{settings.worker_metrics_port}"
    try:
        return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(
            bind_address=address,
            counters_total_suffix=True,
            unit_suffix=True,
            durations_as_seconds=True,
            histogram_bucket_overrides={"mailqueue_send_duration": SEND_DURATION_BUCKETS, "mailqueue_queue_lag": QUEUE_LAG_BUCKETS},
        )))
    except ValueError as exc:  # the SDK's "Failed starting Prometheus exporter: Address already in use"
        raise ValueError(f"MAILQUEUE_WORKER_METRICS_HOST/_PORT {address}: {exc}") from None


def run_started_at(run_id: str) -> datetime | None:
    """When Temporal started a workflow run: the server makes run ids as UUIDv7 (since
    temporalio/temporal#6933, late 2024), whose first 48 bits are that time in milliseconds.
    None for an older server's (version 4) ids."""
    try:
        run = uuid6.UUID(run_id)
    except ValueError:
        return None
    return datetime.fromtimestamp(run.time / 1000, UTC) if run.version == 7 else None


class WorkerMetrics:
    """mailqueue's worker metrics, created once (build_worker) and handed to the activities."""

    def __init__(self, meter: MetricMeter = MetricMeter.noop) -> None:
        self.on = meter is not MetricMeter.noop  # off: every call returns at once
        self._sends = meter.create_counter(
            "mailqueue_sends", "Driver calls by driver and outcome: sent, retrying (a failed attempt that will be retried), "
            "failed (for good), unreachable (the server was not reached: no attempt used, the email waits for it)",
        )
        self._send_duration = meter.create_histogram_timedelta(
            "mailqueue_send_duration", "How long a driver call took (the SMTP conversation, the provider's HTTP request)", "duration",
        )
        self._queue_lag = meter.create_histogram_timedelta(
            "mailqueue_queue_lag", "From accepted (a scheduled email: from its due time) to handed to the mail server", "duration",
        )
        self._deferrals = meter.create_counter(
            "mailqueue_deferrals", "Sends put off because the sender was over an hourly or daily limit, by window",
        )
        for window in QUOTA_WINDOWS:
            self._deferrals.add(0, {"window": window})  # from 0, so rate() sees the first one

    @classmethod
    def of(cls, client: Client) -> WorkerMetrics:
        """Recorded through the runtime the client was connected with (no-ops if it has no metrics)."""
        return cls((client.service_client.config.runtime or Runtime.default()).metric_meter)

    def send(self, driver: str, outcome: SendOutcome, took: float) -> None:
        if not self.on:
            return
        labels = {"driver": driver, "outcome": outcome.value}
        self._sends.add(1, labels)
        self._send_duration.record(timedelta(seconds=max(took, 0.0)), labels)

    def handed_over(self, driver: str, run_id: str, due: datetime | None, at: datetime) -> None:
        """The mail server took an email at `at`: its wait since its workflow run started (the API
        accepted it, or it was retried) or since it was due, whichever is later. An email rescheduled
        after it was queued is measured from its first due time (the send step knows only that)."""
        if not self.on:
            return
        started = run_started_at(run_id)
        if started is None:
            return
        if due is not None:
            started = max(started, due if due.tzinfo else due.replace(tzinfo=UTC))
        self._queue_lag.record(max(at - started, timedelta(0)), {"driver": driver})

    def deferred(self, window: str) -> None:
        if not self.on:
            return
        self._deferrals.add(1, {"window": window})
