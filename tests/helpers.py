"""Test helpers: a scriptable SMTP server and email spec builders."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from aiosmtpd.controller import Controller

from mailqueue.catcher import CatchingHandler, CaughtMessage
from mailqueue.contracts import Content, EmailSpec, RetrySettings
from mailqueue.ids import message_id_for, new_email_id
from mailqueue.net import free_port


class ScriptedHandler(CatchingHandler):
    """Catches mail like the dev catcher, but can answer DATA with scripted replies first."""

    def __init__(self) -> None:
        super().__init__(None)
        self.data_replies: deque[str] = deque()
        self.rejected_recipients: dict[str, str] = {}
        self.data_calls = 0

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

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[CaughtMessage]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} messages, got {len(self.messages)} after {timeout}s")
            await asyncio.sleep(0.05)
        return self.messages

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


def settings_env(settings: Any) -> dict[str, str]:
    """MAILQUEUE_* variables that give a child process exactly these settings."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, dict | list):
            value = json.dumps(value)  # pydantic-settings reads complex values as JSON
        env[f"MAILQUEUE_{name.upper()}"] = str(value.value if hasattr(value, "value") else value)
    return env


class ApiProcess:
    """`uvicorn api.app:app` in a child process, the way it runs in production."""

    def __init__(self, settings: Any, log_path: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = settings_env(settings)
        self._log_path = log_path
        self.process: Any = None

    def __enter__(self) -> ApiProcess:
        import os
        import subprocess
        import sys

        import httpx

        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")} | self._env
        self._log = open(self._log_path, "wb")  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(self.port), "--no-access-log"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"API did not start; see {self._log_path}")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except Exception:  # noqa: BLE001
                self.process.kill()
        self._log.close()


def start_worker(settings: Any, log: Path) -> Any:
    """`python worker.py` in a child process with exactly these settings (kill it to crash it)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")} | settings_env(settings)
    root = Path(__file__).resolve().parents[1]
    return subprocess.Popen([sys.executable, "worker.py"], cwd=root, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


# A fixed Fernet key for test stacks (never used outside tests).
TEST_SECRET_KEY = "bWFpbHF1ZXVlLXRlc3Qtc2VjcmV0LWtleS0wMDAwMDA="


def fast_settings(database_url: str, temporal_address: str, smtp_port: int, task_queue: str, **overrides: Any) -> Any:
    """Settings for a test stack: short timeouts and retry intervals, a known admin key."""
    from mailqueue.config import Settings

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
        "bootstrap_api_key": "test-admin-key",
        "secret_key": TEST_SECRET_KEY,
        "templates_dir": Path(__file__).resolve().parent.parent / "templates",
        "reconcile_interval_seconds": 0,  # the tests share one database: a reconciler would touch other tests' records
    }
    return Settings(**(values | overrides), _env_file=None)


# --- an API stack (uvicorn child + worker + SMTP sink) and its HTTP helpers ----------------

KEY = "test-admin-key"
# A database nobody listens on (port 1 refuses at once): for outages.
UNREACHABLE_DATABASE = "postgresql+psycopg://mailqueue@127.0.0.1:1/unreachable"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Stack:
    http: httpx.AsyncClient
    sink: SmtpSink
    settings: Any
    tmp: Path


def email(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"to": ["Ann Smith <ann@example.com>"], "subject": "Hello", "text": "Hi", "html": "<p>Hi</p>"}
    body.update(overrides)
    return body


async def wait_status(http: httpx.AsyncClient, email_id: str, status: str, timeout: float = 15) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = (await http.get(f"/v1/emails/{email_id}")).json()
        if got["status"] == status:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"email {email_id} is {got['status']}, expected {status}: {got.get('events')}")
        await asyncio.sleep(0.1)


async def delivered(sink: SmtpSink, email_id: str, timeout: float = 15) -> list[Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (found := [m for m in sink.messages if email_id in str(m.message["Message-ID"])]):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"email {email_id} never reached the SMTP server")
        await asyncio.sleep(0.05)
    return found


async def total_emails(http: httpx.AsyncClient) -> int:
    return (await http.get("/v1/emails", params={"page_size": 1})).json()["total"]
