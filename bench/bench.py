"""mailqueue benchmark: the embedded stack against a local SMTP sink.

    .venv/bin/python bench/bench.py [--emails 1000] [--clients 50] [--rate 20] [--steady-seconds 30]
                                    [--workers 1] [--database-url URL] [--json-out FILE]
                                    [--template StockIssueApproved [--template-items 50]]
                                    [--render-only] [--render-seconds 5] [--scheduled 200]
                                    [--telemetry] [--ab telemetry|search-attributes|webhooks|attachment [--pairs 2]]
                                    [--phases AEBCD] [--floor | --floor-only]

Starts its own stack on free ports in a temporary directory (Temporal dev server persisted
to a file with WAL, SQLite unless --database-url, N workers, the API under uvicorn, a sink
process) and measures:
  A. POST latency and queue lag (POST -> SMTP accept) at a steady request rate;
  B. end-to-end throughput: N emails posted by C concurrent clients, first POST -> last
     message received, with a count of missing and duplicated deliveries;
  C. the raw-SMTP ceiling: aiosmtplib straight to the same sink;
  E. scheduled sends: 200 emails due at the same second (posted ~15 s ahead), each one's
     lateness = SMTP acceptance at the sink - the due second (and how many went early: must be 0);
  D. template rendering in one process: StockIssueApproved (layout, header, footer) with
     50 items, compiled templates cached; full renders (Jinja + CSS inlining + text part)
     and the Jinja step alone. `--render-only` runs just D.

`--telemetry` runs the stack with tracing (OTLP to a receiver in this process) and metrics (the
API's /metrics and the worker's endpoint) on. `--ab telemetry` runs only B, `--pairs` times with
telemetry off and as many on (scraped every 5 s), alternating, a new stack each time, and reports
end-to-end emails/s and the CPU per email of every process of the stack; `--ab search-attributes`
the same with MAILQUEUE_SEARCH_ATTRIBUTES false and true; `--ab webhooks` with no webhook endpoint and
with one (the bootstrap key's: every event) whose receiver takes 5 s per call; `--ab attachment`
with raw emails and with the same emails carrying a 1 MB PDF each (base64 in the POST).

`--floor` runs, right after B on the same dev server and sink, the bare workflow-per-email shape of
bench/floor.py (three no-op local audit steps, one send over pooled SMTP connections, no database),
started by as many client tasks calling start_workflow, its worker a process of its own. Both print
emails/s and CPU-seconds per email for each process (/proc; PostgreSQL's backends serving the bench
database too, when used), and the ratios project / floor: the figures to optimise and to quote.
`--floor-only` starts only the dev server, the sink and the floor's worker. `--phases` picks phases
(e.g. `--phases B --floor`). Before each phase: the machine's steal time (1 s sample) and load.
The results go to --json-out and to bench/results/<commit>[-dirty]-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from email.message import EmailMessage
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the tests' receivers (OTLP, webhooks): `python bench/bench.py` puts bench/ first
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(1, str(ROOT / "bench"))  # floor.py, however this file was started

KEY = "bench-admin-key-Vq7Lz3Xw9Rk2Tn6Hc8Jm4Fp"  # strong enough for the API to start (mailqueue.accounts)
BODY = {"to": ["bench@example.com"], "subject": "bench", "text": "hello"}
# --ab attachment: a 1 MB "PDF", the same bytes on every email (each email stores its own copy)
ATTACHMENT = {"filename": "report.pdf", "content_type": "application/pdf",
              "content": base64.b64encode(b"%PDF-1.7\n" + random.Random(1).randbytes(1024 * 1024)).decode()}
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*<([^@>]+)@", re.IGNORECASE | re.MULTILINE)


# --- the sink: a separate process, so it does not share a CPU core's time with the load ---------


def run_sink(port: int, log: Path) -> None:
    from aiosmtpd.controller import Controller

    out = log.open("a", buffering=1)

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            match = _MESSAGE_ID.search(envelope.content)
            out.write(f"{match.group(1).decode() if match else '-'}\t{time.time():.6f}\n")
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    controller.stop()


def slow_receiver(delay: float) -> Any:
    """The tests' webhook receiver (Standard Webhooks verification), holding every call `delay` seconds
    before its 200 (--ab webhooks)."""
    from tests.webhook_receiver import WebhookReceiver

    receiver = WebhookReceiver()
    receiver.delay = delay
    receiver.up()
    return receiver


def read_sink(log: Path) -> list[tuple[str, float]]:
    rows = []
    for line in log.read_text().splitlines():
        mid, _, at = line.partition("\t")
        if at:
            rows.append((mid, float(at)))
    return rows


# --- the stack ------------------------------------------------------------------------------------


def proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds so far) of every process, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


class Stack:
    def __init__(self, tmp: Path, database_url: str, workers: int, telemetry: bool = False, **env: str) -> None:
        from devstack.devserver import TemporalDevServer
        from devstack.net import free_port

        self.tmp, self.database_url = tmp, database_url
        self.telemetry, self.extra_env = telemetry, env
        self.receiver: Any = None
        self.worker_metrics_ports = [free_port() for _ in range(workers)] if telemetry else []
        self.sink_port, self.api_port = free_port(), free_port()
        self.sink_log = tmp / "sink.tsv"
        self.sink_log.touch()
        self.temporal = TemporalDevServer(free_port(), db_file=tmp / "temporal.db", log_level="error")
        self.workers = workers
        self.children: list[subprocess.Popen[bytes]] = []
        self.names: dict[int, str] = {}  # pid -> which process it is (api, worker-0, sink, floor-worker)
        # PostgreSQL's backends serving this database are the stack's too (a server on this machine: /proc)
        self.pg_database = database_url.rsplit("/", 1)[1].split("?")[0] if database_url.startswith("postgresql") else None
        from mailqueue.codec import new_payload_key

        self.payload_keys = new_payload_key()  # one for the API and every worker: payloads encrypted as in production

    def env(self) -> dict[str, str]:
        from mailqueue.config import Settings, settings_env

        env = settings_env(Settings(
            database_url=self.database_url, temporal_address=self.temporal.address, task_queue="bench",
            smtp_host="127.0.0.1", smtp_port=self.sink_port, bootstrap_api_key=KEY, log_level="WARNING",
            templates_dir=ROOT / "templates", payload_keys=self.payload_keys, _env_file=None,  # type: ignore[call-arg]
            # One key makes every request here: the per-key rate limit (300 a minute by default)
            # would measure itself. Its cost per request is measured in tests/test_door_limits.py.
            rate_limit_per_minute=0,
        ))
        if self.receiver is not None:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.receiver.endpoint
        return env | self.extra_env

    def _spawn(self, name: str, args: list[str], **extra: str) -> None:
        log = (self.tmp / f"{name}.log").open("ab")
        env = self.env() | extra
        self.children.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        self.names[self.children[-1].pid] = name

    def start(self, product: bool = True) -> None:
        """`product` False: only the dev server and the sink (--floor-only)."""
        from devstack.net import wait_for_port
        from devstack.supervisor import api_command

        if self.telemetry:
            from tests.otlp_receiver import OtlpReceiver

            self.receiver = OtlpReceiver(keep=False).start()  # counts spans, keeps none
        self.temporal.start()
        py = sys.executable
        self._spawn("sink", [py, __file__, "--sink", str(self.sink_port), str(self.sink_log)])
        if not product:
            wait_for_port(self.sink_port)
            return
        for i in range(self.workers):
            ports = {"MAILQUEUE_WORKER_METRICS_PORT": str(self.worker_metrics_ports[i])} if self.telemetry else {}
            self._spawn(f"worker-{i}", [py, "worker.py"], **ports)
        self._spawn("api", [*api_command("127.0.0.1", self.api_port), "--log-level", "warning"])
        wait_for_port(self.sink_port)
        wait_for_port(self.api_port, timeout=60)

    def start_floor(self) -> None:
        """The floor's worker (bench/floor.py), a process of its own on the same dev server and sink."""
        from floor import TASK_QUEUE

        self._spawn("floor-worker", [sys.executable, str(ROOT / "bench" / "floor.py"), "--temporal", self.temporal.address,
                                     "--task-queue", TASK_QUEUE, "--smtp-port", str(self.sink_port)])

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.poll() is None:
                child.terminate()
        for child in self.children:
            try:
                child.wait(45)
            except subprocess.TimeoutExpired:
                child.kill()
        self.temporal.stop()
        if self.receiver is not None:
            self.receiver.stop()

    def metrics_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.api_port}/metrics", *(f"http://127.0.0.1:{p}/metrics" for p in self.worker_metrics_ports)]

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU so far of every process of the stack, by what it is (temporal, api,
        worker, sink), read from /proc: each child with all its descendants (a worker's render
        processes count as the worker's)."""
        totals: Counter[str] = Counter()
        for name, seconds in self.cpu_snapshot().values():
            totals[name.split("-")[0]] += seconds
        return dict(totals)

    def cpu_snapshot(self) -> dict[int, tuple[str, float]]:
        """pid -> (which process it belongs to, its user + system CPU so far) for every process of the
        stack and their descendants, and PostgreSQL's backends serving the bench database ("postgres")."""
        roots = dict(self.names)
        if self.temporal.process is not None:
            roots[self.temporal.process.pid] = "temporal"
        stats = proc_table()
        owner = {pid: name for pid, name in roots.items() if pid in stats}
        grew = True
        while grew:
            more = {pid: owner[parent] for pid, (parent, _) in stats.items() if parent in owner and pid not in owner}
            owner |= more
            grew = bool(more)
        snapshot = {pid: (name, stats[pid][1]) for pid, name in owner.items()}
        for pid in self.pg_backends():
            if pid in stats:
                snapshot[pid] = ("postgres", stats[pid][1])
        return snapshot

    def pg_backends(self) -> list[int]:
        """The pids of the backends connected to the bench database (none on SQLite)."""
        if self.pg_database is None:
            return []
        import psycopg

        with psycopg.connect(self.database_url, autocommit=True) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                                (self.pg_database,)).fetchall()
        return [pid for (pid,) in rows]

    def cpu_used(self, since: dict[int, tuple[str, float]], each: bool = True) -> dict[str, float]:
        """CPU-seconds used since the snapshot `since`, by process (worker-0, worker-1, …) or, `each`
        False, by kind (worker). Counted per pid: a process begun since counts whole; one ended since
        is lost (its last seconds: a backend that disconnects mid-phase, none of the stack's)."""
        used: Counter[str] = Counter()
        for pid, (name, seconds) in self.cpu_snapshot().items():
            before = since.get(pid)
            used[name if each else name.split("-")[0]] += seconds - (before[1] if before and before[0] == name else 0.0)
        return {name: round(seconds, 2) for name, seconds in sorted(used.items())}


def api_client(stack: Stack, clients: int) -> Any:
    """The load's HTTP client: the admin key, a connection for each concurrent client."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.api_port}", headers={"Authorization": f"Bearer {KEY}"},
                             timeout=60, limits=limits)


async def scrape(http: Any, stack: Stack, every: float, counts: Counter[str]) -> None:
    """What Prometheus would do (every 15 s by default; here more often): GET each /metrics."""
    while True:
        for url in stack.metrics_urls():
            try:
                resp = await http.get(url)
                counts["ok" if resp.status_code == 200 else str(resp.status_code)] += 1
            except Exception as exc:  # noqa: BLE001 - counted, not fatal
                counts[type(exc).__name__] += 1
        await asyncio.sleep(every)


async def ab(args: argparse.Namespace) -> dict[str, Any]:
    """B alone, the feature off and on in turn, each on a new stack: emails/s and CPU per email."""

    global BODY
    plain = BODY
    runs: list[dict[str, Any]] = []
    for i in range(args.pairs * 2):
        on = i % 2 == 1
        # --ab attachment: every email carries a 1 MB PDF (base64 in the request: stored as a blob, read by the send)
        BODY = {**plain, "attachments": [ATTACHMENT]} if on and args.ab == "attachment" else plain
        telemetry = on and args.ab == "telemetry"
        env = {"MAILQUEUE_SEARCH_ATTRIBUTES": "false"} if args.ab == "search-attributes" and not on else {}
        hooked = on and args.ab == "webhooks"
        if hooked:
            env["MAILQUEUE_WEBHOOK_ALLOW_PRIVATE"] = "true"  # the receiver listens on 127.0.0.1
        receiver = slow_receiver(5.0) if hooked else None
        tmp = Path(tempfile.mkdtemp(prefix="mailqueue-bench-"))
        url, drop = prepare_database(args.database_url, tmp)
        stack = Stack(tmp, url, args.workers, telemetry=telemetry, **env)
        scrapes: Counter[str] = Counter()
        try:
            print(f"run {i + 1}: {args.ab} {'on' if on else 'off'} ({tmp})", flush=True)
            stack.start()
            async with api_client(stack, args.clients) as http:
                await warm_up(stack, http)
                if receiver is not None:  # the bootstrap key's endpoint: every event of every email
                    made = await http.post("/v1/webhooks", json={"url": receiver.url})
                    assert made.status_code == 201, made.text
                    receiver.secret = made.json()["secret"]  # it verifies every call, as a real receiver does
                scraper = asyncio.create_task(scrape(http, stack, 5.0, scrapes)) if telemetry else None
                cpu0 = stack.cpu_snapshot()
                result = await throughput(stack, http, args.emails, args.clients)
                by_process = {name: round(seconds, 1) for name, seconds in stack.cpu_used(cpu0, each=False).items()}
                cpu = sum(by_process.values())
                if scraper is not None:
                    scraper.cancel()
            result.update(
                feature=args.ab, on=on, telemetry=telemetry, cpu_seconds=round(cpu, 1), cpu_by_process=by_process, cpu_ms_per_email=round(cpu * 1000 / max(result["delivered"], 1), 1),
                spans=stack.receiver.count if stack.receiver is not None else 0, scrapes=dict(scrapes),
                webhook_calls=receiver.calls if receiver is not None else None,
                webhook_verified=len(receiver.verified()) if receiver is not None else None,
            )
            print("   " + ab_line(result), flush=True)
            runs.append(result)
        finally:
            stack.stop()
            drop()
            if receiver is not None:
                receiver.down()
    return {"machine": machine(), "emails": args.emails, "clients": args.clients, "runs": runs}


def ab_line(r: dict[str, Any]) -> str:
    return (
        f"{r['feature']} {'on ' if r['on'] else 'off'}: {r['emails_per_s']} emails/s, {r['cpu_ms_per_email']} ms CPU per email "
        f"({r['cpu_seconds']} s: {', '.join(f'{k} {v}' for k, v in sorted(r['cpu_by_process'].items()))}), delivered {r['delivered']}, missing {r['missing']}, errors {r['errors'] or 0}"
        + (f"; {r['spans']} spans exported, scrapes {r['scrapes']}" if r["telemetry"] else "")
        + (f"; webhook calls received (5 s each) {r['webhook_calls']}" if r.get("webhook_calls") is not None else "")
    )


# --- measurements ------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def ms(values: list[float]) -> dict[str, float]:
    return {k: round(v * 1000, 1) for k, v in (
        ("p50", pct(values, 50)), ("p90", pct(values, 90)), ("p99", pct(values, 99)), ("max", max(values, default=float("nan"))),
    )}


async def post(http: Any, sent: dict[str, float], latencies: list[float], errors: Counter[str]) -> None:
    t0 = time.time()
    try:
        resp = await http.post("/v1/emails", json=BODY)
    except Exception as exc:  # noqa: BLE001 - a benchmark counts failures, it does not stop on them
        errors[type(exc).__name__] += 1
        return
    latencies.append(time.time() - t0)
    if resp.status_code == 202:
        sent[resp.json()["id"]] = t0
    else:
        errors[str(resp.status_code)] += 1


async def wait_delivered(stack: Stack, ids: set[str], timeout: float) -> list[tuple[str, float]]:
    deadline, last = time.monotonic() + timeout, 0.0
    while True:
        rows = [r for r in read_sink(stack.sink_log) if r[0] in ids]
        got = len({r[0] for r in rows})
        if got >= len(ids) or time.monotonic() > deadline:
            return rows
        if time.monotonic() - last > 3:
            print(f"    delivered {got}/{len(ids)}", flush=True)
            last = time.monotonic()
        await asyncio.sleep(0.2)


async def use_template(http: Any, name: str, items: int) -> None:
    """From here on, POST emails from a shipped template (its sample data; `items` rows for a list of items)."""
    global BODY
    reload = await http.post("/v1/templates/reload")
    if reload.status_code != 200:
        raise SystemExit(f"could not load the templates folder: {reload.text}")
    got = await http.get(f"/v1/templates/{name}")
    if got.status_code != 200:
        raise SystemExit(f"no template {name!r}: {got.text}")
    data = dict(got.json()["sample_data"] or {})
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], dict) and items:
            data[key] = [dict(value[i % len(value)], ItemCode=f"ITEM-{i:04d}") for i in range(items)]
    BODY = {"to": ["bench@example.com"], "template": name, "template_data": data}


async def warm_up(stack: Stack, http: Any) -> None:
    sent: dict[str, float] = {}
    for _ in range(600):
        try:
            await post(http, sent, [], Counter())
            if sent:
                break
        except Exception:  # noqa: BLE001
            pass
        await asyncio.sleep(0.1)
    if not sent or not await wait_delivered(stack, set(sent), 60):
        raise SystemExit("the stack did not deliver a warm-up email; see the logs in " + str(stack.tmp))


async def steady(stack: Stack, http: Any, rate: float, seconds: float) -> dict[str, Any]:
    sent: dict[str, float] = {}
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    count = int(rate * seconds)
    start = time.monotonic() + 0.1
    tasks = []
    for i in range(count):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(post(http, sent, latencies, errors)))
    await asyncio.gather(*tasks)
    rows = await wait_delivered(stack, set(sent), 120)
    first_seen: dict[str, float] = {}
    for mid, at in rows:
        first_seen.setdefault(mid, at)
    lags = [first_seen[i] - t0 for i, t0 in sent.items() if i in first_seen]
    return {
        "requests": count, "rate_per_s": rate, "errors": dict(errors),
        "post_latency_ms": ms(latencies), "queue_lag_ms": ms(lags), "delivered": len(first_seen),
    }


async def scheduled(stack: Stack, http: Any, emails: int, lead: float) -> dict[str, Any]:
    """`emails` emails all due at the same second, posted well before it: how late each goes out."""
    from datetime import UTC, datetime

    due = datetime.fromtimestamp(int(time.time() + lead), UTC)
    body = dict(BODY, send_at=due.isoformat())
    sent: dict[str, float] = {}
    errors: Counter[str] = Counter()
    limit = asyncio.Semaphore(20)

    async def one() -> None:
        async with limit:
            resp = await http.post("/v1/emails", json=body)
            if resp.status_code == 202:
                sent[resp.json()["id"]] = 0.0
            else:
                errors[str(resp.status_code)] += 1

    await asyncio.gather(*(one() for _ in range(emails)))
    posted_before_due = due.timestamp() - time.time()
    rows = await wait_delivered(stack, set(sent), lead + 120)
    first_seen: dict[str, float] = {}
    for mid, at in rows:
        first_seen.setdefault(mid, at)
    lateness = [at - due.timestamp() for at in first_seen.values()]
    return {
        "emails": emails, "due": due.isoformat(), "posted_seconds_before_due": round(posted_before_due, 1),
        "errors": dict(errors), "delivered": len(first_seen), "early": sum(1 for x in lateness if x < 0),
        "lateness_ms": ms(lateness),
        "all_out_seconds_after_due": round(max(lateness, default=float("nan")), 2),
    }


async def throughput(stack: Stack, http: Any, emails: int, clients: int) -> dict[str, Any]:
    sent: dict[str, float] = {}
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    queue = iter(range(emails))

    async def client() -> None:
        for _ in queue:
            await post(http, sent, latencies, errors)

    t0 = time.time()
    await asyncio.gather(*(client() for _ in range(clients)))
    posted = time.time()
    rows = await wait_delivered(stack, set(sent), 600)
    counts = Counter(mid for mid, _ in rows)
    last = max((at for _, at in rows), default=posted)
    return {
        "emails": emails, "clients": clients, "errors": dict(errors),
        "post_seconds": round(posted - t0, 2), "post_rate_per_s": round(emails / (posted - t0), 1),
        "post_latency_ms": ms(latencies),
        "end_to_end_seconds": round(last - t0, 2), "emails_per_s": round(len(counts) / (last - t0), 1),
        "delivered": len(counts), "missing": len(sent) - len(counts), "duplicates": sum(n - 1 for n in counts.values()),
    }


async def floor_throughput(stack: Stack, client: Any, emails: int, clients: int, warm_up: bool = False) -> dict[str, Any]:
    """B's shape for the floor: `clients` tasks each starting workflows (bench/floor.py) until `emails`
    are started, first start -> last message received. `warm_up`: one email, until it is delivered."""
    from floor import TASK_QUEUE, FloorEmail, FloorWorkflow

    sent: dict[str, float] = {}
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    queue = iter(range(emails))

    async def start() -> None:
        email_id = uuid.uuid4().hex
        t0 = time.time()
        try:
            await client.start_workflow(FloorWorkflow.run, FloorEmail(email_id), id=f"floor-{email_id}", task_queue=TASK_QUEUE)
        except Exception as exc:  # noqa: BLE001 - counted, as B counts failed POSTs
            errors[type(exc).__name__] += 1
            return
        latencies.append(time.time() - t0)
        sent[email_id] = t0

    async def one_client() -> None:
        for _ in queue:
            await start()

    if warm_up:
        await start()
        if not sent or not await wait_delivered(stack, set(sent), 60):
            raise SystemExit("the floor's worker did not deliver a warm-up email; see floor-worker.log in " + str(stack.tmp))
        return {}
    cpu0 = stack.cpu_snapshot()
    t0 = time.time()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    started = time.time()
    rows = await wait_delivered(stack, set(sent), 600)
    counts = Counter(mid for mid, _ in rows)
    last = max((at for _, at in rows), default=started)
    result = {
        "emails": emails, "clients": clients, "errors": dict(errors),
        "start_seconds": round(started - t0, 2), "start_rate_per_s": round(emails / (started - t0), 1),
        "start_latency_ms": ms(latencies),
        "end_to_end_seconds": round(last - t0, 2), "emails_per_s": round(len(counts) / (last - t0), 1),
        "delivered": len(counts), "missing": len(sent) - len(counts), "duplicates": sum(n - 1 for n in counts.values()),
    }
    by_process = stack.cpu_used(cpu0)
    # the floor's own processes; the product's (idle, polling) stay out of its cost
    return result | cost({k: v for k, v in by_process.items() if k in ("floor-worker", "temporal", "sink")}, len(counts)) | {
        "cpu_idle_product": {k: v for k, v in by_process.items() if k not in ("floor-worker", "temporal", "sink")}}


def cost(by_process: dict[str, float], delivered: int) -> dict[str, Any]:
    """CPU-seconds of each process over a phase, and per email delivered in it."""
    total = sum(by_process.values())
    n = max(delivered, 1)
    return {
        "cpu_seconds": round(total, 2), "cpu_by_process": by_process,
        "cpu_seconds_per_email": round(total / n, 5),
        "cpu_seconds_per_email_by_process": {k: round(v / n, 5) for k, v in by_process.items()},
    }


def ratios(project: dict[str, Any], floor: dict[str, Any]) -> dict[str, Any]:
    """project / floor, for throughput and CPU per email (all processes, and each shared kind)."""
    def div(a: float, b: float) -> float | None:  # noqa: E306
        return round(a / b, 3) if b else None

    mine, bare = project["cpu_seconds_per_email_by_process"], floor["cpu_seconds_per_email_by_process"]
    workers = sum(v for k, v in mine.items() if k.startswith("worker"))
    return {
        "throughput": div(project["emails_per_s"], floor["emails_per_s"]),
        "cpu_per_email": div(project["cpu_seconds_per_email"], floor["cpu_seconds_per_email"]),
        "cpu_per_email_workers": div(workers, bare.get("floor-worker", 0.0)),
        "cpu_per_email_temporal": div(mine.get("temporal", 0.0), bare.get("temporal", 0.0)),
        "cpu_per_email_sink": div(mine.get("sink", 0.0), bare.get("sink", 0.0)),
    }


async def conditions(label: str) -> dict[str, Any]:
    """The machine just before a phase: steal time over a 1 s sample (/proc/stat) and the load (/proc/loadavg)."""
    def cpu_line() -> list[int]:  # noqa: E306 - user nice system idle iowait irq softirq steal (guest: in user)
        return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]

    a = cpu_line()
    await asyncio.sleep(1.0)
    b = cpu_line()
    delta = [y - x for x, y in zip(a, b)]
    total = sum(delta) or 1
    load = Path("/proc/loadavg").read_text().split()
    found = {
        "steal_pct": round(delta[7] * 100 / total, 1), "idle_pct": round((delta[3] + delta[4]) * 100 / total, 1),
        "load": [float(x) for x in load[:3]], "runnable": load[3],
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    print(f"   before {label}: steal {found['steal_pct']} %, idle {found['idle_pct']} %, "
          f"load {' '.join(load[:3])} (runnable/all {load[3]})", flush=True)
    return found


async def raw_smtp(stack: Stack, emails: int, clients: int) -> dict[str, Any]:
    import aiosmtplib

    queue = iter(range(emails))

    async def client() -> None:
        for _ in queue:
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = "bench@example.com", "bench@example.com", "raw"
            msg["Message-ID"] = f"<raw-{uuid.uuid4()}@example.com>"
            msg.set_content("hello")
            await aiosmtplib.send(msg, hostname="127.0.0.1", port=stack.sink_port)

    t0 = time.time()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.time() - t0
    return {"emails": emails, "clients": clients, "seconds": round(elapsed, 2), "emails_per_s": round(emails / elapsed, 1)}


def machine() -> dict[str, Any]:
    from devstack.devserver import temporal_cli

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    temporal = subprocess.run([temporal_cli(), "--version"], capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_mib": mem, "python": platform.python_version(), "temporal": temporal}


def prepare_database(url: str | None, tmp: Path) -> tuple[str, Any]:
    from mailqueue.db import migrate

    if url is None:
        url = f"sqlite:///{tmp / 'mailqueue.db'}"
        migrate(url)
        return url, lambda: None
    import psycopg

    name = f"mq_bench_{uuid.uuid4().hex[:10]}"
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    bench_url = url.rsplit("/", 1)[0] + f"/{name}"
    migrate(bench_url)

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return bench_url, drop


async def run(args: argparse.Namespace) -> dict[str, Any]:
    phases = "" if args.floor_only else args.phases.upper()
    floor = args.floor or args.floor_only
    tmp = Path(tempfile.mkdtemp(prefix="mailqueue-bench-"))
    if args.floor_only:  # no API, no product worker: nothing reads the database
        url, drop = f"sqlite:///{tmp / 'unused.db'}", (lambda: None)
    else:
        url, drop = prepare_database(args.database_url, tmp)
    stack = Stack(tmp, url, args.workers, telemetry=args.telemetry)
    results: dict[str, Any] = {
        "machine": machine(), "commit": commit_id(), "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": {"database": "postgresql" if args.database_url else "sqlite (file)", "temporal": "dev server, file + WAL",
                     "workers": args.workers, "emails": args.emails, "clients": args.clients, "rate": args.rate,
                     "template": f"{args.template} ({args.template_items} items)" if args.template else None,
                     "phases": phases, "floor": floor},
        "conditions": {},
    }
    when = results["conditions"]
    try:
        print(f"starting the stack in {tmp}", flush=True)
        stack.start(product=not args.floor_only)
        if not args.floor_only:
            async with api_client(stack, args.clients) as http:
                await warm_up(stack, http)
                if args.template:
                    await use_template(http, args.template, args.template_items)
                    await warm_up(stack, http)
                if "A" in phases:
                    print(f"A. steady {args.rate}/s for {args.steady_seconds}s", flush=True)
                    when["steady"] = await conditions("A")
                    results["steady"] = await steady(stack, http, args.rate, args.steady_seconds)
                if "E" in phases and args.scheduled:
                    print(f"E. {args.scheduled} emails due at the same second", flush=True)
                    when["scheduled"] = await conditions("E")
                    results["scheduled"] = await scheduled(stack, http, args.scheduled, args.scheduled_lead)
                if "B" in phases:
                    print(f"B. {args.emails} emails from {args.clients} clients", flush=True)
                    when["throughput"] = await conditions("B")
                    cpu0 = stack.cpu_snapshot()
                    results["throughput"] = await throughput(stack, http, args.emails, args.clients)
                    results["throughput"] |= cost(stack.cpu_used(cpu0), results["throughput"]["delivered"])
        if floor:
            print(f"F. floor: {args.emails} bare workflows from {args.clients} clients (bench/floor.py)", flush=True)
            from temporalio.client import Client

            stack.start_floor()
            client = await Client.connect(stack.temporal.address)
            await floor_throughput(stack, client, 1, 1, warm_up=True)
            when["floor"] = await conditions("F")
            results["floor"] = await floor_throughput(stack, client, args.emails, args.clients)
            if "throughput" in results:
                results["ratios"] = ratios(results["throughput"], results["floor"])
        if "C" in phases:
            print("C. raw SMTP to the same sink", flush=True)
            when["raw_smtp"] = await conditions("C")
            results["raw_smtp"] = await raw_smtp(stack, args.emails, args.clients)
        if "D" in phases:
            print("D. template rendering", flush=True)
            when["render"] = await conditions("D")
            results["render"] = render_bench(args.render_seconds)
    finally:
        stack.stop()
        drop()
    return results


def commit_id() -> str:
    """`git rev-parse --short HEAD`, with "-dirty" when the tree has changes (bench/results/ is ignored)."""
    def git(*argv: str) -> str:  # noqa: E306
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain") else "")


def save(results: dict[str, Any], json_out: Path) -> Path:
    """To --json-out, and kept in bench/results/ under the commit id and the time (for comparing runs later)."""
    text = json.dumps(results, indent=2) + "\n"
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(text)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    kept = ROOT / "bench" / "results" / f"{results.get('commit') or commit_id()}-{stamp}.json"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(text)
    return kept


def render_bench(seconds: float, items: int = 50) -> dict[str, Any]:
    """Renders per second of a shipped template, the way the render activity does it (cache warm)."""
    from mailqueue.template_library import read_folder
    from mailqueue.templating import TemplateEngine, TemplateSource

    files, problems = read_folder(ROOT / "templates")
    if problems:
        raise SystemExit(f"templates folder has problems: {problems}")
    def saved(f: Any) -> TemplateSource:  # noqa: E306 - a version number as if stored
        d = f.source()
        return TemplateSource(d.name, 1, d.subject, d.html, d.text, d.locale)
    by = {(f.name, f.locale): f for f in files}
    main = saved(by[("StockIssueApproved", "")])
    deps = {n: saved(by[(n, "")]) for n in ("_Layout", "_Header", "_Footer")}
    data = dict(by[("StockIssueApproved", "")].meta["sample_data"])
    data["Items"] = [
        {"ItemCode": f"ITEM-{i:04d}", "ItemName": f"Item number {i}", "Quantity": i * 1.5, "Unit": "pcs"} for i in range(items)
    ]
    engine = TemplateEngine()
    first = time.perf_counter()
    content = engine.render(main, data, deps)
    cold_ms = (time.perf_counter() - first) * 1000

    def rate(fn: Any) -> tuple[float, float]:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            n += 1
        elapsed = time.perf_counter() - start
        return round(n / elapsed, 1), round(elapsed / n * 1000, 3)

    full_rate, full_ms = rate(lambda: engine.render(main, data, deps))
    jinja_rate, jinja_ms = rate(lambda: engine.render_parts(main, data, deps))
    return {
        "template": "StockIssueApproved + _Layout/_Header/_Footer", "items": items,
        "html_bytes": len(content.html or ""), "text_bytes": len(content.text or ""),
        "first_render_ms": round(cold_ms, 1),
        "full_renders_per_s": full_rate, "full_render_ms": full_ms,
        "jinja_renders_per_s": jinja_rate, "jinja_render_ms": jinja_ms,
    }


def summary(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"machine     {m['cpus']} cpus ({m['cpu']}), {m['memory_mib']} MiB, Python {m['python']}, {m['temporal'].splitlines()[0]}",
        f"settings    {r['settings']}",
        f"commit      {r.get('commit')}",
    ]
    for phase, c in r.get("conditions", {}).items():
        lines.append(f"before {phase:11} steal {c['steal_pct']} %, idle {c['idle_pct']} %, load {c['load']}")
    if "steady" in r:
        s = r["steady"]
        lines.append(
            f"A. steady   {s['requests']} POSTs at {s['rate_per_s']}/s: latency p50 {s['post_latency_ms']['p50']} ms, "
            f"p99 {s['post_latency_ms']['p99']} ms, max {s['post_latency_ms']['max']} ms; queue lag p50 {s['queue_lag_ms']['p50']} ms, "
            f"p99 {s['queue_lag_ms']['p99']} ms; errors {s['errors'] or 0}; delivered {s['delivered']}")
    if "throughput" in r:
        t = r["throughput"]
        lines.append(
            f"B. load     {t['emails']} emails / {t['clients']} clients: {t['emails_per_s']} emails/s end to end "
            f"({t['end_to_end_seconds']} s); POSTs {t['post_rate_per_s']}/s, p50 {t['post_latency_ms']['p50']} ms, "
            f"p99 {t['post_latency_ms']['p99']} ms; delivered {t['delivered']}, missing {t['missing']}, duplicates {t['duplicates']}, "
            f"errors {t['errors'] or 0}")
    if "floor" in r:
        f = r["floor"]
        lines.append(
            f"F. floor    {f['emails']} workflows / {f['clients']} clients: {f['emails_per_s']} emails/s end to end "
            f"({f['end_to_end_seconds']} s); starts {f['start_rate_per_s']}/s, p50 {f['start_latency_ms']['p50']} ms, "
            f"p99 {f['start_latency_ms']['p99']} ms; delivered {f['delivered']}, missing {f['missing']}, duplicates {f['duplicates']}, "
            f"errors {f['errors'] or 0}")
    for label, key in (("B", "throughput"), ("F", "floor")):
        if key in r and "cpu_by_process" in r[key]:
            x = r[key]
            lines.append(f"{label}. CPU      {x['cpu_seconds']} s, {x['cpu_seconds_per_email'] * 1000:.2f} ms per email: " + ", ".join(
                f"{name} {seconds} s ({x['cpu_seconds_per_email_by_process'][name] * 1000:.2f} ms/email)"
                for name, seconds in x["cpu_by_process"].items()))
    if "ratios" in r:
        q = r["ratios"]
        lines.append(
            f"project / floor: throughput {q['throughput']}, CPU per email {q['cpu_per_email']} "
            f"(workers {q['cpu_per_email_workers']}, temporal {q['cpu_per_email_temporal']}, sink {q['cpu_per_email_sink']})")
    if "raw_smtp" in r:
        raw = r["raw_smtp"]
        lines.append(f"C. raw SMTP {raw['emails']} messages / {raw['clients']} clients: {raw['emails_per_s']} messages/s")
    if "render" in r:
        lines.append(render_summary(r["render"]))
    if r.get("scheduled"):
        lines.append(scheduled_summary(r["scheduled"]))
    return "\n".join(lines)


def scheduled_summary(e: dict[str, Any]) -> str:
    late = e["lateness_ms"]
    return (
        f"E. schedule {e['emails']} emails due at {e['due']} (posted {e['posted_seconds_before_due']} s before): lateness "
        f"p50 {late['p50']} ms, p99 {late['p99']} ms, max {late['max']} ms; early {e['early']}; delivered {e['delivered']}, "
        f"errors {e['errors'] or 0}"
    )


def render_summary(d: dict[str, Any]) -> str:
    return (
        f"D. render   {d['template']}, {d['items']} items ({d['html_bytes']} B html): {d['full_renders_per_s']} full renders/s "
        f"({d['full_render_ms']} ms: Jinja + CSS inlining + text part), Jinja alone {d['jinja_renders_per_s']}/s "
        f"({d['jinja_render_ms']} ms); first (compiling) render {d['first_render_ms']} ms"
    )


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--sink":
        run_sink(int(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emails", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--steady-seconds", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--database-url", default=None, help="PostgreSQL server URL; default: SQLite file")
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--template", default=None, help="A and B send this shipped template (e.g. StockIssueApproved) instead of a raw email")
    parser.add_argument("--template-items", type=int, default=50, help="rows in the template's list of items")
    parser.add_argument("--render-seconds", type=float, default=5.0)
    parser.add_argument("--scheduled", type=int, default=200, help="E: emails due at the same second (0: skip E)")
    parser.add_argument("--scheduled-lead", type=float, default=15.0, help="E: seconds from the first POST to the due second")
    parser.add_argument("--render-only", action="store_true", help="run only D (template rendering)")
    parser.add_argument("--telemetry", action="store_true", help="tracing (OTLP) and metrics on, scraped every 5 s")
    parser.add_argument("--ab", choices=["telemetry", "search-attributes", "webhooks", "attachment"], default=None, help="only B, this off and on in turn")
    parser.add_argument("--pairs", type=int, default=2, help="--ab: how many off/on pairs")
    parser.add_argument("--phases", default="AEBCD", help="which of the phases A, E, B, C, D to run (e.g. B)")
    floor = parser.add_mutually_exclusive_group()
    floor.add_argument("--floor", action="store_true", help="after B, the bare workflow-per-email floor (bench/floor.py) and project / floor")
    floor.add_argument("--floor-only", action="store_true", help="only the floor: dev server, sink and the floor's worker")
    args = parser.parse_args()
    if args.ab:
        compared = asyncio.run(ab(args))
        compared["commit"] = commit_id()
        kept = save(compared, args.json_out)
        print("\n" + "\n".join(ab_line(r) for r in compared["runs"]))
        print(f"\nfull results: {args.json_out} (kept as {kept})")
        return
    if args.render_only:
        print(render_summary(render_bench(args.render_seconds)))
        return
    results = asyncio.run(run(args))
    kept = save(results, args.json_out)
    print("\n" + summary(results))
    print(f"\nfull results: {args.json_out} (kept as {kept})")


if __name__ == "__main__":
    main()
