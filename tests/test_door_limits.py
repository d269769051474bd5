"""Limits at the door, against real API processes (uvicorn children) on one PostgreSQL database:
request rates per API key shared by two processes (counted in the database, and in a Redis of
the test's own), bodies cut as their bytes arrive, and the API docs behind an admin key."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import time
import uuid
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlmodel import select

from devstack.devserver import TemporalDevServer
from devstack.net import free_port
from mailqueue.accounts import issue_key, new_id
from mailqueue.models import RateLimitCounter, User
from tests.dns_stub import DnsStub
from tests.helpers import KEY, PROCESS_STARTS, ApiProcess, fast_settings

T = TypeVar("T")
LIMIT = 300
MB = 1 << 20
PATH = "/v1/settings/mail"  # cheap, and 200 for any user key
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"anyone:{key}".encode()).decode()}


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]


def peak_rss_kib(pid: int) -> int:
    """The highest RSS since the process started, or since "5" was written to its clear_refs."""
    return rss_kib(pid, "VmHWM")


async def user_key(sessions: Any, role: str = "user") -> str:
    """A new user's API key."""
    async with sessions() as s:
        user = User(id=new_id(), name=f"door-{uuid.uuid4()}", role=role)
        s.add(user)
        await s.commit()
        return (await issue_key(s, user)).key


async def within_one_minute(attempt: Callable[[], Awaitable[T]]) -> T:
    """`attempt`'s result, from a run that began and ended in the same minute (the limiter's window:
    the API processes share this machine's clock); a run that crossed a minute's edge is done again."""
    for _ in range(3):
        minute = time.time() // 60
        result = await attempt()
        if time.time() // 60 == minute:
            return result
    raise AssertionError("three runs in a row crossed a minute's edge")


# --- the processes --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """A redis-server of this module's own, on a free port in a temporary folder; None (and a
    warning in the test summary) where there is no redis-server: the Redis runs use the database."""
    if not Path(REDIS_SERVER).exists():
        warnings.warn("redis-server not found: the Redis variant of the rate-limit tests counts in the database", stacklevel=1)
        yield None
        return
    folder, port = tmp_path_factory.mktemp("redis"), free_port()
    server = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=(folder / "redis.log").open("wb"), stderr=subprocess.STDOUT,
    )
    client, deadline = Redis(port=port, socket_timeout=1), time.monotonic() + PROCESS_STARTS
    try:
        while True:
            assert server.poll() is None, f"redis-server exited; see {folder / 'redis.log'}"
            try:
                client.ping()
                break
            except RedisConnectionError:
                assert time.monotonic() < deadline, "redis-server never answered PING"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the API processes write their logs (<name>.log)."""
    return tmp_path_factory.mktemp("door")


@pytest.fixture(scope="module")
async def apis(
    database_url: str, temporal_server: TemporalDevServer, dns_stub: DnsStub, redis_url: str | None, logs: Path,
) -> AsyncIterator[dict[str, ApiProcess]]:
    """API processes on the session's database, by name:
    db-a, db-b: limit 300 a minute, counted in the database; redis-a, redis-b: the same in Redis;
    open: no limit, docs for admins only; dead-redis: limit 1, counted in a Redis nobody runs."""

    def settings(**overrides: Any) -> Any:
        return fast_settings(
            database_url, temporal_server.address, free_port(), f"door-{uuid.uuid4()}", dns_servers=[dns_stub.server],
            **overrides,
        )

    limited = {"rate_limit_per_minute": LIMIT}
    wanted = {
        "db-a": settings(**limited), "db-b": settings(**limited),
        "redis-a": settings(**limited, redis_url=redis_url), "redis-b": settings(**limited, redis_url=redis_url),
        "open": settings(public_docs=False),
        "dead-redis": settings(rate_limit_per_minute=1, redis_url=f"redis://127.0.0.1:{free_port()}/0"),
    }
    async with AsyncExitStack() as stack:
        started = await asyncio.gather(
            *(stack.enter_async_context(ApiProcess(s, logs / f"{name}.log")) for name, s in wanted.items())
        )
        yield dict(zip(wanted, started, strict=True))


def http(api: ApiProcess, **kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=api.url, timeout=60, **kw)


# --- request rates ----------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["db", "redis"])
async def test_the_301st_request_in_a_minute_is_429_on_both_processes(
    apis: dict[str, ApiProcess], sessions: Any, store: str, redis_url: str | None
) -> None:
    a, b = apis[f"{store}-a"], apis[f"{store}-b"]
    async with http(a) as on_a, http(b) as on_b:

        async def flood() -> tuple[str, list[tuple[str, httpx.Response]]]:
            key, gate = await user_key(sessions), asyncio.Semaphore(16)

            async def one(i: int) -> tuple[str, httpx.Response]:
                name, client = ("a", on_a) if i % 2 else ("b", on_b)
                async with gate:
                    return name, await client.get(PATH, headers=bearer(key))

            return key, await asyncio.gather(*(one(i) for i in range(LIMIT + 30)))

        key, answers = await within_one_minute(flood)
        assert Counter(r.status_code for _, r in answers) == {200: LIMIT, 429: 30}, Counter(r.status_code for _, r in answers)
        # One count for both processes, each request counted once: the 300 admitted saw every count.
        remaining = sorted(int(r.headers["RateLimit-Remaining"]) for _, r in answers if r.status_code == 200)
        assert remaining == list(range(LIMIT))
        assert {name for name, r in answers if r.status_code == 429} == {"a", "b"}

        for client in (on_a, on_b):
            refused = await client.get(PATH, headers=bearer(key))
            assert refused.status_code == 429, refused.text
            assert 1 <= int(refused.headers["Retry-After"]) <= 60
            assert refused.headers["RateLimit-Limit"] == str(LIMIT) and refused.headers["RateLimit-Remaining"] == "0"
            assert f"{LIMIT} requests a minute" in refused.json()["detail"] and key not in refused.text

        # Another key, and the bootstrap key, are not touched by it.
        other = await user_key(sessions)
        for client in (on_a, on_b):
            assert (await client.get(PATH, headers=bearer(other))).status_code == 200
            assert (await client.get("/v1/emails/unknown", headers=bearer(KEY))).status_code == 404

    # The counters are named by a hash of the key, never by the key.
    if store == "redis" and redis_url:
        with Redis.from_url(redis_url) as redis:
            names = [n.decode() for n in redis.keys("mailqueue:rate:*")]
        assert names and not any(key in n or other in n for n in names)
    else:
        async with sessions() as s:
            rows = (await s.exec(select(RateLimitCounter))).all()
        assert any(row.count > LIMIT for row in rows) and not any(key in row.subject or other in row.subject for row in rows)


async def test_the_bootstrap_key_is_limited_too(apis: dict[str, ApiProcess]) -> None:
    async with http(apis["db-a"], headers=bearer(KEY)) as on_a, http(apis["db-b"], headers=bearer(KEY)) as on_b:

        async def flood() -> list[httpx.Response]:
            gate = asyncio.Semaphore(16)

            async def one(i: int) -> httpx.Response:
                async with gate:
                    return await (on_a if i % 2 else on_b).get("/v1/emails/unknown")

            return list(await asyncio.gather(*(one(i) for i in range(LIMIT + 30))))

        answers = await within_one_minute(flood)
        # Its count may have begun before (other tests, a run that crossed a minute): whatever it
        # began at, each admitted request took the next count up to the limit, and the rest are 429.
        admitted = sorted(int(r.headers["RateLimit-Remaining"]) for r in answers if r.status_code == 404)
        assert admitted == list(range(len(admitted)))
        assert Counter(r.status_code for r in answers) == {404: len(admitted), 429: LIMIT + 30 - len(admitted)}
        assert (await on_a.get("/v1/emails/unknown")).status_code == 429
        assert (await on_b.get("/v1/emails/unknown")).status_code == 429


async def test_without_a_valid_key_nothing_is_counted(apis: dict[str, ApiProcess], sessions: Any) -> None:
    async with http(apis["db-a"]) as client:
        for _ in range(3):
            wrong = await client.get(PATH, headers=bearer("mq_not-a-key"))
            assert wrong.status_code == 401 and "RateLimit-Remaining" not in wrong.headers
        fresh = await client.get(PATH, headers=bearer(await user_key(sessions)))
        assert fresh.status_code == 200 and int(fresh.headers["RateLimit-Remaining"]) == LIMIT - 1


async def test_a_counter_store_that_is_down_lets_requests_through_with_a_warning(
    apis: dict[str, ApiProcess], sessions: Any, logs: Path
) -> None:
    api, key = apis["dead-redis"], await user_key(sessions)
    async with http(api, headers=bearer(key)) as client:
        # Limit 1 a minute: counted, the second would be refused.
        answers = [await client.get(PATH) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert not any("RateLimit-Remaining" in r.headers for r in answers)
    log = (logs / "dead-redis.log").read_text()
    assert "request rate limits are not enforced: the counter store is unavailable" in log
    assert "redis://" not in log and key not in log


async def test_what_the_limit_costs_per_request(apis: dict[str, ApiProcess], sessions: Any) -> None:
    """Not a bound (the machine is shared): the figure, printed for the report, and the headers.
    The three processes take turns request by request, so that load from elsewhere falls on all."""
    targets = {"off": apis["open"], "database": apis["db-a"], "redis": apis["redis-a"]}
    took: dict[str, list[float]] = {name: [] for name in targets}
    async with AsyncExitStack() as stack:
        clients = {name: await stack.enter_async_context(http(api)) for name, api in targets.items()}
        for _ in range(2):  # a figure for the report, not a benchmark: the cost per request was measured at 10 x 100
            key = await user_key(sessions)  # 101 requests per key and process: under the limit, whatever the minute
            for client in clients.values():
                await client.get(PATH, headers=bearer(key))  # a warm connection
            for _ in range(100):
                for name, client in clients.items():
                    start = time.perf_counter()
                    r = await client.get(PATH, headers=bearer(key))
                    took[name].append(time.perf_counter() - start)
                    assert r.status_code == 200, r.text
                    assert ("RateLimit-Remaining" in r.headers) is (name != "off")
    median = {name: statistics.median(times) * 1000 for name, times in took.items()}
    print(
        f"\nGET {PATH}, 200 requests to each process, median: "
        + ", ".join(f"{name} {ms:.2f} ms" for name, ms in median.items())
        + f"; added by the limit: database {median['database'] - median['off']:+.2f} ms,"
        f" redis {median['redis'] - median['off']:+.2f} ms per request"
    )


# --- bodies -------------------------------------------------------------------------------


async def test_a_1gb_chunked_post_without_a_key_is_cut_at_the_limit(apis: dict[str, ApiProcess]) -> None:
    api = apis["open"]
    assert api.process is not None
    sent = 0

    async def gigabyte() -> AsyncIterator[bytes]:
        nonlocal sent
        chunk = b"x" * MB
        for _ in range(1024):
            sent += len(chunk)
            yield chunk

    before = rss_kib(api.process.pid)
    start = time.perf_counter()
    async with http(api) as anon:
        refused = await anon.post("/v1/emails", content=gigabyte(), headers={"Content-Type": "application/json"})
    took = time.perf_counter() - start
    after = rss_kib(api.process.pid)
    print(f"\n1 GB chunked POST: {refused.status_code} after the client sent {sent / MB:.0f} MB in {took:.1f} s;"
          f" API RSS {before / 1024:.1f} MB -> {after / 1024:.1f} MB ({(after - before) / 1024:+.1f} MB)")
    assert refused.status_code == 413 and "larger than 4000000 bytes" in refused.json()["detail"]
    assert refused.headers["Connection"] == "close"
    assert after - before < 50 * 1024

    async with http(api) as anon:  # and it still answers
        assert (await anon.get("/healthz")).status_code == 200


async def test_a_body_that_never_ends_gets_its_413_at_once_and_then_the_connection_closes(apis: dict[str, ApiProcess]) -> None:
    """The API reads and drops what follows a refused body for a while (so that clients that read
    only after sending see the 413), but not for ever: here the body never ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", apis["open"].port)
    writer.write(b"POST /v1/emails HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * (64 * 1024)
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)

    async def send_for_ever() -> int:
        sent = 0
        try:
            while True:
                writer.write(framed)
                await writer.drain()
                sent += len(chunk)
                if sent > 5 * MB:
                    await asyncio.sleep(0.05)  # past the limit: a trickle, never the end
        except ConnectionError:
            return sent

    sender = asyncio.create_task(send_for_ever())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        assert head.startswith(b"HTTP/1.1 413 ") and b"connection: close" in head.lower(), head
        assert not sender.done()  # the answer came while the body was still coming
        sent = await asyncio.wait_for(sender, 120)  # and then the API closed the connection
    finally:
        sender.cancel()
        writer.close()
    print(f"\na body that never ends: 413 at once, the connection closed after {sent / MB:.1f} MB")


async def test_an_upload_is_streamed_to_the_store_not_held_whole_in_memory(apis: dict[str, ApiProcess], sessions: Any) -> None:
    """POST /v1/uploads: the form goes to a spooled file (on disk past 1 MB) and from there to the
    blob store a piece at a time; the API's memory does not grow by the file's size."""
    api = apis["open"]
    assert api.process is not None
    data = os.urandom(18 * MB)
    async with http(api, headers={"Authorization": f"Bearer {await user_key(sessions)}"}) as h:
        warm = await h.post("/v1/uploads", files={"file": ("warm.bin", os.urandom(2 * MB))})  # the code paths loaded once
        assert warm.status_code == 201, warm.text
        before = rss_kib(api.process.pid)
        Path(f"/proc/{api.process.pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
        got = await h.post("/v1/uploads", files={"file": ("big.bin", data)})
        peak = peak_rss_kib(api.process.pid)
    print(f"\n18 MB upload: API peak RSS {(peak - before) / 1024:+.1f} MB over its RSS before")
    assert got.status_code == 201, got.text
    assert got.json()["size"] == len(data) and got.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert peak - before < 9 * 1024  # less than half the file, at any moment


async def test_a_body_longer_than_its_content_length_is_never_read_whole(apis: dict[str, ApiProcess]) -> None:
    api = apis["open"]
    assert api.process is not None
    before = rss_kib(api.process.pid)
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    writer.write(b"POST /v1/emails HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n")
    sent, chunk = 0, b"x" * (256 * 1024)
    try:
        while sent < 10 * MB:
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 30)
            sent += len(chunk)
    except (ConnectionError, TimeoutError):
        pass
    try:
        answer = await asyncio.wait_for(reader.read(), 30)
    except ConnectionError:
        answer = b""  # reset: the connection is closed all the same
    writer.close()
    after = rss_kib(api.process.pid)
    print(f"\nContent-Length 10 with 10 MB behind it: the client got {sent / MB:.2f} MB out; answer {answer[:40]!r};"
          f" API RSS {(after - before) / 1024:+.1f} MB")
    assert sent < 10 * MB  # closed before it was all read
    assert answer == b"" or re.match(rb"HTTP/1\.1 4\d\d ", answer), answer[:200]
    assert after - before < 50 * 1024


async def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(apis: dict[str, ApiProcess]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", apis["open"].port)
    writer.write(b"POST /v1/emails HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 30)  # read() to the end: the API closed the connection
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and b"connection: close" in head.lower()
    assert b"larger than 4000000 bytes" in body


async def test_chunked_bodies_within_the_limit_are_read_and_over_it_are_413_with_a_key_too(apis: dict[str, ApiProcess]) -> None:
    async def chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i : i + size]

    async with http(apis["open"], headers=bearer(KEY)) as admin:
        name = f"chunked-{uuid.uuid4()}"
        made = await admin.post("/v1/users", content=chunks(f'{{"name": "{name}"}}'.encode()), headers={"Content-Type": "application/json"})
        assert made.status_code == 201 and made.json()["name"] == name, made.text
        big = b'{"name": "' + b"x" * (5 * MB) + b'"}'
        refused = await admin.post("/v1/users", content=chunks(big), headers={"Content-Type": "application/json"})
        assert refused.status_code == 413, refused.text
        assert (await admin.get("/v1/users")).status_code == 200


# --- docs -----------------------------------------------------------------------------------


async def test_docs_need_an_admin_key_when_not_public(apis: dict[str, ApiProcess], sessions: Any) -> None:
    async with http(apis["open"]) as anon:
        for path in ("/openapi.json", "/docs", "/redoc"):
            refused = await anon.get(path)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Basic"), path
        assert (await anon.get("/openapi.json", headers=bearer(await user_key(sessions)))).status_code == 403

        schema = await anon.get("/openapi.json", headers=bearer(KEY))
        assert schema.status_code == 200 and "/v1/emails" in schema.json()["paths"]
        assert "/openapi.json" not in schema.json()["paths"]
        page = await anon.get("/docs", headers=basic(KEY))  # a browser: Basic, then the same for the schema
        assert page.status_code == 200 and "/openapi.json" in page.text
        assert (await anon.get("/redoc", headers=basic(await user_key(sessions, role="admin")))).status_code == 200
        assert (await anon.get("/healthz")).status_code == 200
