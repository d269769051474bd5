"""The floor of bench/bench.py: the bare workflow-per-email shape (issue 18), to set the product's cost against.

One workflow per email: three no-op local "audit" steps and one send activity that hands the message
to the sink over pooled aiosmtplib connections. No database, no payload encryption, no rendering,
no search attributes: what Temporal alone costs for an email on these dev server settings. Its worker
runs as its own process (bench.py starts it), so its CPU is read from /proc like the product's worker:

    .venv/bin/python bench/floor.py --temporal ADDRESS --task-queue floor --smtp-port PORT
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    import asyncio
    from email.message import EmailMessage

    import aiosmtplib

TASK_QUEUE = "floor"
SMTP_CONNECTIONS = 10  # as the product's SmtpDriver keeps by default


@dataclass
class FloorEmail:
    email_id: str  # also the Message-ID's local part: the sink's log names the email by it
    to: str = "bench@example.com"
    subject: str = "bench"
    text: str = "hello"


@dataclass
class AuditStep:
    email_id: str
    step: str


class SmtpPool:
    """At most `size` open connections to one server, each reused for the next message. A connection
    that failed is closed and dropped; the next send opens a new one."""

    def __init__(self, host: str, port: int, size: int = SMTP_CONNECTIONS) -> None:
        self.host, self.port = host, port
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(size)

    async def send(self, message: EmailMessage) -> None:
        async with self._slots:
            smtp = self._idle.pop() if self._idle else None
            if smtp is None or not smtp.is_connected:
                smtp = aiosmtplib.SMTP(hostname=self.host, port=self.port, start_tls=False)
                await smtp.connect()
            try:
                await smtp.send_message(message)
            except BaseException:
                smtp.close()
                raise
            self._idle.append(smtp)


class FloorActivities:
    def __init__(self, pool: SmtpPool) -> None:
        self.pool = pool

    @activity.defn(name="floor_audit")
    async def audit(self, step: AuditStep) -> None:
        """Stands for the product's audit writes: a local activity that does nothing."""

    @activity.defn(name="floor_send")
    async def send(self, email: FloorEmail) -> None:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "bench@example.com", email.to, email.subject
        msg["Message-ID"] = f"<{email.email_id}@floor.bench>"
        msg.set_content(email.text)
        await self.pool.send(msg)


_AUDIT = dict(start_to_close_timeout=timedelta(seconds=10))


@workflow.defn(name="FloorEmail")
class FloorWorkflow:
    @workflow.run
    async def run(self, email: FloorEmail) -> None:
        await workflow.execute_local_activity_method(FloorActivities.audit, AuditStep(email.email_id, "queued"), **_AUDIT)
        await workflow.execute_local_activity_method(FloorActivities.audit, AuditStep(email.email_id, "sending"), **_AUDIT)
        await workflow.execute_activity_method(FloorActivities.send, email, start_to_close_timeout=timedelta(seconds=60))
        await workflow.execute_local_activity_method(FloorActivities.audit, AuditStep(email.email_id, "sent"), **_AUDIT)


async def run_worker(temporal: str, task_queue: str, smtp_port: int) -> None:
    import signal

    from temporalio.client import Client
    from temporalio.worker import Worker

    # The sandbox re-imports this module by the workflow class's module name: take the classes from
    # `floor`, not from `__main__` (this file run as a script; bench/ is then first on sys.path).
    from floor import FloorActivities, FloorWorkflow, SmtpPool

    client = await Client.connect(temporal)
    activities = FloorActivities(SmtpPool("127.0.0.1", smtp_port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The product worker's slots (worker.py: 50 activities, 200 local activities and workflow tasks).
    async with Worker(
        client, task_queue=task_queue, workflows=[FloorWorkflow], activities=[activities.audit, activities.send],
        max_concurrent_activities=50, max_concurrent_local_activities=200, max_concurrent_workflow_tasks=200,
    ):
        print(f"floor worker on {task_queue} at {temporal}", flush=True)
        await stop.wait()


if __name__ == "__main__":
    import argparse

    # As worker.py does: the sandbox re-imports the workflow module for every run; reuse its bytecode.
    sys.dont_write_bytecode = False
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--temporal", required=True, help="host:port of the dev server")
    parser.add_argument("--task-queue", default=TASK_QUEUE)
    parser.add_argument("--smtp-port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(run_worker(args.temporal, args.task_queue, args.smtp_port))
