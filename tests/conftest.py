"""Shared fixtures: a real Temporal dev server, a real database, a real SMTP server.

The database is PostgreSQL at 127.0.0.1:5432 (a throw-away database per test session)
whenever it is reachable, and always in CI; elsewhere the suite falls back to SQLite.
MAILQUEUE_TEST_DATABASE=postgres|sqlite forces one.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from temporalio.client import Client

from devstack.devserver import TemporalDevServer
from devstack.net import free_port
from mailqueue.config import Settings
from mailqueue.db import create_engine, migrate, sessionmaker
from mailqueue.temporal import connect
from tests.dns_stub import DnsStub
from tests.helpers import (
    PROCESS_STARTS,
    TEST_PAYLOAD_KEY,
    SmtpSink,
    Stack,
    eventually,
    fast_settings,
    running_stack,
)
from worker import build_worker

PG_ADMIN = os.environ.get("MAILQUEUE_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _postgres_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


def _database_kind() -> str:
    kind = os.environ.get("MAILQUEUE_TEST_DATABASE", "auto")
    if kind == "auto":
        if os.environ.get("CI"):
            return "postgres"  # CI must prove the PostgreSQL path; failing loudly beats a silent fallback
        return "postgres" if _postgres_reachable() else "sqlite"
    return kind


@contextmanager
def scratch_database(tmp: Path, kind: str | None = None) -> Iterator[str]:
    """A migrated, empty database of the kind this run tests (or `kind`), dropped afterwards."""
    if (kind or _database_kind()) == "sqlite":
        url = f"sqlite:///{tmp / 'mailqueue.db'}"
        migrate(url)
        yield url
        return
    name = f"mailqueue_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with scratch_database(tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture(scope="session")
def temporal_server() -> Iterator[TemporalDevServer]:
    with TemporalDevServer(free_port()) as server:
        yield server


@pytest.fixture(scope="session")
async def client(temporal_server: TemporalDevServer) -> Client:
    """Connected as the API and the workers connect (mailqueue.temporal.connect): payloads encrypted with the test stacks' key."""
    settings = Settings(temporal_address=temporal_server.address, payload_keys=TEST_PAYLOAD_KEY, _env_file=None)  # type: ignore[call-arg]

    async def connected() -> Client | None:
        try:
            return await connect(settings)
        except RuntimeError:
            return None

    return await eventually(connected, timeout=PROCESS_STARTS, interval=0.2, what="the Temporal dev server did not come up")


@pytest.fixture(scope="session")
def sessions(database_url: str):  # type: ignore[no-untyped-def]
    return sessionmaker(create_engine(database_url))


@pytest.fixture(scope="session")
def dns_stub() -> Iterator[DnsStub]:
    """The DNS every test stack asks (`dns_servers`): tests add the records they need."""
    with DnsStub() as stub:
        yield stub


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as s:
        yield s


@pytest.fixture(autouse=True)
def _sink_scripts_are_per_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test's scripted SMTP replies end with it: one it left unused (it failed, say) must not
    answer the next test's mail on the module's shared sink."""
    sinks = [request.getfixturevalue("stack").sink] if "stack" in request.fixturenames else []
    for s in sinks:
        s.handler.reset()
    yield
    for s in sinks:
        s.handler.reset()


@pytest.fixture
def task_queue() -> str:
    return f"test-{uuid.uuid4()}"


@pytest.fixture
def settings(database_url: str, temporal_server: TemporalDevServer, sink: SmtpSink, task_queue: str, dns_stub: DnsStub) -> Settings:
    return fast_settings(database_url, temporal_server.address, sink.port, task_queue, dns_servers=[dns_stub.server])


@pytest.fixture
async def worker(client: Client, settings: Settings) -> AsyncIterator[None]:
    async with build_worker(client, settings):
        yield


@pytest.fixture
def histories_dir() -> Path:
    return Path(__file__).parent / "histories"


@pytest.fixture(scope="module")
async def stack(
    client: Client, database_url: str, temporal_server: TemporalDevServer, tmp_path_factory: pytest.TempPathFactory,
    dns_stub: DnsStub,
) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("api")
    async with running_stack(client, database_url, temporal_server.address, dns_stub.server, tmp, "api") as stack:
        yield stack
