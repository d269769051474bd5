"""SMTP driver throughput with and without connection reuse (`make bench-smtp`).

    .venv/bin/python bench/smtp_bench.py [--messages 1000] [--json-out bench/results/smtp.json]

An aiosmtpd sink runs in a separate process (so it does not share this process's CPU time
slice and GIL), plain and with STARTTLS + AUTH PLAIN (a private CA made with trustme, which
this process trusts). For each security mode, reuse on and off, and 1 or 20 concurrent
senders, it sends N messages through one SmtpDriver and reports messages/s and the latency
of one send (p50, p99).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

USER, PASSWORD = "bench", "bench-password"


def run_sink(port: int, cert: str | None, key: str | None) -> None:
    import logging

    # aiosmtpd logs "Session.login_data is deprecated" as a warning on every AUTH, itself.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 OK"

    def auth(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data.login == USER.encode() and data.password == PASSWORD.encode()
        return AuthResult(success=ok, handled=False)

    kw: dict[str, Any] = {}
    if cert and key:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        kw = dict(tls_context=ctx, require_starttls=True, authenticator=auth, auth_require_tls=True, auth_exclude_mechanism=["LOGIN"])
    controller = Controller(Handler(), hostname="127.0.0.1", port=port, **kw)
    controller.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    controller.stop()


def message(i: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "bench@example.com", "sink@example.com", f"bench {i}"
    msg["Message-ID"] = f"<bench-{i}@example.com>"
    msg.set_content("A short transactional message, as most are.\n" * 20)
    return msg


async def measure(driver: Any, messages: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    queue = iter(range(messages))

    async def sender() -> None:
        for i in queue:
            t0 = time.perf_counter()
            await driver.send(message(i), "bench@example.com", ["sink@example.com"])
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await driver.aclose()
    latencies.sort()
    return {
        "messages_per_s": round(messages / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[math.ceil(len(latencies) * 0.99) - 1] * 1000, 2),  # nearest rank
        "connections": driver.connections_opened,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import trustme

    from mailqueue.config import SmtpSecurity
    from mailqueue.drivers.smtp import SmtpDriver
    from devstack.net import free_port, wait_for_port

    tmp = Path(tempfile.mkdtemp(prefix="mailqueue-smtp-bench-"))
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = tmp / "cert.pem", tmp / "key.pem", tmp / "ca.pem"
    server_cert.cert_chain_pems[0].write_to_path(str(cert))
    server_cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    os.environ["SSL_CERT_FILE"] = str(ca_file)  # the driver validates the sink's certificate

    plain_port, tls_port = free_port(), free_port()
    sinks = [
        subprocess.Popen([sys.executable, __file__, "--sink", str(plain_port)]),
        subprocess.Popen([sys.executable, __file__, "--sink", str(tls_port), "--cert", str(cert), "--key", str(key)]),
    ]
    results: dict[str, Any] = {"messages": args.messages, "runs": []}
    try:
        wait_for_port(plain_port)
        wait_for_port(tls_port)
        modes = [("plain", plain_port, SmtpSecurity.NONE, {}),
                 ("STARTTLS + AUTH", tls_port, SmtpSecurity.STARTTLS, {"username": USER, "password": PASSWORD})]
        for label, port, security, auth in modes:
            for concurrency in (1, 20):
                for reuse in (False, True):
                    driver = SmtpDriver("127.0.0.1", port, security=security, reuse_connections=reuse,
                                        max_connections=max(concurrency, 1), **auth)
                    await measure(driver, min(50, args.messages), concurrency)  # warm up
                    driver = SmtpDriver("127.0.0.1", port, security=security, reuse_connections=reuse,
                                        max_connections=max(concurrency, 1), **auth)
                    row = {"mode": label, "concurrency": concurrency, "reuse": reuse} | await measure(driver, args.messages, concurrency)
                    results["runs"].append(row)
                    print(f"{label:16} concurrency {concurrency:2}  reuse {'on ' if reuse else 'off'}  "
                          f"{row['messages_per_s']:8.1f} msg/s  p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
                          f"connections {row['connections']}", flush=True)
    finally:
        for sink in sinks:
            sink.terminate()
            sink.wait(10)
    return results


def print_table(results: dict[str, Any]) -> None:
    rows = {(r["mode"], r["concurrency"], r["reuse"]): r for r in results["runs"]}
    print(f"\n{'mode':16} {'senders':>7}  {'reuse off':>26}  {'reuse on':>26}  {'gain':>5}")
    for mode, concurrency in dict.fromkeys((m, c) for m, c, _ in rows):
        off, on = rows[(mode, concurrency, False)], rows[(mode, concurrency, True)]
        cell = [f"{r['messages_per_s']:7.1f}/s p50 {r['p50_ms']:5.1f} p99 {r['p99_ms']:6.1f}" for r in (off, on)]
        print(f"{mode:16} {concurrency:7}  {cell[0]:>26}  {cell[1]:>26}  {on['messages_per_s'] / off['messages_per_s']:4.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "smtp.json")
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        run_sink(args.sink, args.cert, args.key)
        return
    results = asyncio.run(run(args))
    print_table(results)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nfull results: {args.json_out}")


if __name__ == "__main__":
    main()
