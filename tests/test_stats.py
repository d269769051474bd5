"""GET /v1/stats: counts, queue depth, throughput and stuck emails, per caller."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from mailqueue.models import Email
from tests.helpers import EMAIL_SETTLES, Stack, email, eventually, verify_domain, wait_status


async def test_stats_count_the_callers_emails_and_find_the_stuck_ones(stack: Stack, sessions: Any) -> None:
    made = (await stack.http.post("/v1/users", json={"name": f"stats-{os.urandom(3).hex()}"})).json()
    key = (await stack.http.post(f"/v1/users/{made['id']}/api-keys")).json()["key"]
    await verify_domain(sessions, made["id"], "example.org")  # users send from their verified domains
    mine = {"from": "stats@example.org"}
    async with httpx.AsyncClient(base_url=str(stack.http.base_url), headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        empty = (await http.get("/v1/stats")).json()
        assert empty["by_status"] == {} and empty["queue_depth"] == 0 and empty["stuck"] == 0

        sent = [(await http.post("/v1/emails", json=email(**mine))).json()["id"] for _ in range(2)]
        for email_id in sent:
            await wait_status(http, email_id, "sent")
        later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
        scheduled = (await http.post("/v1/emails", json=email(send_at=later, **mine))).json()["id"]
        stuck = (await http.post("/v1/emails", json=email(send_at=later, **mine))).json()["id"]

        async def scheduled_recorded() -> bool:  # the workflow's own `scheduled` step must land before we tamper with the record
            return "scheduled" in [e["event"] for e in (await http.get(f"/v1/emails/{stuck}")).json()["events"]]

        await eventually(scheduled_recorded, timeout=EMAIL_SETTLES, what="the workflow never recorded `scheduled`")
        async with sessions() as s:  # as if its worker died mid-send long ago, and nothing noticed
            row = await s.get(Email, stuck)
            assert row is not None
            row.status, row.updated_at = "sending", datetime.now(UTC) - timedelta(minutes=10)
            s.add(row)
            await s.commit()

        got = (await http.get("/v1/stats")).json()
        assert got["by_status"] == {"sent": 2, "scheduled": 1, "sending": 1}
        assert got["queue_depth"] == 2 and got["sent_last_minute"] == 2 and got["sent_last_hour"] == 2
        assert got["stuck"] == 1 and [e["id"] for e in got["stuck_examples"]] == [stuck]
        assert got["oldest_in_flight_seconds"] is not None and got["oldest_in_flight_seconds"] >= 0
        assert (await http.get("/v1/stats", params={"stuck_after_seconds": 3600})).json()["stuck"] == 0
        assert (await http.get("/v1/stats", params={"stuck_after_seconds": 0})).status_code == 422
        await http.post(f"/v1/emails/{scheduled}/cancel", json={})

    everyone = (await stack.http.get("/v1/stats")).json()  # the admin sees all senders
    assert everyone["by_status"].get("sent", 0) >= 2 and everyone["stuck"] >= 1
