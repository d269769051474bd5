"""Recovery: the reconciler sets right records whose workflow closed or vanished unseen.

Runs against a database of its own: the reconciler looks at every record, and the other
tests' records are not its business.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from temporalio.client import Client, WorkflowFailureError
from temporalio.service import RPCError

from mailqueue.config import Settings
from mailqueue.contracts import ReconcileReport, ReconcileRequest, reconcile_schedule_id, workflow_id_for
from mailqueue.db import create_engine, sessionmaker
from devstack.devserver import TemporalDevServer
from mailqueue.models import Email
from mailqueue.email_store import events_of, insert_email, record_from_spec
from mailqueue.temporal import ensure_reconcile_schedule
from tests.conftest import scratch_database
from tests.helpers import EMAIL_SETTLES, SmtpSink, eventually, fast_settings, make_spec
from worker import build_worker
from workflows.reconcile import ReconcileEmailsWorkflow
from workflows.send_email import SendEmailWorkflow

LONG_AGO = datetime.now(UTC) - timedelta(hours=1)


@pytest.fixture(scope="module")
def own_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with scratch_database(tmp_path_factory.mktemp("reconcile")) as url:
        yield url


@pytest.fixture
def rsettings(own_database: str, temporal_server: TemporalDevServer, sink: SmtpSink) -> Settings:
    return fast_settings(own_database, temporal_server.address, sink.port, f"reconcile-{uuid.uuid4()}", reconcile_after_seconds=60)


@pytest.fixture
async def rsessions(rsettings: Settings) -> AsyncIterator[object]:
    engine = create_engine(rsettings.database_url)
    yield sessionmaker(engine)
    await engine.dispose()


async def orphan(sessions, *, status: str = "queued", **spec_kw) -> str:  # type: ignore[no-untyped-def]
    """A record as an API that died before starting its workflow leaves it, unchanged for an hour."""
    spec = make_spec(**spec_kw)
    async with sessions() as s:
        email = record_from_spec(spec)
        email.status = status
        await insert_email(s, email)
        await s.commit()
    await age(sessions, spec.email_id)
    return spec.email_id


async def age(sessions, email_id: str, **values) -> None:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        await (await s.connection()).execute(
            sa.update(Email).where(Email.id == email_id).values(updated_at=LONG_AGO, **values)
        )
        await s.commit()


async def state(sessions, email_id: str) -> tuple[str, str | None, list[str]]:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        email = await s.get(Email, email_id)
        assert email is not None
        events = await events_of(s, email_id)
        return email.status, email.last_error, [e.event for e in events]


async def until(sessions, email_id: str, status: str, timeout: float = EMAIL_SETTLES) -> None:  # type: ignore[no-untyped-def]
    last: list[object] = []

    async def reached() -> bool:
        last[:] = [await state(sessions, email_id)]
        return last[0][0] == status  # type: ignore[index]

    await eventually(reached, timeout=timeout, interval=0.1, what=lambda: f"{email_id}: {last}, expected {status}")


async def test_reconciler_settles_closed_and_missing_workflows(
    client: Client, rsettings: Settings, rsessions, sink: SmtpSink  # type: ignore[no-untyped-def]
) -> None:
    queue = rsettings.task_queue
    async with build_worker(client, rsettings):
        # 1. No workflow at all (the API died between the record and the start): delivered now.
        never_started = await orphan(rsessions)
        # 2. Sent, but the record was left saying `sending` (the final write was lost).
        sent_spec = make_spec()
        await client.execute_workflow(SendEmailWorkflow.run, sent_spec, id=workflow_id_for(sent_spec.email_id), task_queue=queue)
        await age(rsessions, sent_spec.email_id, status="sending")
        # 3. Failed for good, but the record says `retrying`.
        failed_spec = make_spec(max_attempts=1)
        sink.handler.data_replies.append("554 5.7.1 rejected")
        with pytest.raises(WorkflowFailureError):
            await client.execute_workflow(SendEmailWorkflow.run, failed_spec, id=workflow_id_for(failed_spec.email_id), task_queue=queue)
        await age(rsessions, failed_spec.email_id, status="retrying")
        # 4. Terminated by an operator before it could send (its queue has no worker).
        terminated = await orphan(rsessions)
        handle = await client.start_workflow(
            SendEmailWorkflow.run, make_spec(), id=workflow_id_for(terminated), task_queue=f"nobody-{uuid.uuid4()}"
        )
        await handle.terminate(reason="stuck, per runbook")
        # 5. Running (waiting for a worker): its workflow will write its own story; left alone.
        running = await orphan(rsessions)
        await client.start_workflow(SendEmailWorkflow.run, make_spec(), id=workflow_id_for(running), task_queue=f"nobody-{uuid.uuid4()}")
        # 6. Not stale: changed a moment ago, so not looked at.
        fresh = make_spec()
        async with rsessions() as s:
            await insert_email(s, record_from_spec(fresh))
            await s.commit()
        delivered_before = len(sink.messages)

        report: ReconcileReport = await client.execute_workflow(
            ReconcileEmailsWorkflow.run, ReconcileRequest(stale_after_seconds=60), id=f"reconcile-{uuid.uuid4()}", task_queue=queue
        )

        assert report.checked == 5
        assert (report.running, report.restarted) == (1, 1)
        assert report.settled == {"sent": 1, "failed": 2}
        await until(rsessions, never_started, "sent")
        assert len(sink.messages) == delivered_before + 1
        assert [str(m.message["Message-ID"]) for m in sink.messages[delivered_before:]] == [
            (await _message_id(rsessions, never_started))
        ]

    status, _, events = await state(rsessions, never_started)
    assert events[:2] == ["queued", "reconciled"] and events[-1] == "sent"
    assert (await state(rsessions, sent_spec.email_id))[:1] == ("sent",)
    assert (await state(rsessions, sent_spec.email_id))[2][-1] == "reconciled"
    status, error, _ = await state(rsessions, failed_spec.email_id)
    assert status == "failed" and error is not None and "rejected" in error
    status, error, _ = await state(rsessions, terminated)
    assert status == "failed" and error == "its workflow was terminated in Temporal (stuck, per runbook) before sending; not delivered"
    assert (await state(rsessions, running))[0] == "queued"
    assert (await state(rsessions, fresh.email_id))[0] == "queued"


async def _message_id(sessions, email_id: str) -> str:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        email = await s.get(Email, email_id)
        assert email is not None
        return email.message_id


async def test_the_schedule_runs_the_reconciler(client: Client, rsettings: Settings, rsessions, sink: SmtpSink) -> None:  # type: ignore[no-untyped-def]
    settings = rsettings.model_copy(update={"reconcile_interval_seconds": 3600})
    await ensure_reconcile_schedule(client, settings)
    await ensure_reconcile_schedule(client, settings)  # every worker calls it: the second updates
    schedule = client.get_schedule_handle(reconcile_schedule_id(settings.task_queue))
    try:
        desc = await schedule.describe()
        assert desc.schedule.spec.intervals[0].every == timedelta(hours=1)
        assert not desc.schedule.state.paused
        async with build_worker(client, settings):
            lost = await orphan(rsessions)
            await schedule.trigger()
            await until(rsessions, lost, "sent")
        assert (await state(rsessions, lost))[2][:2] == ["queued", "reconciled"]
        await ensure_reconcile_schedule(client, settings.model_copy(update={"reconcile_interval_seconds": 0}))
        assert (await schedule.describe()).schedule.state.paused
        off = settings.model_copy(update={"task_queue": f"off-{uuid.uuid4()}", "reconcile_interval_seconds": 0})
        await ensure_reconcile_schedule(client, off)  # turned off: none is created
        with pytest.raises(RPCError):
            await client.get_schedule_handle(reconcile_schedule_id(off.task_queue)).describe()
    finally:
        await schedule.delete()
