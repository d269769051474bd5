"""A worker killed with SIGKILL in the middle of a batch: nothing is lost."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from devstack.devserver import TemporalDevServer
from tests.helpers import AUTH, EMAIL_SETTLES, ApiProcess, SmtpSink, eventually, fast_settings, post_email, start_worker

ROOT = Path(__file__).resolve().parents[1]
BATCH = 100


@pytest.mark.slow
async def test_worker_sigkill_mid_batch_loses_nothing(
    database_url: str, temporal_server: TemporalDevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with SmtpSink() as sink:
        settings = fast_settings(
            database_url, temporal_server.address, sink.port, f"crash-{uuid.uuid4()}",
            retry_initial_interval_seconds=0.5,
            retry_maximum_interval_seconds=2,
            send_timeout_seconds=5,  # how long a send held by the dead worker waits before another takes it
        )
        first = start_worker(settings, tmp_path / "worker-1.log")
        second = None
        try:
            async with ApiProcess(settings, tmp_path / "api.log") as api:
                async with httpx.AsyncClient(base_url=api.url, headers=AUTH, timeout=30) as http:
                    limit = asyncio.Semaphore(10)
                    tag = uuid.uuid4().hex[:8]

                    async def post(i: int) -> str:
                        async with limit:
                            body = {"to": [f"crash{i}@example.com"], "subject": f"#{i}", "text": "x"}
                            r = await post_email(http, body, f"crash-{tag}-{i}")
                            assert r.status_code == 202, r.text
                            return r.json()["id"]

                    posting = asyncio.gather(*(post(i) for i in range(BATCH)))
                    # Kill it mid-batch, with sends in flight.
                    await eventually(lambda: len(sink.messages) >= 15, timeout=EMAIL_SETTLES, interval=0.01,
                                     progress=lambda: len(sink.messages), what="the batch never got going")
                    first.send_signal(signal.SIGKILL)
                    killed_at, killed_wall, delivered_before_kill = time.monotonic(), time.time(), len(sink.messages)
                    ids = await posting
                    second = start_worker(settings, tmp_path / "worker-2.log")

                    def missing() -> list[str]:
                        got = {str(m.message["Message-ID"]) for m in sink.messages}
                        return [i for i in ids if not any(i in mid for mid in got)]

                    # Sends the dead worker held go to the new one after send_timeout_seconds.
                    await eventually(lambda: not missing(), timeout=settings.send_timeout_seconds + EMAIL_SETTLES, interval=0.2,
                                     progress=lambda: len(sink.messages), what=lambda: f"{len(missing())} emails never delivered after the crash")
                    recovered_in = time.monotonic() - killed_at
                    got = Counter(str(m.message["Message-ID"]) for m in sink.messages)

                    statuses: Counter[str] = Counter()

                    async def all_recorded() -> bool:
                        statuses.clear()
                        statuses.update([(await http.get(f"/v1/emails/{i}")).json()["status"] for i in ids])
                        return statuses == {"sent": BATCH}

                    await eventually(all_recorded, timeout=EMAIL_SETTLES, interval=0.2, what=lambda: f"records: {statuses}")
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    proc.wait(15)

    assert len(got) == BATCH, "each email has its own Message-ID"
    assert statuses == {"sent": BATCH}, statuses
    duplicates = sum(n - 1 for n in got.values())
    report = {
        "emails": BATCH,
        "delivered_before_kill": delivered_before_kill,
        "distinct_message_ids": len(got),
        "messages_received": len(sink.messages),
        "duplicates": duplicates,
        "all_delivered_seconds_after_kill": round(recovered_in, 1),
    }
    with capsys.disabled():
        print(f"\ncrash test report: {json.dumps(report)}")
    # SMTP has no idempotency: a send the dead worker had in flight may go out twice (same
    # Message-ID, so receivers can drop it). Any other duplicate is a bug: every duplicated
    # email must have had its first copy accepted before the kill, or just after it: bytes the
    # worker had already written reach the sink (a thread of this busy process) a moment later.
    # A second's grace against a recovery that takes about ten.
    first_copy: dict[str, float] = {}
    for m in sink.messages:
        mid = str(m.message["Message-ID"])
        first_copy[mid] = min(first_copy.get(mid, m.received_at), m.received_at)
    late = [mid for mid, n in got.items() if n > 1 and first_copy[mid] > killed_wall + 1.0]
    assert not late, f"duplicates not explained by the kill: {late}"
    assert all(n <= 2 for n in got.values()), report
