"""A local webhook receiver: a real HTTP server on a free port that verifies every POST with the
`standardwebhooks` library (as a receiver following the spec would) and records what it got.

It can be told to be down (the port refuses connections), to answer with scripted statuses (500s,
503s) before answering 200, or to be slow (each call held for a while, or until released)."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

from devstack.net import free_port


@dataclass
class Received:
    """One POST as it arrived (and what the receiver answered)."""

    webhook_id: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    payload: Any
    answered: int


class WebhookReceiver:
    def __init__(self, secret: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.secret = secret  # set once the endpoint is made (the API shows it then)
        self.received: list[Received] = []
        self.script: deque[int] = deque()  # statuses to answer first, in order; then 200
        self.delay = 0.0  # seconds each call is held before its answer
        self.calls = 0  # POSTs that arrived (answered or still held)
        self.release = threading.Event()  # hold_until_released: calls wait for this
        self.release.set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- what arrived -------------------------------------------------------------------------

    def verified(self) -> list[Received]:
        return [r for r in self.received if r.verified and r.answered // 100 == 2]

    def accepted_ids(self) -> list[str]:
        """webhook-ids of the verified POSTs answered 2xx, in arrival order."""
        return [r.webhook_id for r in self.verified()]

    # --- behaviour ----------------------------------------------------------------------------

    def hold_until_released(self) -> None:
        self.release.clear()

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.calls += 1
                receiver.release.wait(120)
                if receiver.delay:
                    time.sleep(receiver.delay)
                status = receiver._answer(dict(self.headers.items()), raw)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop listening: connections to the port are refused until up()."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _answer(self, headers: dict[str, str], raw: bytes) -> int:
        try:
            payload = Webhook(self.secret or "").verify(raw, headers) if self.secret else None
            verified = self.secret is not None
        except WebhookVerificationError:
            payload, verified = None, False
        with self._lock:
            status = self.script.popleft() if self.script else (200 if verified else 401)
            lowered = {k.lower(): v for k, v in headers.items()}
            self.received.append(Received(
                lowered.get("webhook-id", ""), lowered, raw, verified, payload if payload is not None else _json(raw), status,
            ))
        return status

    def __enter__(self) -> WebhookReceiver:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.down()


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None
