"""Test helpers: waiting for what another process does, a scriptable SMTP server, the API and
workers as child processes, and email spec builders."""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import sqlalchemy as sa
import trustme
from aiosmtpd.controller import Controller
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHistory

from devstack.catcher import CatchingHandler, CaughtMessage
from devstack.net import free_port
from devstack.supervisor import api_command
from mailqueue.accounts import new_id
from mailqueue.config import Settings, settings_env
from mailqueue.contracts import Content, EmailSpec, RetrySettings, workflow_id_for
from mailqueue.domains import new_token
from mailqueue.ids import message_id_for, new_email_id
from mailqueue.models import DomainStatus, SenderDomain, SenderSettings, User, utcnow
from worker import build_worker

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

# --- waiting ----------------------------------------------------------------------------------

# Deadlines. A test waits for what the product promises, never for a guess of how fast it is:
# a check passes the moment its condition holds, so a generous deadline costs nothing when
# things work and only bounds how long a real failure takes to show. Each is the longest the
# test stacks (`fast_settings`) may take by their own bounds, with room for a busy, shared machine.
#   one email through a test stack: up to 3 attempts of at most 10 s (send_timeout_seconds)
#   with at most 1 s between them, and the steps around them.
EMAIL_SETTLES = 60.0
#   a process (uvicorn, a worker, the dev stack) coming up: imports, migrations, connecting.
PROCESS_STARTS = 90.0


async def eventually(
    probe: Callable[[], T | Awaitable[T]],
    *,
    timeout: float,
    what: str | Callable[[], str],
    progress: Callable[[], object] | None = None,
    interval: float = 0.05,
) -> T:
    """Ask `probe` (sync or async) until it answers something truthy, and return that answer.

    Fails with an AssertionError saying `what` after `timeout` seconds; with `progress`, only
    after `timeout` seconds in which `progress()` did not change (a loaded machine may be slow,
    but a stack that keeps delivering is not stuck). Never passes early.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = progress() if progress is not None else None
    while True:
        answer = probe()
        if inspect.isawaitable(answer):
            answer = await answer
        if answer:
            return answer  # type: ignore[return-value]
        now = loop.time()
        if progress is not None and (current := progress()) != seen:
            seen, deadline = current, now + timeout
        if now > deadline:
            quiet = " with no progress" if progress is not None else ""
            raise AssertionError(f"not within {timeout:g}s{quiet}: {what() if callable(what) else what}")
        await asyncio.sleep(interval)


# --- an SMTP server ---------------------------------------------------------------------------


class ScriptedHandler(CatchingHandler):
    """Catches mail like the dev catcher, but can answer DATA (or RCPT for some addresses) with
    scripted replies first. A test's script is its own: `reset()` ends it (the fixtures call it
    after every test, so a script a failing test left unused never reaches the next one)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.data_replies: deque[str] = deque()
        self.rejected_recipients: dict[str, str] = {}
        self.data_calls = 0

    def reset(self) -> None:
        self.data_replies.clear()
        self.rejected_recipients.clear()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if address in self.rejected_recipients:
            return self.rejected_recipients[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_calls += 1
        if self.data_replies:
            return self.data_replies.popleft()
        return await super().handle_DATA(server, session, envelope)


class SmtpSink:
    """A real SMTP server (aiosmtpd) on a free port."""

    def __init__(self) -> None:
        self.handler = ScriptedHandler()
        self.port = free_port()
        self._running = False

    @property
    def messages(self) -> list[CaughtMessage]:
        return self.handler.messages

    def by_message_id(self, message_id: str) -> list[CaughtMessage]:
        return [m for m in self.messages if m.message["Message-ID"] == message_id]

    async def wait_for(self, count: int, timeout: float = EMAIL_SETTLES) -> list[CaughtMessage]:
        """At least `count` messages caught (the deadline restarts with every new one)."""
        return await eventually(
            lambda: len(self.messages) >= count and self.messages, timeout=timeout, progress=lambda: len(self.messages),
            what=lambda: f"expected {count} messages, got {len(self.messages)}",
        )

    def __enter__(self) -> SmtpSink:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def down(self) -> None:
        """The server goes away: connections are refused until `up()`."""
        if self._running:
            self._controller.stop()
            self._running = False

    def up(self) -> None:
        """(Back) on its port, keeping what it caught."""
        self._controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)
        self._controller.start()
        self._running = True


# --- the API and workers as child processes ----------------------------------------------------


class ApiProcess:
    """`uvicorn api.app:app` in a child process, the way it runs in production."""

    def __init__(self, settings: Settings, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._settings = settings
        self._env = env or {}  # extra environment (OTEL_* and the like) over the settings'
        self._log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> ApiProcess:
        self._log = open(self._log_path, "wb")  # noqa: SIM115 - closed in __aexit__
        self.process = subprocess.Popen(
            api_command("127.0.0.1", self.port), env={**settings_env(self._settings), **self._env}, stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            async with httpx.AsyncClient(timeout=1) as http:

                async def healthy() -> bool:
                    assert self.process is not None and self.process.poll() is None, f"the API exited; see {self._log_path}"
                    try:
                        return (await http.get(f"{self.url}/healthz")).status_code == 200
                    except httpx.TransportError:
                        return False

                await eventually(healthy, timeout=PROCESS_STARTS, what=f"the API never answered /healthz; see {self._log_path}")
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                await asyncio.to_thread(self.process.wait, 10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


class DevStack:
    """`mailqueue dev` (what `make dev` runs) as a child process on free ports with its embedded
    defaults (SQLite, a generated key), state in `data_dir`; leaving stops it as Ctrl-C does."""

    NAMES = ("api", "temporal", "ui", "smtp", "mail", "bounce")

    def __init__(self, data_dir: Path, output: Path) -> None:
        self.data_dir, self.output = data_dir, output
        self.ports = {name: free_port() for name in self.NAMES}
        self.api = f"http://127.0.0.1:{self.ports['api']}"
        self.mail = f"http://127.0.0.1:{self.ports['mail']}"  # the catcher's page and /api/messages
        self.exit_code: int | None = None

    @property
    def printed(self) -> str:
        return self.output.read_text()

    @property
    def key(self) -> str:
        return (self.data_dir / "api.key").read_text().strip()

    async def __aenter__(self) -> DevStack:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}
        self._out = self.output.open("wb")
        ports = [arg for name in self.NAMES for arg in (f"--{name}-port", str(self.ports[name]))]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "devstack.cli", "dev", "--data-dir", str(self.data_dir), *ports],
            cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
        )

        def running() -> bool:
            assert self.process.poll() is None, self.printed
            return "mailqueue is running" in self.printed

        try:
            await eventually(running, timeout=PROCESS_STARTS, interval=0.2, what="the stack did not come up")
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        """SIGINT, as Ctrl-C; its children die with it even if it has to be killed (PR_SET_PDEATHSIG).
        It stops in stages of at most 65 s in all (devstack.supervisor._stop_all)."""
        self.process.send_signal(signal.SIGINT)
        try:
            self.exit_code = await asyncio.to_thread(self.process.wait, PROCESS_STARTS)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._out.close()


def start_worker(settings: Settings, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`python worker.py` in a child process with exactly these settings, and `env` (extra
    variables such as OTEL_*) over them (kill it to crash it)."""
    return subprocess.Popen(
        [sys.executable, "worker.py"], cwd=ROOT, env={**settings_env(settings), **(env or {})}, stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The `mailqueue` command, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "devstack.cli", *args], cwd=ROOT, env=env if env is not None else dict(os.environ),
        capture_output=True, text=True, timeout=120,
    )


# --- TLS: a private CA the process trusts, and server certificates from it ----------------------


@contextmanager
def trusted_ca(folder: Path) -> Iterator[trustme.CA]:
    """A private CA this process trusts while the block runs (SSL_CERT_FILE, read whenever a TLS
    context is made), as a company relay's would be."""
    authority = trustme.CA()
    pem = folder / "ca.pem"
    authority.cert_pem.write_to_path(str(pem))
    old = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(pem)
    try:
        yield authority
    finally:
        if old is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = old


def tls_issued_by(ca: trustme.CA, name: str) -> ssl.SSLContext:
    """A server's TLS context with a certificate for `name` issued by `ca`."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)
    return ctx


class Checked:
    """A stand-in for a driver's egress check: answers `addresses` for any host (or raises
    `refuse`), and records what it was asked."""

    def __init__(self, *addresses: str, refuse: Exception | None = None) -> None:
        self.addresses = [ipaddress.ip_address(a) for a in addresses]
        self.refuse = refuse
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[Any]:
        self.asked.append((host, port))
        if self.refuse is not None:
            raise self.refuse
        return self.addresses


# --- settings and specs -----------------------------------------------------------------------

# A fixed Fernet key for test stacks (never used outside tests).
TEST_SECRET_KEY = "bWFpbHF1ZXVlLXRlc3Qtc2VjcmV0LWtleS0wMDAwMDA="
# A fixed key for Temporal payloads in test stacks and recorded histories (mailqueue/codec.py; never used outside tests).
TEST_PAYLOAD_KEY = "bWFpbHF1ZXVlLXRlc3QtcGF5bG9hZC1rZXktMDAwMDA="
# A fixed key for unsubscribe tokens in test stacks (mailqueue/suppressions.py; never used outside tests).
TEST_UNSUBSCRIBE_KEY = "bWFpbHF1ZXVlLXRlc3QtdW5zdWJzY3JpYmUta2V5LTA="


def fast_settings(database_url: str, temporal_address: str, smtp_port: int, task_queue: str, **overrides: Any) -> Settings:
    """Settings for a test stack: short timeouts and retry intervals, a known admin key."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "temporal_address": temporal_address,
        "task_queue": task_queue,
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp_port,
        "smtp_timeout_seconds": 5,
        "retry_initial_interval_seconds": 0.2,
        "retry_maximum_interval_seconds": 1,
        "send_timeout_seconds": 10,
        "bootstrap_api_key": KEY,
        "secret_key": TEST_SECRET_KEY,
        "payload_keys": TEST_PAYLOAD_KEY,
        "unsubscribe_keys": TEST_UNSUBSCRIBE_KEY,
        "templates_dir": ROOT / "templates",
        "reconcile_interval_seconds": 0,  # the tests share one database: a reconciler would touch other tests' records
        "retention_days": 0,  # nor a purge (tests/test_retention.py turns it on where it is tested)
        # User SMTP servers and fake providers in tests listen on localhost's free ports: allowed
        # by that name only, so 127.0.0.1 in any notation (and names resolving to it) stays refused.
        "egress_allow": ["localhost"],
        "rate_limit_per_minute": 0,  # one admin key makes every request of a module; the limit has its own tests
    }
    return Settings(**(values | overrides), _env_file=None)  # type: ignore[call-arg]


async def make_sender(sessions: Any, domains: tuple[str, ...] = (), **settings: Any) -> str:
    """A user with these sender settings (driver, limits, ...) stored, and these verified sender domains; their id."""
    user_id = new_id()
    async with sessions() as s:
        s.add(User(id=user_id, name=f"sender-{user_id}"))
        await s.commit()
        s.add(SenderSettings(user_id=user_id, **settings))
        await s.commit()
    for domain in domains:
        await verify_domain(sessions, user_id, domain)
    return user_id


async def verify_domain(sessions: Any, user_id: str, domain: str) -> None:
    """`domain` verified for the user, as an admin's override leaves it: for tests not about verification."""
    async with sessions() as s:
        s.add(SenderDomain(
            id=new_id(), user_id=user_id, domain=domain, token=new_token(), status=DomainStatus.VERIFIED.value,
            verified_at=utcnow(), verified_by="admin:tests",
        ))
        await s.commit()


def make_spec(
    *,
    to: list[str] | None = None,
    send_at: datetime | None = None,
    max_attempts: int = 3,
    subject: str = "Hello",
    **kw: Any,
) -> EmailSpec:
    email_id = new_email_id()
    return EmailSpec(
        email_id=email_id,
        message_id=message_id_for(email_id, "example.com"),
        from_address="Sender <sender@example.com>",
        to=to or ["Ann <ann@example.com>"],
        content=Content(subject=subject, html="<p>Hi</p>", text="Hi"),
        send_at=send_at,
        retry=RetrySettings(
            max_attempts=max_attempts,
            initial_interval_seconds=0.2,
            backoff_coefficient=2.0,
            maximum_interval_seconds=1.0,
            send_timeout_seconds=10.0,
        ),
        **kw,
    )


# --- an API stack (uvicorn child + worker + SMTP sink) and its HTTP helpers ----------------

# The test stacks' admin key: strong enough for the API to start with it (mailqueue.accounts.weak_bootstrap_key).
KEY = "test-admin-key-5PqX8vLm2RtZ9wKc4HjN7bYd"
# A database nobody listens on (port 1 refuses at once): for outages.
UNREACHABLE_DATABASE = "postgresql+psycopg://mailqueue@127.0.0.1:1/unreachable"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Stack:
    http: httpx.AsyncClient
    sink: SmtpSink
    settings: Settings
    tmp: Path
    workers: Any = None  # the in-process worker (worker.Workers): tests reach its flag cache through it


@asynccontextmanager
async def running_stack(
    client: Client, database_url: str, temporal_address: str, dns_server: str, tmp: Path, name: str, **overrides: Any,
) -> AsyncIterator[Stack]:
    """An in-process worker and an API process on their own task queue, with their own SMTP sink and the admin
    key: the stack the API tests share (settings beyond fast_settings' come as overrides)."""
    with SmtpSink() as sink:
        settings = fast_settings(
            database_url, temporal_address, sink.port, f"{name}-{uuid.uuid4()}", bootstrap_api_key=KEY,
            dns_servers=[dns_server], **overrides,
        )
        async with (
            build_worker(client, settings) as workers,
            ApiProcess(settings, tmp / "api.log") as api,
            httpx.AsyncClient(base_url=api.url, headers=AUTH, timeout=30) as http,
        ):
            yield Stack(http, sink, settings, tmp, workers)


@contextmanager
def executed(engine: Any, containing: str = "") -> Iterator[list[str]]:
    """The SQL statements the engine runs while the block runs (those containing `containing`)."""
    seen: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if containing in statement:
            seen.append(statement)

    sa.event.listen(engine.sync_engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        sa.event.remove(engine.sync_engine, "before_cursor_execute", note)


def email(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"to": ["Ann Smith <ann@example.com>"], "subject": "Hello", "text": "Hi", "html": "<p>Hi</p>"}
    body.update(overrides)
    return body


async def post_email(http: httpx.AsyncClient, body: dict[str, Any], key: str, retried: dict[str, int] | None = None) -> httpx.Response:
    """POST /v1/emails as a real client does: with an Idempotency-Key, and again after a dropped
    connection or a 503 (Retry-After). The same key makes a retry the same email, never a second
    one. Returns the first other answer; `retried` counts what was retried, by kind."""
    for _ in range(600):
        try:
            r = await http.post("/v1/emails", json=body, headers={"Idempotency-Key": key})
        except httpx.TransportError as exc:
            kind, wait = type(exc).__name__, 0.5
        else:
            if r.status_code != 503:
                return r
            assert r.headers.get("Retry-After") and "detail" in r.json(), r.text
            kind, wait = "503", min(float(r.headers["Retry-After"]), 1.0)  # impatient, to keep tests short
        if retried is not None:
            retried[kind] = retried.get(kind, 0) + 1
        await asyncio.sleep(wait)
    raise AssertionError(f"{key} was never answered: {retried}")


async def wait_status(http: httpx.AsyncClient, email_id: str, status: str, timeout: float = EMAIL_SETTLES) -> dict[str, Any]:
    last: dict[str, Any] = {}

    async def reached() -> dict[str, Any] | None:
        last.update((await http.get(f"/v1/emails/{email_id}")).json())
        return dict(last) if last["status"] == status else None

    return await eventually(
        reached, timeout=timeout, interval=0.1,
        what=lambda: f"email {email_id} is {last.get('status')}, expected {status}: {last.get('events')}",
    )


async def delivered(sink: SmtpSink, email_id: str, timeout: float = EMAIL_SETTLES) -> list[CaughtMessage]:
    return await eventually(
        lambda: [m for m in sink.messages if email_id in str(m.message["Message-ID"])],
        timeout=timeout, what=f"email {email_id} never reached the SMTP server",
    )


async def closed_run(client: Client, email_id: str, timeout: float = EMAIL_SETTLES) -> WorkflowHistory:
    """The history of an email's workflow once its run has ended: after that, nothing of it can
    happen any more (no late send), so what did not happen by then never will."""
    handle = client.get_workflow_handle(workflow_id_for(email_id))

    async def ended() -> bool:
        return (await handle.describe()).status != WorkflowExecutionStatus.RUNNING

    await eventually(ended, timeout=timeout, interval=0.1, what=f"the workflow of email {email_id} is still running")
    return await handle.fetch_history()


def sends_scheduled(history: WorkflowHistory) -> int:
    """How many send steps a workflow run asked for (each may have several attempts)."""
    return sum(
        1 for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == "send_email"
    )


async def total_emails(http: httpx.AsyncClient) -> int:
    return (await http.get("/v1/emails", params={"page_size": 1})).json()["total"]


@dataclass
class Sender:
    """A user made through the API, with one key, a client holding it, and a verified domain."""

    id: str
    key: str
    http: httpx.AsyncClient
    domain: str

    def mail(self, **overrides: Any) -> dict[str, Any]:
        return email(**({"from": f"Sender <mail@{self.domain}>"} | overrides))


@asynccontextmanager
async def new_user(stack: Stack, sessions: Any, **fields: Any) -> AsyncIterator[Sender]:
    suffix = uuid.uuid4().hex[:10]
    made = await stack.http.post("/v1/users", json={"name": f"sender-{suffix}", **fields})
    assert made.status_code == 201, made.text
    user_id = made.json()["id"]
    issued = await stack.http.post(f"/v1/users/{user_id}/api-keys")
    assert issued.status_code == 201, issued.text
    key = issued.json()["key"]
    domain = f"sender-{suffix}.example"
    await verify_domain(sessions, user_id, domain)  # users send only from verified domains
    async with httpx.AsyncClient(base_url=str(stack.http.base_url), headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        yield Sender(user_id, key, http, domain)
