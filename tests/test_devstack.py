"""`mailqueue dev` itself: the one command a new user runs, end to end, then Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mailqueue.net import free_port

ROOT = Path(__file__).resolve().parents[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_mailqueue_dev_runs_the_stack_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("api", "temporal", "ui", "smtp", "mail")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}  # embedded defaults: SQLite
    out = (tmp_path / "dev.out").open("wb")
    dev = subprocess.Popen(
        [sys.executable, "-m", "mailqueue.cli", "dev", "--data-dir", str(tmp_path / "state"),
         "--api-port", str(ports["api"]), "--temporal-port", str(ports["temporal"]), "--ui-port", str(ports["ui"]),
         "--smtp-port", str(ports["smtp"]), "--mail-port", str(ports["mail"])],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{ports['api']}"
    try:
        deadline = time.monotonic() + 90
        while "mailqueue is running" not in (tmp_path / "dev.out").read_text():
            assert dev.poll() is None, (tmp_path / "dev.out").read_text()
            assert time.monotonic() < deadline, "the stack did not come up in 90 s"
            time.sleep(0.2)
        banner = (tmp_path / "dev.out").read_text()
        assert f"{api}/docs" in banner and f"http://127.0.0.1:{ports['ui']}" in banner
        assert f"http://127.0.0.1:{ports['mail']}" in banner and "mailqueue mail" in banner
        assert "Bearer mq-dev-key" in banner and "development key" in banner
        assert httpx.get(f"{api}/healthz").status_code == 200
        assert "13 loaded" in banner and f"{api}/v1/templates/StockIssueApproved/preview" in banner
        preview = httpx.get(f"{api}/v1/templates/StockIssueApproved/preview", auth=("me", "mq-dev-key"))
        assert preview.status_code == 200 and "SIR-2025-001" in preview.text and "<style" not in preview.text

        resp = httpx.post(f"{api}/v1/emails", headers={"Authorization": "Bearer mq-dev-key"},
                          json={"to": ["ann@example.com"], "subject": "Hello from dev", "text": "It works"})
        assert resp.status_code == 202, resp.text
        email_id = resp.json()["id"]

        deadline = time.monotonic() + 30
        while not (caught := httpx.get(f"http://127.0.0.1:{ports['mail']}/api/messages").json()):
            assert time.monotonic() < deadline, "the catcher never got the email"
            time.sleep(0.2)
        assert len(caught) == 1 and caught[0]["subject"] == "Hello from dev"
        assert email_id in caught[0]["message_id"], caught[0]
        assert httpx.get(f"http://127.0.0.1:{ports['ui']}/").status_code == 200  # the Temporal Web UI

        listing = subprocess.run(
            [sys.executable, "-m", "mailqueue.cli", "mail", "--data-dir", str(tmp_path / "state")],
            capture_output=True, text=True, check=True,
        )
        assert "Hello from dev" in listing.stdout and "ann@example.com" in listing.stdout
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            code = dev.wait(30)  # its children die with it even if it has to be killed (PR_SET_PDEATHSIG)
        finally:
            if dev.poll() is None:
                dev.kill()
                dev.wait()
            out.close()
    assert code == 0, (tmp_path / "dev.out").read_text()
    assert "stopped" in (tmp_path / "dev.out").read_text()
    assert not [name for name, port in ports.items() if _listening(port)], "a child was left running"
    assert (tmp_path / "state" / "temporal.db").exists() and (tmp_path / "state" / "mailqueue.db").exists()
