"""Run a mailqueue worker: `python worker.py` (settings from MAILQUEUE_* variables)."""

from __future__ import annotations

import sys

# The workflow sandbox re-imports the workflow modules for every workflow run. Without
# cached bytecode (PYTHONDONTWRITEBYTECODE) each run recompiles them from source, which
# cost about a third of the worker's CPU; let this process write and reuse .pyc files.
sys.dont_write_bytecode = False

import asyncio  # noqa: E402
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker

from activities.audit import AuditActivities
from activities.quota import QuotaActivities
from activities.purge import PurgeActivities
from activities.reconcile import ReconcileActivities
from activities.render import RenderActivities
from activities.send import SendActivities
from activities.webhooks import WebhookActivities
from mailqueue import search
from mailqueue.config import Settings, get_settings
from mailqueue.contracts import send_queue_name
from mailqueue.db import create_engine, sessionmaker
from mailqueue.drivers.base import Driver
from mailqueue.drivers.factory import DriverFactory, driver_from_settings
from mailqueue.logs import configure_logging
from mailqueue.metrics import WorkerMetrics, worker_runtime
from mailqueue.render_pool import RenderPool
from mailqueue.template_library import Renderer
from mailqueue.temporal import connect, ensure_reconcile_schedule
from mailqueue.temporal import ensure_purge_schedule
from mailqueue.blobs import blob_store
from mailqueue.flags import Flags
from mailqueue.templating import TemplateEngine
from mailqueue.tracing import configure_tracing, flush as flush_traces
from mailqueue.webhooks import start_active_endpoints, webhook_queue
from workflows.purge import PurgeEmailsWorkflow
from workflows.reconcile import ReconcileEmailsWorkflow
from workflows.send_email import SendEmailWorkflow
from workflows.webhooks import WebhookEndpointWorkflow, WebhookRedeliveryWorkflow

log = logging.getLogger("mailqueue.worker")


class Workers:
    """The main worker (workflows, local activities, sends without a rate) and one worker per
    rated driver, polling that driver's send queue (`<task queue>.<driver>`) under Temporal's
    task-queue rate limit, which holds across every worker process."""

    def __init__(self, workers: list[Worker], drivers: DriverFactory, pool: RenderPool | None = None) -> None:
        self.workers = workers
        self.drivers = drivers
        self.pool = pool  # the processes templates render in (None: the caller brought its own renderer)
        self.flags: Flags | None = None  # the feature flags the send step reads (its cache)
        self.on_open: list[Callable[[], Awaitable[None]]] = []  # before the workers start (the flags' first load)
        self.on_close: list[Callable[[], Awaitable[None]]] = []  # after the workers stop (webhook clients, feed listener)
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> Workers:
        self._stack = AsyncExitStack()
        for open_ in self.on_open:
            await open_()
        if self.pool is not None:
            await self.pool.start()
            self._stack.push_async_callback(self.pool.close)  # after the workers: sends in flight render first
        for worker in self.workers:
            await self._stack.enter_async_context(worker)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._stack is not None
        await self._stack.aclose()
        await self.drivers.aclose()  # pooled SMTP connections, HTTP clients
        for close in self.on_close:
            await close()


def build_worker(
    client: Client,
    settings: Settings,
    *,
    driver: Driver | None = None,
    task_queue: str | None = None,
    renderer: Renderer | None = None,
    clock: Callable[[], float] = time.time,
) -> Workers:
    """The workers with their activities wired to their dependencies (DB, drivers, templates, the
    clock that decides quota windows)."""
    sessions = sessionmaker(create_engine(settings.database_url))
    metrics = WorkerMetrics.of(client)  # no-ops unless the client's runtime serves metrics
    audit = AuditActivities(sessions)
    pool = None if renderer is not None else RenderPool.from_settings(settings)
    renderer = renderer or Renderer(sessions, TemplateEngine(settings.default_locale, pool=pool))
    render = RenderActivities(renderer)  # for emails queued before the send activity rendered
    drivers = DriverFactory(settings, driver or driver_from_settings(settings))
    flags = Flags.from_settings(settings, sessions)  # the kill switch and the drivers' flags, for the send step
    send = SendActivities(sessions, drivers, renderer, settings, metrics, flags=flags)
    queue = task_queue or settings.task_queue
    shutdown = timedelta(seconds=settings.smtp_timeout_seconds + 5)  # let sends in flight finish
    main = Worker(
        client,
        task_queue=queue,
        workflows=[SendEmailWorkflow, ReconcileEmailsWorkflow, PurgeEmailsWorkflow],
        activities=[
            audit.record, QuotaActivities(sessions, settings, clock, metrics).reserve, render.render, send.send,
            ReconcileActivities(sessions, client, settings).reconcile,
            PurgeActivities(sessions, blob_store(settings)).purge,
        ],
        max_concurrent_activities=settings.worker_concurrency,
        # Sends are the task queue's ordinary activities (but for one reconciler run a minute):
        # this caps sends per second across all workers.
        max_task_queue_activities_per_second=settings.send_rate_per_second,
        max_concurrent_local_activities=200,
        max_concurrent_workflow_tasks=200,
        graceful_shutdown_timeout=shutdown,
    )
    rated = [
        Worker(
            client, task_queue=send_queue_name(queue, name), activities=[send.send],
            max_concurrent_activities=settings.worker_concurrency, max_task_queue_activities_per_second=rate,
            graceful_shutdown_timeout=shutdown,
        )
        for name, rate in sorted(settings.send_rates.items())
    ]
    # Webhook deliveries on their own task queue and slots: a slow or dead endpoint never holds a send's slot.
    hooks = WebhookActivities(sessions, settings)
    webhook_worker = Worker(
        client, task_queue=webhook_queue(queue), workflows=[WebhookEndpointWorkflow, WebhookRedeliveryWorkflow],
        activities=[hooks.deliver, hooks.disable, hooks.redeliver], max_concurrent_activities=settings.webhook_concurrency,
        max_concurrent_workflow_tasks=50, graceful_shutdown_timeout=timedelta(seconds=settings.webhook_timeout_seconds + 5),
    )
    workers = Workers([main, *rated, webhook_worker], drivers, pool)
    workers.flags = flags
    workers.on_open.append(flags.start)
    workers.on_close.append(hooks.aclose)
    workers.on_close.append(flags.aclose)
    return workers


async def _search_attributes_ready(client: Client, settings: Settings) -> bool:
    """Emails are started with their search attributes: the namespace must know them (a workflow
    that upserts an unknown one stalls). Added here when allowed; otherwise say how, and stop."""
    if not settings.search_attributes:
        log.warning("MAILQUEUE_SEARCH_ATTRIBUTES is off: emails cannot be searched by status or sender in the Temporal UI")
        return True
    try:
        added = await search.ensure_registered(client, settings.temporal_namespace)
    except search.SearchAttributesMissing as exc:
        log.error("%s", exc)
        return False
    if added:
        log.info("added search attributes %s to namespace %s", ", ".join(added), settings.temporal_namespace)
    return True


async def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level)
    configure_tracing("mailqueue-worker")  # before connecting: the client's interceptor is the workers' too
    runtime = worker_runtime(settings)  # serves the metrics port, if set
    client = await connect(settings, runtime=runtime)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await ensure_reconcile_schedule(client, settings)
    await ensure_purge_schedule(client, settings)
    # Every active webhook endpoint has its delivery workflow (started by the API; here again in case that failed).
    sweep = create_engine(settings.database_url)
    await start_active_endpoints(client, sessionmaker(sweep), settings)
    await sweep.dispose()
    if not await _search_attributes_ready(client, settings):
        sys.exit(1)
    async with build_worker(client, settings):
        log.info("worker running on task queue %s at %s", settings.task_queue, settings.temporal_address)
        if runtime is not None:
            log.info("metrics at http://%s:%s/metrics", settings.worker_metrics_host, settings.worker_metrics_port)
        for name, rate in sorted(settings.send_rates.items()):
            log.info("sends through %s: at most %s per second (queue %s)", name, rate, send_queue_name(settings.task_queue, name))
        await stop.wait()
        log.info("worker stopping: finishing tasks in flight")
    flush_traces()


if __name__ == "__main__":
    asyncio.run(main())
