"""The `mailqueue` command: the embedded dev stack and operator tasks.

    mailqueue dev        Temporal dev server + worker + API + SMTP catcher, one Ctrl-C stops all
    mailqueue mail       list the mail the dev catcher caught (--show N for one message)
    mailqueue migrate    apply database migrations to MAILQUEUE_DATABASE_URL
    mailqueue worker     run a worker          mailqueue api   serve the HTTP API
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from sqlalchemy.engine import make_url

from mailqueue.net import wait_for_port

ROOT = Path(__file__).resolve().parents[1]  # where worker.py and api/ live
DEV_API_KEY = "mq-dev-key"


def _safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


class Child:
    """A child process of the dev stack, logging to its own file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        self._out = log.open("ab")
        # Own session: Ctrl-C reaches only `mailqueue dev`, which stops the children in order.
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            with self.log.open(errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except OSError:
            return ""

    def stop(self, timeout: float = 40.0) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()


class StackFailed(Exception):
    pass


def _wait_http(url: str, child: Child, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise StackFailed(child.name)
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise StackFailed(child.name)


def _wait_port(port: int, host: str, child: Child, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise StackFailed(child.name)
        try:
            wait_for_port(port, host, timeout=0.5)
            return
        except TimeoutError:
            pass
    raise StackFailed(child.name)


def dev(args: argparse.Namespace) -> int:
    from mailqueue.db import migrate
    from mailqueue.devserver import TemporalDevServer, temporal_cli

    data: Path = args.data_dir.resolve()
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    url = os.environ.get("MAILQUEUE_DATABASE_URL") or f"sqlite:///{data / 'mailqueue.db'}"
    key = os.environ.get("MAILQUEUE_BOOTSTRAP_API_KEY") or DEV_API_KEY
    host = args.host

    print(f"mailqueue dev: state in {data}, logs in {logs}", flush=True)
    print(f"  database   {_safe_url(url)} (migrating…)", flush=True)
    migrate(url)

    env = dict(os.environ) | {
        "MAILQUEUE_DATABASE_URL": url,
        "MAILQUEUE_TEMPORAL_ADDRESS": f"{host}:{args.temporal_port}",
        "MAILQUEUE_SMTP_HOST": host,
        "MAILQUEUE_SMTP_PORT": str(args.smtp_port),
        "MAILQUEUE_BOOTSTRAP_API_KEY": key,
    }
    temporal = TemporalDevServer(
        args.temporal_port, ui_port=args.ui_port, db_file=data / "temporal.db", ip=host, log_level="warn",
        output=(logs / "temporal.log").open("ab"),
    )
    children: list[Child] = []
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    code = 0
    try:
        print(f"  temporal   starting {temporal_cli()} server start-dev…", flush=True)
        temporal.start(timeout=90)
        py = sys.executable
        catcher = Child(
            "catcher",
            [py, "-m", "mailqueue.catcher", "--host", host, "--smtp-port", str(args.smtp_port),
             "--http-port", str(args.mail_port), "--dir", str(data / "mail")],
            env, logs / "catcher.log",
        )
        children.append(catcher)
        worker = Child("worker", [py, "worker.py"], env, logs / "worker.log")
        children.append(worker)
        api = Child(
            "api",
            [py, "-m", "uvicorn", "api.app:app", "--host", host, "--port", str(args.api_port), "--no-access-log"],
            env, logs / "api.log",
        )
        children.append(api)
        _wait_port(args.smtp_port, host, catcher)
        _wait_http(f"http://{host}:{args.api_port}/healthz", api)
        _banner(args, key, key_is_dev=key == DEV_API_KEY)
        while not stopping:
            for child in children:
                if not child.alive():
                    raise StackFailed(child.name)
            if temporal.process is not None and temporal.process.poll() is not None:
                raise StackFailed("temporal")
            time.sleep(0.5)
    except StackFailed as failed:
        if not stopping:
            name = str(failed)
            print(f"\n{name} stopped unexpectedly. Last lines of its log:", file=sys.stderr)
            child = next((c for c in children if c.name == name), None)
            print(child.tail() if child else (logs / "temporal.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            code = 1
    except TimeoutError as exc:
        print(f"\ncould not start: {exc}", file=sys.stderr)
        code = 1
    finally:
        print("\nstopping…", flush=True)
        for child in reversed(children):
            child.stop()
        temporal.stop()
        print("stopped", flush=True)
    return code


def _banner(args: argparse.Namespace, key: str, *, key_is_dev: bool) -> None:
    h = args.host
    api = f"http://{h}:{args.api_port}"
    print(
        f"""
mailqueue is running (Ctrl-C stops everything)

  API            {api}          docs: {api}/docs
  Temporal UI    http://{h}:{args.ui_port}     (each email is a workflow: email-<id>)
  Caught mail    http://{h}:{args.mail_port}     or: .venv/bin/mailqueue mail --data-dir {args.data_dir}
  SMTP catcher   {h}:{args.smtp_port}          Temporal gRPC: {h}:{args.temporal_port}
  API key        {key}{"   (a development key: set MAILQUEUE_BOOTSTRAP_API_KEY for your own)" if key_is_dev else ""}

Send a first email:

  curl -s -X POST {api}/v1/emails -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
    -d '{{"to":["ann@example.com"],"subject":"Hello","text":"It works"}}'
""",
        flush=True,
    )


def mail(args: argparse.Namespace) -> int:
    from mailqueue.catcher import load_directory

    folder = args.data_dir / "mail"
    messages = load_directory(folder) if folder.is_dir() else []
    if args.show is not None:
        if not 0 <= args.show < len(messages):
            print(f"no message {args.show}: {len(messages)} caught", file=sys.stderr)
            return 1
        sys.stdout.write(messages[args.show].data.decode("utf-8", "replace"))
        return 0
    if not messages:
        print(f"no mail caught yet (the dev catcher keeps it in {folder})")
        return 0
    for i, m in enumerate(messages):
        msg = m.message
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.received_at))
        print(f"{i:4d}  {when}  from {msg['From']}  to {msg['To']}  {msg['Subject']!r}")
    print(f"{len(messages)} message(s); show one with: mailqueue mail --show N")
    return 0


def migrate_cmd(args: argparse.Namespace) -> int:
    from mailqueue.config import get_settings
    from mailqueue.db import migrate

    url = get_settings().database_url
    print(f"migrating {_safe_url(url)} to the latest schema")
    migrate(url)
    print("done")
    return 0


def worker_cmd(args: argparse.Namespace) -> int:
    import asyncio

    sys.path.insert(0, str(ROOT))
    import worker

    asyncio.run(worker.main())
    return 0


def api_cmd(args: argparse.Namespace) -> int:
    import uvicorn

    sys.path.insert(0, str(ROOT))
    uvicorn.run("api.app:app", host=args.host, port=args.port)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mailqueue", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dev", help="run the embedded stack: Temporal, worker, API, SMTP catcher")
    p.add_argument("--data-dir", type=Path, default=Path(".mailqueue"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--api-port", type=int, default=8000)
    p.add_argument("--temporal-port", type=int, default=7233)
    p.add_argument("--ui-port", type=int, default=8233)
    p.add_argument("--smtp-port", type=int, default=1025)
    p.add_argument("--mail-port", type=int, default=8025, help="the caught-mail page")
    p.set_defaults(func=dev)

    p = sub.add_parser("mail", help="list mail caught by the dev stack")
    p.add_argument("--data-dir", type=Path, default=Path(".mailqueue"))
    p.add_argument("--show", type=int, default=None, metavar="N", help="print message N in full")
    p.set_defaults(func=mail)

    p = sub.add_parser("migrate", help="apply database migrations")
    p.set_defaults(func=migrate_cmd)
    p = sub.add_parser("worker", help="run a worker (same as python worker.py)")
    p.set_defaults(func=worker_cmd)
    p = sub.add_parser("api", help="serve the HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=api_cmd)

    args = parser.parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
