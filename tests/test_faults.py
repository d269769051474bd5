"""The fault suite: real processes, a known set of emails, one fault each, then the sink is checked.

Every test runs the real Temporal dev server, worker processes (`python worker.py`), the API
under uvicorn and an aiosmtpd sink; clients post with an Idempotency-Key and, like a real
client, try again after a 503 or a connection dropped without an answer (never after anything
else: a 500 fails the test). Then every accepted email must have reached the sink exactly once
by Message-ID and its record must say `sent`.
The only duplicates allowed are those the fault itself can cause: a mail the server accepted an
instant before a worker was killed (or the server went away) whose acceptance nobody recorded;
each test prints how many there were and how long recovery took (`-s`, or the report line).

These tests share one throw-away database of their own (the PostgreSQL fault cuts it off).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa

from devstack.devserver import TemporalDevServer
from devstack.net import free_port
from mailqueue.config import Settings
from mailqueue.db import create_engine
from mailqueue.models import Email
from tests.conftest import PG_ADMIN, scratch_database
from tests.helpers import KEY, ApiProcess, SmtpSink, eventually, fast_settings, post_email, start_worker
from workflows.send_email import UNREACHABLE_MAX_DELAY

pytestmark = pytest.mark.faults

_ID = re.compile(r"<([^@>]+)@")


@pytest.fixture(scope="module")
def fault_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with scratch_database(tmp_path_factory.mktemp("faults-db")) as url:
        yield url


def settings_for(database_url: str, temporal: str, sink: SmtpSink, **overrides: Any) -> Settings:
    options: dict[str, Any] = dict(
        bootstrap_api_key=KEY,
        # A send held by a dead worker is given to another after this; the SMTP timeout is
        # shorter, so a live worker gives up on a send before anyone else may try it.
        send_timeout_seconds=5,
        smtp_timeout_seconds=3,
        retry_initial_interval_seconds=0.5,
        retry_maximum_interval_seconds=3,
        # A send held by a killed worker, or by a server that went away, times out: that attempt
        # is used up. (An unreachable SMTP server uses none: its test runs with the default 3.)
        default_max_attempts=10,
    )
    return fast_settings(database_url, temporal, sink.port, f"faults-{uuid.uuid4()}", **{**options, **overrides})


@dataclass
class Load:
    """Clients posting `count` emails, `clients` at a time, each with its Idempotency-Key and tried
    again after a 503 or a dropped connection, as a real client does (`post_email`).

    With `hold_at`, posting stops after that many emails until `resume` is set: a fault that
    must meet clients at the door sets it once the fault is in effect, however fast posting was.
    """

    http: httpx.AsyncClient
    count: int
    clients: int
    hold_at: int | None = None
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    ids: dict[int, str] = field(default_factory=dict)
    codes: Counter[str] = field(default_factory=Counter)  # the API's answers, each one (the 503s too)
    dropped: Counter[str] = field(default_factory=Counter)  # connections lost without an answer, and tried again
    finished_at: float = 0.0

    async def run(self) -> None:
        todo: asyncio.Queue[int] = asyncio.Queue()
        for i in range(self.count):
            todo.put_nowait(i)

        async def client() -> None:
            while not todo.empty():
                i = todo.get_nowait()
                if self.hold_at is not None and i >= self.hold_at:
                    await self.resume.wait()
                await self._post(i)

        await asyncio.gather(*(client() for _ in range(self.clients)))
        self.finished_at = time.monotonic()

    async def _post(self, i: int) -> None:
        body = {"to": [f"fault{i}@example.com"], "subject": f"{self.tag} #{i}", "text": "x"}
        retried: dict[str, int] = {}
        r = await post_email(self.http, body, f"{self.tag}-{i}", retried)
        if refused := retried.pop("503", 0):
            self.codes["503"] += refused
        self.dropped.update(retried)
        self.codes[str(r.status_code)] += 1
        assert r.status_code == 202, f"POST answered {r.status_code}: {r.text}"
        self.ids[i] = r.json()["id"]


@dataclass
class Outcome:
    accepted: int
    delivered: int
    duplicates: dict[str, int]
    copies: dict[str, list[float]]  # when each copy of an email reached the sink
    statuses: Counter[str]
    all_delivered_at: float


def quiet_limit(settings: Settings) -> float:
    """The longest the stack may deliver nothing while emails are still on their way, by its own
    bounds: an email waiting for a server that was away asks again at most UNREACHABLE_MAX_DELAY
    apart, then takes an attempt (send_timeout_seconds) or a retry interval; plus room for a
    loaded machine. As long as mail keeps arriving, waiting goes on."""
    return UNREACHABLE_MAX_DELAY + settings.send_timeout_seconds + settings.retry_maximum_interval_seconds + 60


async def settle(sink: SmtpSink, settings: Settings, load: Load) -> Outcome:
    """Wait until every accepted email reached the sink and its record is final; what happened."""
    ids = set(load.ids.values())
    engine = create_engine(settings.database_url)

    def caught() -> Counter[str]:
        return Counter(m.group(1) for m in (_ID.search(str(x.message["Message-ID"])) for x in list(sink.messages)) if m)

    async def records(of: set[str]) -> list[tuple[str, str, str | None]]:
        async with engine.connect() as conn:
            table = Email.__table__  # type: ignore[attr-defined]
            return [tuple(r) for r in (await conn.execute(sa.select(table.c.id, table.c.status, table.c.last_error).where(table.c.id.in_(of)))).all()]

    limit = quiet_limit(settings)
    try:
        try:
            await eventually(
                lambda: not (ids - set(caught())), timeout=limit, interval=0.2, progress=lambda: len(sink.messages),
                what="accepted emails not delivered",
            )
        except AssertionError as exc:
            missing = sorted(ids - set(caught()))
            some = await records(set(missing[:5]))
            raise AssertionError(f"{len(missing)} of {len(ids)} accepted emails never delivered ({exc}); records of some: {some}") from None
        delivered_at = time.monotonic()
        got = caught()
        copies: dict[str, list[float]] = {}
        for m in list(sink.messages):
            found = _ID.search(str(m.message["Message-ID"]))
            if found:
                copies.setdefault(found.group(1), []).append(m.received_at)
        statuses: Counter[str] = Counter()

        async def all_recorded() -> bool:  # a record lags its mail by at most the workflow's own write
            statuses.clear()
            statuses.update(status for _, status, _ in await records(ids))
            return statuses.get("sent") == len(ids)

        try:
            await eventually(all_recorded, timeout=limit, interval=0.5, progress=lambda: statuses.get("sent"), what=lambda: f"records: {statuses}")
        except AssertionError:
            pass  # `check` reports the statuses
    finally:
        await engine.dispose()
    return Outcome(
        accepted=len(ids),
        delivered=len(ids & set(got)),
        duplicates={i: n - 1 for i, n in got.items() if n > 1},
        copies={i: sorted(times) for i, times in copies.items()},
        statuses=statuses,
        all_delivered_at=delivered_at,
    )


def report(name: str, load: Load, out: Outcome, capsys: pytest.CaptureFixture[str], **extra: Any) -> dict[str, Any]:
    summary = {
        "fault": name,
        "emails": load.count,
        "accepted": out.accepted,
        "delivered": out.delivered,
        "duplicated": sum(out.duplicates.values()),
        "records": dict(out.statuses),
        "http": dict(load.codes),
        "dropped_and_retried": dict(load.dropped),
        **extra,
    }
    with capsys.disabled():
        print(f"\nfault report: {json.dumps(summary)}")
    return summary


def check(out: Outcome, *, fault_instants: list[float] = ()) -> None:  # type: ignore[assignment]
    """Exactly once, records final. A copy that was followed by another passes only if it was
    accepted at a fault instant (in the second before it, or bytes already on the wire just
    after): the fault took the news of it. An email in flight at two kills may go out three times."""
    assert out.delivered == out.accepted
    assert out.statuses == Counter({"sent": out.accepted}), out.statuses
    unexplained = [
        i for i in out.duplicates
        if not all(any(t - 1.0 <= at <= t + 1.0 for t in fault_instants) for at in out.copies[i][:-1])
    ]
    assert not unexplained, f"duplicates not caused by the fault: {[(i, out.copies[i]) for i in unexplained]}"


class Workers:
    """Worker processes, killed or stopped at the end."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.settings, self.tmp, self.procs = settings, tmp, []  # type: ignore[var-annotated]

    def start(self) -> Any:
        proc = start_worker(self.settings, self.tmp / f"worker-{len(self.procs) + 1}.log")
        self.procs.append(proc)
        return proc

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except Exception:  # noqa: BLE001
                proc.kill()


@dataclass
class Stack:
    sink: SmtpSink
    settings: Settings
    workers: Workers
    http: httpx.AsyncClient


@asynccontextmanager
async def stack(database_url: str, temporal_address: str, tmp: Path, *, workers: int = 1, **overrides: Any) -> AsyncIterator[Stack]:
    """A sink, `workers` worker processes and the API (uvicorn), all stopped at the end."""
    with SmtpSink() as sink:
        settings = settings_for(database_url, temporal_address, sink, **overrides)
        procs = Workers(settings, tmp)
        try:
            for _ in range(workers):
                procs.start()
            async with ApiProcess(settings, tmp / "api.log") as api:
                async with httpx.AsyncClient(
                    base_url=api.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                    limits=httpx.Limits(max_connections=100),
                ) as http:
                    yield Stack(sink, settings, procs, http)
        finally:
            procs.stop()


async def when(st: Stack, load: Load, condition: Callable[[], bool]) -> None:
    """Until the load has got that far (however slowly: as long as it moves)."""
    await eventually(
        condition, timeout=quiet_limit(st.settings), interval=0.02,
        progress=lambda: (len(load.ids), len(st.sink.messages)), what="the load never got that far",
    )


async def under_load(st: Stack, load: Load, fault: Callable[[], Awaitable[None]] | None = None) -> Outcome:
    """Post the load (with the fault injected meanwhile), then wait for every email to settle."""
    await asyncio.gather(load.run(), *([fault()] if fault else []))
    return await settle(st.sink, st.settings, load)


# --- 1. a worker SIGKILLed three times during 500 emails -----------------------------------------


async def test_worker_killed_three_times(fault_db: str, temporal_server: TemporalDevServer, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    kills: list[float] = []
    async with stack(fault_db, temporal_server.address, tmp_path) as st:
        load = Load(st.http, 500, 10)

        async def kill_three_times() -> None:
            for at in (100, 200, 300):
                await when(st, load, lambda at=at: len(st.sink.messages) >= at)
                st.workers.procs[-1].send_signal(signal.SIGKILL)
                kills.append(time.time())
                st.workers.start()

        out = await under_load(st, load, kill_three_times)
        last_kill = time.monotonic() - (time.time() - kills[-1])
    report("worker SIGKILL x3", load, out, capsys, recovered_seconds_after_last_kill=round(out.all_delivered_at - last_kill, 1))
    check(out, fault_instants=kills)


# --- 2. the Temporal server stopped and started again during 500 emails ---------------------------


async def test_temporal_restarted(fault_db: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    server = TemporalDevServer(free_port(), db_file=tmp_path / "temporal.db")
    marks: dict[str, float] = {}
    with server:
        async with stack(fault_db, server.address, tmp_path) as st:
            load = Load(st.http, 500, 10, hold_at=200)

            async def restart() -> None:
                # Mid-load: sends in flight, and 300 emails still to be posted while it is down.
                await when(st, load, lambda: len(load.ids) >= 200 and len(st.sink.messages) >= 50)
                marks["stopped"] = time.time()
                await asyncio.to_thread(server.stop)
                load.resume.set()
                # Longer than the API's 10 s RPC timeout: within it a POST just waits for the
                # server to come back (and gets its 202); past it, the door answers 503.
                await asyncio.sleep(15)
                await asyncio.to_thread(server.start)
                marks["started"] = time.monotonic()

            out = await under_load(st, load, restart)
            assert st.workers.alive(), "a worker died with the server away"
    report(
        "Temporal stopped 15 s and restarted", load, out, capsys,
        recovered_seconds_after_restart=round(out.all_delivered_at - marks["started"], 1),
    )
    assert int(load.codes.get("503", 0)) > 0, "the API never saw Temporal down: the fault was not exercised"
    check(out, fault_instants=[marks["stopped"]])


# --- 3. the SMTP server down for 30 s during 200 emails -------------------------------------------


async def test_smtp_down_for_30_seconds(fault_db: str, temporal_server: TemporalDevServer, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    marks: dict[str, float] = {}
    # The default attempts (3, here 0.5 s then 1 s apart) would all be used up within 2 s of a
    # failing server: the emails survive the 30 s only because waiting for an unreachable server
    # uses up none (it is waited for, asking again at most 60 s apart).
    async with stack(fault_db, temporal_server.address, tmp_path, default_max_attempts=3) as st:
        load = Load(st.http, 200, 10)

        async def outage() -> None:
            await when(st, load, lambda: len(st.sink.messages) >= 50)
            marks["down"] = time.time()
            await asyncio.to_thread(st.sink.down)
            during = len(st.sink.messages)
            await asyncio.sleep(30)
            assert len(st.sink.messages) == during
            await asyncio.to_thread(st.sink.up)
            marks["up"] = time.monotonic()

        out = await under_load(st, load, outage)
    report("SMTP down 30 s", load, out, capsys, recovered_seconds_after_smtp_back=round(out.all_delivered_at - marks["up"], 1))
    check(out, fault_instants=[marks["down"]])


# --- 4. PostgreSQL unreachable for 10 s during 200 emails -----------------------------------------


def cut_off(database: str, allow: bool) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allow).lower()}')
        if not allow:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))


@pytest.fixture
def postgres_db(tmp_path: Path) -> Iterator[str]:
    """PostgreSQL whatever this run's database is: the fault is cutting PostgreSQL's connections
    (it runs at 127.0.0.1:5432 wherever the suite runs; its absence fails this test, never skips it)."""
    with scratch_database(tmp_path, "postgres") as url:
        yield url


async def test_database_unreachable_for_10_seconds(postgres_db: str, temporal_server: TemporalDevServer, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    database = postgres_db.rsplit("/", 1)[1]
    marks: dict[str, float] = {}
    async with stack(postgres_db, temporal_server.address, tmp_path) as st:
        load = Load(st.http, 200, 10, hold_at=100)

        async def outage() -> None:
            await when(st, load, lambda: len(st.sink.messages) >= 50)
            try:
                await asyncio.to_thread(cut_off, database, False)  # every connection dropped, new ones refused
                load.resume.set()  # the other 100 are posted while it is down
                await asyncio.sleep(10)
            finally:
                await asyncio.to_thread(cut_off, database, True)
            marks["back"] = time.monotonic()

        out = await under_load(st, load, outage)
    report("PostgreSQL cut off 10 s", load, out, capsys, recovered_seconds_after_database_back=round(out.all_delivered_at - marks["back"], 1))
    assert int(load.codes.get("503", 0)) > 0, "the API never saw the database down: the fault was not exercised"
    check(out)


# --- 5. 50 concurrent clients posting 1,000 emails; 6. two workers at once ------------------------


@pytest.mark.parametrize(
    ("name", "emails", "clients", "workers"),
    [("50 clients x 1000 emails", 1000, 50, 1), ("two workers", 400, 20, 2)],
    ids=["fifty_clients_post_a_thousand", "two_workers_never_send_twice"],
)
async def test_load_without_faults(  # type: ignore[no-untyped-def]
    name: str, emails: int, clients: int, workers: int, fault_db: str, temporal_server: TemporalDevServer, tmp_path: Path, capsys
) -> None:
    async with stack(fault_db, temporal_server.address, tmp_path, workers=workers) as st:
        load = Load(st.http, emails, clients)
        started = time.monotonic()
        out = await under_load(st, load)
        assert st.workers.alive(), "no deadlock, no crash"
    report(name, load, out, capsys, seconds=round(out.all_delivered_at - started, 1))
    assert set(load.codes) == {"202"}, load.codes  # not even a 503: nothing was down
    check(out)


# --- 7. the kill switch: paused mid-load, more posted while paused, then resumed -------------------


async def test_kill_switch_drill(fault_db: str, temporal_server: TemporalDevServer, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """300 emails posted; sending paused once 100 are delivered; 100 more posted while paused. Every
    email not yet out waits `paused` and nothing is delivered for 20 s; then sending resumes and all
    400 go out exactly once, none failed."""
    async with stack(fault_db, temporal_server.address, tmp_path, flags_refresh_seconds=1) as st:
        first = Load(st.http, 300, 20)

        async def pause_after_100() -> None:
            await when(st, first, lambda: len(st.sink.messages) >= 100)
            put = await st.http.put("/v1/flags/sending.paused", json={"enabled": True, "reason": "kill-switch drill"})
            assert put.status_code == 200, put.text

        await asyncio.gather(first.run(), pause_after_100())
        more = Load(st.http, 100, 10, tag=first.tag + "b")
        await more.run()
        ids = set(first.ids.values()) | set(more.ids.values())
        engine = create_engine(st.settings.database_url)
        table = Email.__table__  # type: ignore[attr-defined]

        async def statuses() -> Counter[str]:
            async with engine.connect() as conn:
                rows = (await conn.execute(sa.select(table.c.status).where(table.c.id.in_(ids)))).all()
            return Counter(r[0] for r in rows)

        held: Counter[str] = Counter()

        async def all_waiting() -> bool:  # every email is out, or paused
            held.clear()
            held.update(await statuses())
            return set(held) <= {"sent", "paused"} and held["sent"] + held["paused"] == len(ids)

        try:
            await eventually(all_waiting, timeout=quiet_limit(st.settings), interval=0.5, what=lambda: f"records: {held}")
            out_before = len(st.sink.messages)
            await asyncio.sleep(20)  # paused: nothing more goes out, however long
            assert len(st.sink.messages) == out_before, "mail went out while sending was paused"
            assert await statuses() == held
            resumed = time.monotonic()
            put = await st.http.put("/v1/flags/sending.paused", json={"enabled": False, "reason": "drill over"})
            assert put.status_code == 200, put.text
            both = Load(st.http, 0, 1, tag=first.tag)
            both.ids = {i: v for i, v in enumerate(sorted(ids))}
            out = await settle(st.sink, st.settings, both)
        finally:
            await engine.dispose()
    report("kill-switch drill", both, out, capsys, paused=held["paused"], delivered_before_pause=out_before,
           seconds_from_resume_to_last=round(out.all_delivered_at - resumed, 1))
    assert held["paused"] > 0 and len(ids) == 400
    check(out)
