"""A local SMTP catcher for development: keeps every message and shows them on a small page.

    python -m devstack.catcher --smtp-port 1025 --http-port 8025 --dir .mailqueue/mail
"""

from __future__ import annotations

import argparse
import html
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller


@dataclass
class CaughtMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    received_at: float = field(default_factory=time.time)

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.data, policy=policy.default)  # type: ignore[return-value]

    def summary(self, index: int) -> dict[str, Any]:
        msg = self.message
        return {
            "index": index,
            "received_at": self.received_at,
            "from": msg["From"],
            "to": msg["To"],
            "subject": msg["Subject"],
            "message_id": msg["Message-ID"],
            "envelope_to": self.rcpt_tos,
        }


class CatchingHandler:
    """aiosmtpd handler keeping messages in memory and, optionally, as .eml files."""

    def __init__(self, directory: Path | None = None) -> None:
        self.messages: list[CaughtMessage] = []
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        caught = CaughtMessage(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content or envelope.content))
        with self._lock:
            self.messages.append(caught)
            count = len(self.messages)
        if self.directory is not None:
            (self.directory / f"{time.time_ns()}-{count:06d}.eml").write_bytes(caught.data)
        return f"250 2.0.0 Ok: queued as C{count:06d}"


def load_directory(directory: Path) -> list[CaughtMessage]:
    out = []
    for path in sorted(directory.glob("*.eml")):
        msg = message_from_bytes(path.read_bytes(), policy=policy.default)
        out.append(CaughtMessage(str(msg["From"]), [str(msg["To"])], path.read_bytes(), path.stat().st_mtime))
    return out


def _page(handler: CatchingHandler) -> type[BaseHTTPRequestHandler]:
    class Page(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, code: int, body: str, ctype: str = "text/html; charset=utf-8") -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            msgs = list(handler.messages)
            if self.path == "/api/messages":
                self._send(200, json.dumps([m.summary(i) for i, m in enumerate(msgs)]), "application/json")
                return
            if self.path.startswith("/messages/"):
                try:
                    m = msgs[int(self.path.rsplit("/", 1)[1])]
                except (ValueError, IndexError):
                    self._send(404, "no such message")
                    return
                self._send(200, m.data.decode("utf-8", "replace"), "text/plain; charset=utf-8")
                return
            rows = "".join(
                f"<tr><td><a href='/messages/{i}'>{i}</a></td><td>{html.escape(str(s['from']))}</td>"
                f"<td>{html.escape(str(s['to']))}</td><td>{html.escape(str(s['subject']))}</td>"
                f"<td>{time.strftime('%H:%M:%S', time.localtime(s['received_at']))}</td></tr>"
                for i, s in reversed(list(enumerate(m.summary(i) for i, m in enumerate(msgs))))
            )
            self._send(
                200,
                "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=5>"
                "<title>mailqueue: caught mail</title><style>body{font-family:sans-serif}"
                "td,th{padding:4px 10px;text-align:left}</style>"
                f"<h1>Caught mail ({len(msgs)})</h1><table><tr><th>#</th><th>From</th><th>To</th>"
                f"<th>Subject</th><th>Received</th></tr>{rows}</table>",
            )

    return Page


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--smtp-port", type=int, default=1025)
    parser.add_argument("--http-port", type=int, default=8025)
    parser.add_argument("--dir", type=Path, default=None, help="also keep each message as an .eml file here")
    args = parser.parse_args(argv)

    handler = CatchingHandler(args.dir)
    if args.dir is not None:
        handler.messages.extend(load_directory(args.dir))
    controller = Controller(handler, hostname=args.host, port=args.smtp_port, data_size_limit=50 * 2**20)
    controller.start()
    web = ThreadingHTTPServer((args.host, args.http_port), _page(handler))
    threading.Thread(target=web.serve_forever, daemon=True).start()
    print(f"catcher: SMTP on {args.host}:{args.smtp_port}, page on http://{args.host}:{args.http_port}", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    web.shutdown()
    controller.stop()


if __name__ == "__main__":
    main()
