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
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker

from activities.audit import AuditActivities
from activities.quota import QuotaActivities
from activities.render import RenderActivities, Renderer
from activities.send import SendActivities
from mailqueue.config import Settings, get_settings
from mailqueue.db import create_engine, sessionmaker
from mailqueue.drivers import Driver, driver_from_settings
from mailqueue.logs import configure_logging
from mailqueue.senders import DriverFactory
from mailqueue.temporal import connect
from mailqueue.templating import TemplateEngine
from workflows.send_email import SendEmailWorkflow

log = logging.getLogger("mailqueue.worker")


def build_worker(
    client: Client,
    settings: Settings,
    *,
    driver: Driver | None = None,
    task_queue: str | None = None,
    renderer: Renderer | None = None,
) -> Worker:
    """The worker with its activities wired to their dependencies (DB, driver, templates)."""
    sessions = sessionmaker(create_engine(settings.database_url))
    audit = AuditActivities(sessions)
    renderer = renderer or Renderer(sessions, TemplateEngine(settings.default_locale))
    render = RenderActivities(renderer)  # for emails queued before the send activity rendered
    drivers = DriverFactory(settings, driver or driver_from_settings(settings))
    send = SendActivities(sessions, drivers, renderer, settings)
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=[SendEmailWorkflow],
        activities=[audit.record, QuotaActivities(sessions, settings).reserve, render.render, send.send],
        max_concurrent_activities=200,
        # Sends are the task queue's only ordinary activity: this caps sends per second across all workers.
        max_task_queue_activities_per_second=settings.send_rate_per_second,
        max_concurrent_local_activities=200,
        max_concurrent_workflow_tasks=200,
        # On shutdown, let sends in flight finish rather than cut them off mid-SMTP.
        graceful_shutdown_timeout=timedelta(seconds=settings.smtp_timeout_seconds + 5),
    )


async def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level)
    client = await connect(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with build_worker(client, settings):
        log.info("worker running on task queue %s at %s", settings.task_queue, settings.temporal_address)
        await stop.wait()
        log.info("worker stopping: finishing tasks in flight")


if __name__ == "__main__":
    asyncio.run(main())
