"""`mailqueue dev` itself: the one command a new user runs, end to end, then Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from devstack.net import free_port
from tests.helpers import EMAIL_SETTLES, PROCESS_STARTS, ROOT, eventually, run_cli


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
async def test_mailqueue_dev_runs_the_stack_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("api", "temporal", "ui", "smtp", "mail")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}  # embedded defaults: SQLite
    out = (tmp_path / "dev.out").open("wb")
    dev = subprocess.Popen(
        [sys.executable, "-m", "devstack.cli", "dev", "--data-dir", str(tmp_path / "state"),
         "--api-port", str(ports["api"]), "--temporal-port", str(ports["temporal"]), "--ui-port", str(ports["ui"]),
         "--smtp-port", str(ports["smtp"]), "--mail-port", str(ports["mail"])],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{ports['api']}"
    try:

        def running() -> bool:
            assert dev.poll() is None, (tmp_path / "dev.out").read_text()
            return "mailqueue is running" in (tmp_path / "dev.out").read_text()

        await eventually(running, timeout=PROCESS_STARTS, interval=0.2, what="the stack did not come up")
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

        caught = await eventually(
            lambda: httpx.get(f"http://127.0.0.1:{ports['mail']}/api/messages").json(),
            timeout=EMAIL_SETTLES, interval=0.2, what="the catcher never got the email",
        )
        assert len(caught) == 1 and caught[0]["subject"] == "Hello from dev"
        assert email_id in caught[0]["message_id"], caught[0]
        assert httpx.get(f"http://127.0.0.1:{ports['ui']}/").status_code == 200  # the Temporal Web UI

        listing = run_cli("mail", "--data-dir", str(tmp_path / "state"))
        assert listing.returncode == 0, listing.stderr
        assert "Hello from dev" in listing.stdout and "ann@example.com" in listing.stdout
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            code = await asyncio.to_thread(dev.wait, 30)  # its children die with it even if it has to be killed (PR_SET_PDEATHSIG)
        finally:
            if dev.poll() is None:
                dev.kill()
                dev.wait()
            out.close()
    assert code == 0, (tmp_path / "dev.out").read_text()
    assert "stopped" in (tmp_path / "dev.out").read_text()
    assert not [name for name, port in ports.items() if _listening(port)], "a child was left running"
    assert (tmp_path / "state" / "temporal.db").exists() and (tmp_path / "state" / "mailqueue.db").exists()
