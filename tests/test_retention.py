"""Retention: the purge deletes exactly the final emails past retention, with their rows and files,
touches nothing else, is safe to run twice at once, and runs daily from the workers' Schedule.

Each test has a database of its own: the purge looks at every record, and other tests' are not its business.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from temporalio.client import Client, ScheduleActionStartWorkflow
from temporalio.service import RPCError

from devstack.devserver import TemporalDevServer
from mailqueue import retention
from mailqueue.accounts import new_id
from mailqueue.blobs import SqlBlobs
from mailqueue.contracts import FINAL, PURGE_WORKFLOW, EmailStatus, PurgeReport, purge_schedule_id
from mailqueue.db import create_engine, sessionmaker
from mailqueue.email_store import insert_email, record_from_spec
from mailqueue.models import (
    Blob,
    BlobChunk,
    Email,
    EmailAttachment,
    EmailEvent,
    EmailEventFeed,
    EmailRecipient,
    MaintenanceRun,
    Suppression,
    SuppressionReason,
)
from mailqueue.temporal import ensure_purge_schedule
from tests.conftest import scratch_database
from tests.helpers import AUTH, PROCESS_STARTS, ApiProcess, SmtpSink, eventually, fast_settings, make_spec, start_worker

NOW = datetime.now(UTC)
RETENTION_DAYS = 90
PAST = NOW - timedelta(days=RETENTION_DAYS + 10)  # past retention
RECENT = NOW - timedelta(days=RETENTION_DAYS - 10)  # within it
UNFINISHED = [s for s in EmailStatus if s not in FINAL]


@pytest.fixture
async def own(tmp_path: Path) -> AsyncIterator[tuple[str, Any]]:
    """A database of this test's own, and its sessions."""
    with scratch_database(tmp_path) as url:
        engine = create_engine(url)
        yield url, sessionmaker(engine)
        await engine.dispose()


def attachment(blob_id: str, data: bytes) -> dict[str, Any]:
    return {"blob_id": blob_id, "filename": "f.txt", "content_type": "text/plain", "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "disposition": "attachment", "content_id": None}


async def add_blob(sessions: Any, *, expires_at: datetime | None = None) -> str:
    """A stored file (bytes in blob_chunks), named by no email yet."""
    blob_id, data = str(uuid.uuid4()), os.urandom(32)
    async with sessions() as s:
        s.add(Blob(id=blob_id, owner_type="system", size=len(data), sha256=hashlib.sha256(data).hexdigest(), content_type="text/plain",
                   filename="f.txt", expires_at=expires_at))
        await s.flush()
        await SqlBlobs().put(s, blob_id, data)
        await s.commit()
    return blob_id


async def seed_email(sessions: Any, status: str, changed: datetime, *, blobs: tuple[str, ...] = (), events: int = 2) -> str:
    """An email in `status`, last changed at `changed`, with recipients (to and cc), the `queued` event and
    `events` more, and attachment rows naming `blobs`: written directly, as the workers leave records."""
    spec = make_spec(to=["Ann <ann@example.com>", "bob@example.com"])
    email = record_from_spec(spec, idempotency_key=f"key-{spec.email_id}")
    email.cc = ["carol@example.com"]
    email.status = status
    email.attachments = [attachment(b, b"") for b in blobs] or None
    async with sessions() as s:
        await insert_email(s, email)
        s.add_all(EmailEvent(id=str(uuid.uuid4()), email_id=spec.email_id, event="sending", status="sending", attempt=1, created_at=changed)
                  for _ in range(events))
        await s.commit()
        await (await s.connection()).execute(
            sa.update(Email).where(Email.id == spec.email_id).values(created_at=changed - timedelta(minutes=5), updated_at=changed)
        )
        await s.commit()
    return spec.email_id


async def counts(sessions: Any, email_ids: list[str]) -> dict[str, int]:
    """Rows of these emails left in each table that hangs on an email."""
    async with sessions() as s:
        out = {}
        for name, model in (("emails", Email), ("events", EmailEvent), ("feed", EmailEventFeed), ("recipients", EmailRecipient),
                            ("attachments", EmailAttachment)):
            column = model.id if model is Email else model.email_id
            out[name] = (await s.exec(sa.select(sa.func.count()).select_from(model).where(column.in_(email_ids)))).one()[0]
        return out


async def blobs_left(sessions: Any, blob_ids: list[str]) -> set[str]:
    async with sessions() as s:
        rows = set((await s.exec(sa.select(Blob.id).where(Blob.id.in_(blob_ids)))).scalars())
        chunks = set((await s.exec(sa.select(BlobChunk.blob_id).where(BlobChunk.blob_id.in_(blob_ids)))).scalars())
    assert chunks == rows, "a blob's bytes go with its row"
    return rows


async def test_purge_removes_exactly_the_final_emails_past_retention_with_their_rows_and_files(own: tuple[str, Any]) -> None:
    _, sessions = own
    own_file, shared_file, upload = await add_blob(sessions), await add_blob(sessions), await add_blob(sessions, expires_at=NOW + timedelta(days=1))
    # Past retention and final, one of each final status: these go (one sends a file of its own, one shares a file).
    doomed = [await seed_email(sessions, s.value, PAST) for s in sorted(FINAL)]
    doomed.append(await seed_email(sessions, EmailStatus.SENT.value, PAST, blobs=(own_file, shared_file)))
    # Everything else stays: unfinished however old, final but recent (and sharing the file), and a suppression.
    kept = [await seed_email(sessions, s.value, PAST - timedelta(days=365)) for s in UNFINISHED]
    kept += [await seed_email(sessions, s.value, RECENT) for s in sorted(FINAL)]
    kept.append(await seed_email(sessions, EmailStatus.DELIVERED.value, RECENT, blobs=(shared_file,)))
    async with sessions() as s:
        s.add(Suppression(id=new_id(), sender="system:", address="ann@example.com", match_key="ann@example.com",
                          reason=SuppressionReason.HARD_BOUNCE.value, source="api", created_at=PAST - timedelta(days=365)))
        await s.commit()
    before_kept = await counts(sessions, kept)
    doomed_rows = await counts(sessions, doomed)
    assert doomed_rows["events"] == 3 * len(doomed) and doomed_rows["feed"] == doomed_rows["events"]  # the trigger filled the feed

    seen: list[int] = []
    report = await retention.purge(sessions, SqlBlobs(), NOW, RETENTION_DAYS, batch=3, on_batch=lambda r: seen.append(r.emails))

    assert (report.emails, report.events, report.blobs) == (len(doomed), doomed_rows["events"], 1)
    assert report.batches == -(-len(doomed) // 3) and seen == [min(3 * i, len(doomed)) for i in range(1, report.batches + 1)]
    assert report.cutoff == NOW - timedelta(days=RETENTION_DAYS)
    assert await counts(sessions, doomed) == {"emails": 0, "events": 0, "feed": 0, "recipients": 0, "attachments": 0}
    assert await counts(sessions, kept) == before_kept and before_kept["emails"] == len(kept)
    assert await blobs_left(sessions, [own_file, shared_file, upload]) == {shared_file, upload}
    async with sessions() as s:
        assert len((await s.exec(sa.select(Suppression.id))).all()) == 1
        statuses = {row[0] for row in (await s.exec(sa.select(Email.status))).all()}
        assert statuses == {s.value for s in UNFINISHED} | {s.value for s in FINAL}
        last = await retention.last_run(s)
    assert last is not None and (last.emails, last.events, last.blobs, last.batches) == (
        report.emails, report.events, report.blobs, report.batches)

    # Again: nothing is left to delete, and that run is the last one now.
    again = await retention.purge(sessions, SqlBlobs(), NOW, RETENTION_DAYS, batch=3)
    assert (again.emails, again.events, again.blobs, again.batches) == (0, 0, 0, 0)
    async with sessions() as s:
        assert (await retention.last_run(s)).emails == 0  # type: ignore[union-attr]
    assert await counts(sessions, kept) == before_kept


async def test_retention_zero_purges_nothing(own: tuple[str, Any]) -> None:
    _, sessions = own
    old = await seed_email(sessions, EmailStatus.SENT.value, NOW - timedelta(days=5000))
    report = await retention.purge(sessions, SqlBlobs(), NOW, 0, batch=10)
    assert report.cutoff is None and (report.emails, report.events, report.blobs) == (0, 0, 0)
    assert (await counts(sessions, [old]))["emails"] == 1


async def test_two_purges_at_once_share_the_work_and_their_totals_add_up(own: tuple[str, Any]) -> None:
    """As two workers' runs would: each with its own engine (connections), at the same time."""
    url, sessions = own
    files = [await add_blob(sessions) for _ in range(6)]
    doomed = [await seed_email(sessions, EmailStatus.SENT.value, PAST, blobs=(files[i],) if i < len(files) else (), events=3)
              for i in range(40)]
    kept = [await seed_email(sessions, EmailStatus.QUEUED.value, PAST), await seed_email(sessions, EmailStatus.SENT.value, RECENT)]
    engines = [create_engine(url), create_engine(url)]
    try:
        reports: list[PurgeReport] = await asyncio.gather(
            *(retention.purge(sessionmaker(e), SqlBlobs(), NOW, RETENTION_DAYS, batch=4) for e in engines)
        )
    finally:
        for e in engines:
            await e.dispose()

    assert sum(r.emails for r in reports) == 40
    assert sum(r.events for r in reports) == 40 * 4  # `queued` and 3 more each
    assert sum(r.blobs for r in reports) == len(files)
    assert await counts(sessions, doomed) == {"emails": 0, "events": 0, "feed": 0, "recipients": 0, "attachments": 0}
    assert (await counts(sessions, kept))["emails"] == 2
    assert await blobs_left(sessions, files) == set()
    async with sessions() as s:
        runs = (await s.exec(sa.select(MaintenanceRun.emails).where(MaintenanceRun.job == retention.JOB))).scalars().all()
    assert sorted(runs) == sorted(r.emails for r in reports)  # each run kept its own report


async def test_two_purges_at_once_count_each_unused_file_once(own: tuple[str, Any]) -> None:
    """Files no email names (left by emails deleted earlier): both runs reach them at the same moment."""
    url, sessions = own
    files = [await add_blob(sessions) for _ in range(30)]
    engines = [create_engine(url), create_engine(url)]
    try:
        reports = await asyncio.gather(*(retention.purge(sessionmaker(e), SqlBlobs(), NOW, RETENTION_DAYS, batch=4) for e in engines))
    finally:
        for e in engines:
            await e.dispose()
    assert sum(r.blobs for r in reports) == 30 and await blobs_left(sessions, files) == set()


# --- the Schedule ------------------------------------------------------------------------------


async def test_the_worker_creates_the_daily_schedule_and_it_purges_end_to_end(
    client: Client, temporal_server: TemporalDevServer, own: tuple[str, Any], tmp_path: Path,
) -> None:
    url, sessions = own
    with SmtpSink() as sink:
        settings = fast_settings(url, temporal_server.address, sink.port, f"purge-{uuid.uuid4()}", retention_days=RETENTION_DAYS,
                                 purge_batch=2, purge_hour_utc=4)
        schedule = client.get_schedule_handle(purge_schedule_id(settings.task_queue))
        worker = start_worker(settings, tmp_path / "worker.log")
        try:
            async def described() -> Any:
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()
                try:
                    return await schedule.describe()
                except RPCError:
                    return None

            desc = await eventually(described, timeout=PROCESS_STARTS, interval=0.2, what="the worker never created the purge schedule")
            (calendar,) = desc.schedule.spec.calendars
            assert [(r.start, r.end or r.start) for r in calendar.hour] == [(4, 4)]  # daily, at 04:00 UTC
            assert [(r.start, r.end or r.start) for r in calendar.minute] == [(0, 0)]
            assert [(r.start, r.end) for r in calendar.day_of_month] == [(1, 31)]
            assert not desc.schedule.state.paused
            action = desc.schedule.action
            assert isinstance(action, ScheduleActionStartWorkflow) and action.workflow == PURGE_WORKFLOW
            assert action.task_queue == settings.task_queue

            doomed = [await seed_email(sessions, EmailStatus.SENT.value, PAST) for _ in range(3)]
            kept = [await seed_email(sessions, EmailStatus.SCHEDULED.value, PAST), await seed_email(sessions, EmailStatus.FAILED.value, RECENT)]
            await schedule.trigger()

            async def ran() -> Any:
                runs = (await schedule.describe()).info.recent_actions
                return runs[-1].action if runs else None

            started = await eventually(ran, timeout=PROCESS_STARTS, interval=0.2, what="the schedule started no run")
            report: PurgeReport = await client.get_workflow_handle(
                started.workflow_id, run_id=started.first_execution_run_id, result_type=PurgeReport,
            ).result()
            assert (report.emails, report.events, report.batches) == (3, 9, 2)
            assert (await counts(sessions, doomed))["emails"] == 0 and (await counts(sessions, kept))["emails"] == 2

            # /v1/stats shows it to admins, in any API process.
            async with ApiProcess(settings, tmp_path / "api.log") as api, httpx.AsyncClient(base_url=api.url, headers=AUTH) as http:
                last = (await http.get("/v1/stats")).json()["last_purge"]
                assert (last["emails"], last["events"], last["blobs"], last["batches"]) == (3, 9, 0, 2)
                assert datetime.fromisoformat(last["cutoff"]) == report.cutoff
                made = await http.post("/v1/users", json={"name": f"u-{uuid.uuid4().hex[:8]}"})
                key = (await http.post(f"/v1/users/{made.json()['id']}/api-keys")).json()["key"]
                mine = await http.get("/v1/stats", headers={"Authorization": f"Bearer {key}"})
                assert mine.status_code == 200 and mine.json()["last_purge"] is None  # counts over everyone's mail: admins only
        finally:
            worker.terminate()
            await asyncio.to_thread(worker.wait, 30)
            try:
                off = settings.model_copy(update={"retention_days": 0})
                await ensure_purge_schedule(client, off)  # turned off: the schedule is paused, not deleted
                assert (await schedule.describe()).schedule.state.paused
            finally:
                await schedule.delete()
        other = settings.model_copy(update={"task_queue": f"off-{uuid.uuid4()}", "retention_days": 0})
        await ensure_purge_schedule(client, other)  # off from the start: none is created
        with pytest.raises(RPCError):
            await client.get_schedule_handle(purge_schedule_id(other.task_queue)).describe()
