"""`mailqueue dev`: the embedded stack (Temporal dev server, SMTP catcher, worker, API) as child
processes of one command, started in order, watched, and stopped in order on Ctrl-C."""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import IO, TYPE_CHECKING

from pydantic import SecretStr
from sqlalchemy.engine import make_url

from devstack.devserver import TemporalDevServer, temporal_cli
from devstack.net import wait_for_port
from mailqueue.config import HTTP_KEEP_ALIVE_SECONDS, Settings, settings_env
from mailqueue.crypto import key_file
from mailqueue.db import migrate

if TYPE_CHECKING:
    from mailqueue.template_library import ReloadResult

ROOT = Path(__file__).resolve().parents[1]  # where worker.py and api/ live
# The admin key of `make dev` unless MAILQUEUE_BOOTSTRAP_API_KEY is set: generated once into the
# data folder (readable by its owner only) and printed in the banner. Never a fixed, published
# key: the API refuses weak ones, and a web page can reach 127.0.0.1 (DNS rebinding) with a key
# it can guess.
DEV_API_KEY_FILE = "api.key"
DEV_BOUNCE_DOMAIN = "bounces.localhost"  # `make dev`'s bounce domain (RFC 6761: .localhost never leaves the machine)


def dev_api_key(data: Path) -> str:
    """The dev stack's admin key, kept in `data`/api.key (made the first time)."""
    return key_file(data / DEV_API_KEY_FILE, lambda: "mq-dev-" + secrets.token_urlsafe(32))[0]


def safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _die_with_parent() -> None:
    """In the child, before exec (Linux): get SIGTERM if `mailqueue dev` itself dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort; the normal exit paths stop children anyway
        pass


class Child:
    """A child process of the dev stack, logging to its own file."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], log: Path, out: IO[bytes] | None = None
    ) -> None:
        self.name, self.log = name, log
        self._out = out or log.open("ab")
        # Own session: Ctrl-C reaches only `mailqueue dev`, which stops the children in order.
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            with self.log.open(errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except OSError:
            return ""

    def terminate(self) -> None:
        if self.alive():
            self.process.terminate()

    def wait(self, timeout: float) -> None:
        """Wait for the child to exit; kill it after `timeout` seconds."""
        try:
            self.process.wait(max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            print(f"  {self.name} did not stop in time: killing it", flush=True)
            self.process.kill()
            self.process.wait()
        self._out.close()


class StackFailed(Exception):
    """A child of the dev stack exited (or never became ready)."""

    def __init__(self, child: Child, why: str) -> None:
        super().__init__(child.name)
        self.child, self.why = child, why


class Interrupted(Exception):
    """Ctrl-C or SIGTERM while the stack was starting."""


class _Stop:
    requested = False

    def __call__(self, *_: object) -> None:
        self.requested = True


def _check(children: list[Child], stop: _Stop, starting: bool = False) -> None:
    if stop.requested:
        raise Interrupted
    for child in children:
        code = child.process.poll()
        if code is not None:
            raise StackFailed(child, f"exited with code {code}" + (" during start-up" if starting else ""))


def _wait_port(port: int, host: str, child: Child, children: list[Child], stop: _Stop, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        _check(children, stop, starting=True)
        try:
            wait_for_port(port, host, timeout=0.2)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise StackFailed(child, f"did not listen on {host}:{port} within {timeout:.0f} s") from None


def _wait_http(url: str, child: Child, children: list[Child], stop: _Stop, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    status = "no answer"
    while True:
        _check(children, stop, starting=True)
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return
            status = f"HTTP {response.status_code}"
        except httpx.TransportError as exc:
            status = type(exc).__name__
        if time.monotonic() > deadline:
            raise StackFailed(child, f"{url} did not answer 200 within {timeout:.0f} s (last: {status})")
        time.sleep(0.2)


def _ports_in_use(host: str, ports: dict[str, int]) -> list[str]:
    """The --xxx-port options whose port something else already listens on."""
    busy = []
    for option, port in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is fine
            try:
                s.bind((host, port))
            except OSError:
                busy.append(f"{option} {port}")
    return busy


def make_variable(option: str) -> str:
    """The variable `make dev` takes for an option of `mailqueue dev` (the Makefile's DEV_OPTIONS): --api-port → API_PORT."""
    return option.removeprefix("--").replace("-", "_").upper()


def client_host_for(host: str) -> str:
    """Where the children reach a server bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def mail_command(data_dir: Path) -> str:
    script = Path(sys.executable).parent / "mailqueue"
    found = shutil.which("mailqueue")
    cmd = "mailqueue" if found and Path(found).resolve() == script.resolve() else os.path.relpath(script)
    return cmd + " mail" + ("" if data_dir == Path(".mailqueue") else f" --data-dir {data_dir}")


def codec_endpoint(args: argparse.Namespace) -> str:
    """Where the Temporal UI (in the browser) decodes payloads: the API's /codec (api/routes/codec.py)."""
    return f"http://{client_host_for(args.host)}:{args.api_port}/codec"


def dev_settings(args: argparse.Namespace, configured: Settings) -> Settings:
    """The children's settings: the user's own (MAILQUEUE_*, .env), with the stack's ports, a
    database and a secret key file in the data folder unless configured, and the dev API key.
    Temporal payloads are encrypted with a key kept next to the secret key, and the dev UI's origin
    may call the API's /codec."""
    data: Path = args.data_dir.resolve()
    client_host = client_host_for(args.host)
    given = configured.model_fields_set
    update: dict[str, object] = {
        "templates_dir": templates_dir(configured),
        "temporal_address": f"{client_host}:{args.temporal_port}",
        "smtp_host": client_host,
        "smtp_port": args.smtp_port,
    }
    if "database_url" not in given:
        update["database_url"] = f"sqlite:///{data / 'mailqueue.db'}"
    if configured.bootstrap_api_key is None:
        update["bootstrap_api_key"] = SecretStr(dev_api_key(data))
    if "secret_key_file" not in given:
        # Sender secrets: MAILQUEUE_SECRET_KEY if set, else a key generated once into the data folder.
        update["secret_key_file"] = data / "secret.key"
    if "payload_key_file" not in given:
        # Temporal payloads: MAILQUEUE_PAYLOAD_KEYS if set, else a key generated once into the data folder
        # and shared by the API and the worker, as the secret key is.
        update["payload_key_file"] = data / "payload.key"
    if "unsubscribe_key_file" not in given:
        # Unsubscribe tokens: MAILQUEUE_UNSUBSCRIBE_KEYS if set, else a key generated once into the data folder.
        update["unsubscribe_key_file"] = data / "unsubscribe.key"
    if "public_url" not in given:
        update["public_url"] = f"http://{client_host}:{args.api_port}"  # where List-Unsubscribe links point
    if "codec_cors_origins" not in given:
        update["codec_cors_origins"] = sorted({f"http://{client_host}:{args.ui_port}", f"http://localhost:{args.ui_port}"})
    if "require_verified_from" not in given:
        update["require_verified_from"] = False  # users of a development stack send from any domain (the API warns)
    # The bounce listener (mailqueue bounces) on the stack's host and --bounce-port; a bounce domain of
    # its own unless configured, so that sends carry VERP senders and unsubscribe mailtos to try out.
    # (Callers that build the options by hand may leave --bounce-port out: the configured port then.)
    update["bounce_host"], update["bounce_port"] = args.host, getattr(args, "bounce_port", configured.bounce_port)
    if "bounce_domain" not in given:
        update["bounce_domain"] = DEV_BOUNCE_DOMAIN
    if "egress_allow" not in given:
        # A user's SMTP settings may name this machine's catcher (smtp_host "localhost", any port):
        # that name only; 127.0.0.1 in any notation and other local names stay refused, as in production.
        update["egress_allow"] = ["localhost"]
    if "webhook_allow_private" not in given:
        update["webhook_allow_private"] = True  # webhooks to a receiver on this machine (http://localhost:<port>/...)
    return configured.model_copy(update=update)


def dev(args: argparse.Namespace, configured: Settings) -> int:
    stop = _Stop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)

    data: Path = args.data_dir.resolve()
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    settings = dev_settings(args, configured)
    url = settings.database_url
    assert settings.bootstrap_api_key is not None
    key = settings.bootstrap_api_key.get_secret_value()
    host, client_host = args.host, client_host_for(args.host)
    ports = {
        "--api-port": args.api_port, "--temporal-port": args.temporal_port, "--ui-port": args.ui_port,
        "--smtp-port": args.smtp_port, "--mail-port": args.mail_port, "--bounce-port": args.bounce_port,
    }
    if len(set(ports.values())) != len(ports):
        print(f"mailqueue dev: the ports must differ: {ports}", file=sys.stderr)
        return 2
    if busy := _ports_in_use(host, ports):
        print(
            f"mailqueue dev: already in use on {host}: {', '.join(busy)}.\n"
            "  Is another `mailqueue dev` running? Stop it, or choose other ports with the options above\n"
            f"  (with make: make dev {' '.join(make_variable(b.split()[0]) + '=…' for b in busy)}).",
            file=sys.stderr,
        )
        return 1
    try:
        temporal_bin = temporal_cli()
    except FileNotFoundError as exc:
        print(f"mailqueue dev: {exc}", file=sys.stderr)
        return 1

    print(f"mailqueue dev: state in {data}, logs in {logs}", flush=True)
    print(f"  database   {safe_url(url)} (migrating…)", flush=True)
    try:
        migrate(url)
    except Exception as exc:  # noqa: BLE001 - reported to the user, nothing is running yet
        print(f"mailqueue dev: database migration failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"  templates  {settings.templates_dir}", flush=True)
    print_reload(load_templates(url, settings.templates_dir), indent="             ")
    if stop.requested:
        return 0

    env = settings_env(settings)
    temporal_log = logs / "temporal.log"
    temporal_out = temporal_log.open("ab")
    temporal = TemporalDevServer(
        args.temporal_port, ui_port=args.ui_port, ui_codec_endpoint=codec_endpoint(args), db_file=data / "temporal.db",
        ip=host, log_level="warn", output=temporal_out,
    )
    children: list[Child] = []
    code = 0
    try:
        print(f"  temporal   starting {temporal_bin} server start-dev…", flush=True)
        # Started as a Child (not TemporalDevServer.start) so that a dying server or a Ctrl-C is
        # noticed while waiting; TemporalDevServer.stop stops it as usual.
        tchild = Child("temporal", temporal.command(), dict(os.environ), temporal_log, temporal_out)
        temporal.process = tchild.process
        children.append(tchild)
        _wait_port(args.temporal_port, client_host, tchild, children, stop, timeout=90)

        py = sys.executable
        catcher = Child(
            "catcher",
            [py, "-m", "devstack.catcher", "--host", host, "--smtp-port", str(args.smtp_port),
             "--http-port", str(args.mail_port), "--dir", str(data / "mail")],
            env, logs / "catcher.log",
        )
        children.append(catcher)
        worker = Child("worker", [py, "worker.py"], env, logs / "worker.log")
        children.append(worker)
        api = Child("api", api_command(host, args.api_port), env, logs / "api.log")
        children.append(api)
        bounces = Child("bounces", [py, "-m", "devstack.cli", "bounces"], env, logs / "bounces.log")
        children.append(bounces)
        _wait_port(args.smtp_port, client_host, catcher, children, stop)
        _wait_port(args.mail_port, client_host, catcher, children, stop)
        _wait_port(args.bounce_port, client_host, bounces, children, stop)
        _wait_port(args.ui_port, client_host, tchild, children, stop)
        _wait_http(f"http://{client_host}:{args.api_port}/healthz", api, children, stop, timeout=60)
        _banner(args, key, key_is_dev=configured.bootstrap_api_key is None, bounce_domain=settings.bounce_domain)
        while True:
            _check(children, stop)
            time.sleep(0.3)
    except Interrupted:
        pass
    except StackFailed as failed:
        code = 1
        if not stop.requested:
            child = failed.child
            print(f"\nmailqueue dev: {child.name} {failed.why}. Last lines of {child.log}:", file=sys.stderr)
            print(child.tail(20).rstrip("\n") or "  (empty)", file=sys.stderr, flush=True)
    finally:
        print("\nstopping…", flush=True)
        _stop_all(children, temporal)
        print("stopped", flush=True)
    return code


def _stop_all(children: list[Child], temporal: TemporalDevServer) -> None:
    """API and worker first (the worker lets sends in flight finish), then the catcher, then Temporal."""
    by_name = {c.name: c for c in children}
    stages = [["api", "worker", "bounces"], ["catcher"], ["temporal"]]
    for stage, timeout in zip(stages, (40.0, 10.0, 15.0), strict=True):
        group = [by_name[n] for n in stage if n in by_name]
        for child in group:
            if child.name == "temporal":
                temporal.stop(timeout)
            else:
                child.terminate()
        deadline = time.monotonic() + timeout
        for child in group:
            child.wait(deadline - time.monotonic())


def _banner(args: argparse.Namespace, key: str, *, key_is_dev: bool, bounce_domain: str | None = None) -> None:
    h = client_host_for(args.host)
    api = f"http://{h}:{args.api_port}"
    key_path = args.data_dir / DEV_API_KEY_FILE
    dev_note = (
        f"\n                 (a development key, kept in {key_path}: KEY=$(cat {key_path}); set MAILQUEUE_BOOTSTRAP_API_KEY to use your own)"
        if key_is_dev else ""
    )
    print(
        f"""
mailqueue is running (Ctrl-C stops everything)

  API            {api}     docs: {api}/docs
  GraphQL        {api}/graphql     (GraphiQL in a browser; subscriptions: ws://{h}:{args.api_port}/graphql)
  Temporal UI    http://{h}:{args.ui_port}     (each email is a workflow; its data is encrypted)
                 to read it there: open {api}/codec once in that browser (user: anything, password: the
                 API key), then turn on "include cross-origin credentials" in the UI's codec server settings
  Caught mail    http://{h}:{args.mail_port}     or run: {mail_command(args.data_dir)}
  SMTP catcher   {h}:{args.smtp_port}     Temporal gRPC: {h}:{args.temporal_port}
  Bounces (SMTP) {h}:{args.bounce_port}     mail to bounce+<email id>@{bounce_domain}, unsubscribe+<email id>@{bounce_domain}
  API key        {key}{dev_note}
  Templates      {api}/v1/templates     preview one in a browser (user: anything, password: the API key):
                 {api}/v1/templates/StockIssueApproved/preview
  Logs           {args.data_dir / "logs"}

Send a first email:

  curl -s -X POST {api}/v1/emails -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{{"to":["ann@example.com"],"subject":"Hello","text":"It works"}}'

and one from a template, in German:

  curl -s -X POST {api}/v1/emails -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{{"to":["ann@example.com"],"template":"PasswordReset","locale":"de","template_data":{{"UserName":"Ann","ResetUrl":"https://example.com/reset/1","ExpiresInMinutes":30}}}}'
""",
        flush=True,
    )


def api_command(host: str, port: int) -> list[str]:
    """The API under uvicorn, as production runs it (Dockerfile, compose): for the stack, the tests and the benchmark."""
    return [
        sys.executable, "-m", "uvicorn", "api.app:app", "--host", host, "--port", str(port), "--no-access-log",
        "--timeout-keep-alive", str(HTTP_KEEP_ALIVE_SECONDS),
    ]


def templates_dir(configured: Settings) -> Path:
    """MAILQUEUE_TEMPLATES_DIR, else ./templates, else the templates shipped next to the code."""
    if "templates_dir" in configured.model_fields_set:
        return configured.templates_dir.resolve()
    here = Path("templates")
    return here.resolve() if here.is_dir() else ROOT / "templates"


def load_templates(url: str, directory: Path) -> ReloadResult:
    """Load a templates folder into the database at `url` (see mailqueue.template_library)."""
    import asyncio

    from mailqueue.db import create_engine, sessionmaker
    from mailqueue.template_library import reload_folder
    from mailqueue.templating import TemplateEngine

    async def run() -> ReloadResult:
        engine = create_engine(url)
        try:
            async with sessionmaker(engine)() as session:
                return await reload_folder(session, TemplateEngine(), directory, created_by="cli")
        finally:
            await engine.dispose()

    return asyncio.run(run())


def print_reload(result: ReloadResult, indent: str = "") -> None:
    if result.problems:
        print(f"{indent}not loaded, {len(result.problems)} problem(s); nothing was saved:", file=sys.stderr)
        for problem in result.problems:
            print(f"{indent}  {problem}", file=sys.stderr)
        return
    new = ", ".join(f"{p.name}" + (f"/{p.locale}" if p.locale else "") + f" v{p.version}" for p in result.created)
    print(f"{indent}{len(result.created) + len(result.unchanged)} loaded: {len(result.created)} new version(s)" + (f" ({new})" if new else ""), flush=True)
