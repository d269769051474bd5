"""The kill switch and the flags that turn features off: accepted mail waits (`paused`), is never
lost and never failed, and goes out exactly once when sending resumes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio.client import Client

from tests.conftest import DnsStub, TemporalDevServer
from tests.fake_providers import FakeMailgun
from tests.helpers import Sender, SmtpSink, Stack, email, eventually, new_user, running_stack, wait_status

MAILGUN_KEY = "key-kill-switch-test"
MAILGUN_DOMAIN = "mg.kill.example"


@pytest.fixture(scope="module")
async def ks(
    client: Client, database_url: str, temporal_server: TemporalDevServer, tmp_path_factory: pytest.TempPathFactory,
    dns_stub: DnsStub,
) -> AsyncIterator[tuple[Stack, FakeMailgun, SmtpSink]]:
    with FakeMailgun(MAILGUN_KEY, MAILGUN_DOMAIN) as mailgun, SmtpSink() as relay:
        async with running_stack(
            client, database_url, temporal_server.address, dns_stub.server, tmp_path_factory.mktemp("ks"), "ks",
            mailgun_base_url=mailgun.url, flags_refresh_seconds=1,
        ) as stack:
            yield stack, mailgun, relay


async def flag(stack: Stack, key: str, enabled: bool, reason: str = "test", **more: Any) -> None:
    """Set a flag through the API; then the worker's cache has it (it would within a refresh; the
    tests do not wait on time)."""
    got = await stack.http.put(f"/v1/flags/{key}", json={"enabled": enabled, "reason": reason, **more})
    assert got.status_code == 200, got.text
    await stack.workers.flags.refresh()


def caught_ids(sink: SmtpSink) -> list[str]:
    return [str(m.message["Message-ID"]) for m in sink.messages]


async def events(stack: Stack, email_id: str) -> list[str]:
    return [e["event"] for e in (await stack.http.get(f"/v1/emails/{email_id}")).json()["events"]]


async def test_paused_mail_waits_can_be_cancelled_and_goes_out_once_on_resume(ks: tuple[Stack, FakeMailgun, SmtpSink]) -> None:
    stack = ks[0]
    await flag(stack, "sending.paused", True, "incident 42")
    try:
        ids = []
        for i in range(6):
            got = await stack.http.post("/v1/emails", json=email(subject=f"held {i}"))
            assert got.status_code == 202, got.text  # still accepted while paused
            ids.append(got.json()["id"])
        for email_id in ids:
            record = await wait_status(stack.http, email_id, "paused")
            assert "sending is paused" in record["events"][-1]["detail"]
        cancelled = await stack.http.post(f"/v1/emails/{ids[0]}/cancel", json={"reason": "not needed any more"})
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        stats = (await stack.http.get("/v1/stats")).json()
        assert stats["by_status"].get("paused", 0) >= 5 and not [s for s in stats["stuck_examples"] if s["id"] in ids]
        assert not [m for m in caught_ids(stack.sink) if any(i in m for i in ids)]  # nothing went out while paused
    finally:
        await flag(stack, "sending.paused", False, "incident 42 over")
    for email_id in ids[1:]:
        await wait_status(stack.http, email_id, "sent")
        assert await events(stack, email_id) == ["queued", "paused", "sending", "sent"]
    sent = [m for m in caught_ids(stack.sink) if any(i in m for i in ids)]
    assert len(sent) == len(set(sent)) == 5  # each once; the cancelled one never
    assert (await stack.http.get(f"/v1/emails/{ids[0]}")).json()["status"] == "cancelled"


async def test_a_scheduled_email_due_while_paused_waits_too(ks: tuple[Stack, FakeMailgun, SmtpSink]) -> None:
    stack = ks[0]
    got = await stack.http.post("/v1/emails", json=email(send_at=(datetime.now(UTC) + timedelta(seconds=4)).isoformat()))
    email_id = got.json()["id"]
    await flag(stack, "sending.paused", True)
    try:
        await wait_status(stack.http, email_id, "paused")
    finally:
        await flag(stack, "sending.paused", False)
    await wait_status(stack.http, email_id, "sent")
    assert await events(stack, email_id) == ["queued", "scheduled", "paused", "sending", "sent"]


@pytest.fixture
async def mailgun_user(ks: tuple[Stack, FakeMailgun, SmtpSink], sessions: Any) -> AsyncIterator[Sender]:
    async with new_user(ks[0], sessions) as user:
        put = await user.http.put("/v1/settings/mail", json={"driver": "mailgun", "api_key": MAILGUN_KEY, "mailgun_domain": MAILGUN_DOMAIN})
        assert put.status_code == 200, put.text
        yield user


async def test_a_driver_turned_off_pauses_only_its_own_emails(ks: tuple[Stack, FakeMailgun, SmtpSink], mailgun_user: Sender) -> None:
    stack, mailgun, _ = ks
    await flag(stack, "driver.mailgun.enabled", False, "provider outage")
    try:
        held = (await mailgun_user.http.post("/v1/emails", json=mailgun_user.mail(subject="via mailgun"))).json()["id"]
        system = (await stack.http.post("/v1/emails", json=email(subject="via the relay"))).json()["id"]
        await wait_status(stack.http, system, "sent")  # the system's SMTP driver goes on
        record = await wait_status(stack.http, held, "paused")
        assert "mailgun driver is turned off" in record["events"][-1]["detail"]
        assert not [r for r in mailgun.received if r.mime is not None and held in str(r.mime["Message-ID"])]
    finally:
        await flag(stack, "driver.mailgun.enabled", True, "provider back")
    await wait_status(stack.http, held, "sent")
    await eventually(lambda: [r for r in mailgun.received if r.mime is not None and held in str(r.mime["Message-ID"])],
                     timeout=30, what="the held email never reached Mailgun")


async def test_users_own_smtp_turned_off_pauses_their_mail(ks: tuple[Stack, FakeMailgun, SmtpSink], sessions: Any) -> None:
    stack, _, relay = ks
    async with new_user(stack, sessions) as user:
        put = await user.http.put("/v1/settings/mail", json={
            "driver": "user_smtp", "smtp_host": "localhost", "smtp_port": relay.port, "smtp_security": "none",
        })
        assert put.status_code == 200, put.text
        await flag(stack, "user_smtp.enabled", False)
        try:
            held = (await user.http.post("/v1/emails", json=user.mail())).json()["id"]
            record = await wait_status(stack.http, held, "paused")
            assert "own SMTP" in record["events"][-1]["detail"]
        finally:
            await flag(stack, "user_smtp.enabled", True)
        await wait_status(stack.http, held, "sent")
        assert [m for m in caught_ids(relay) if held in m]


async def test_templates_and_scheduling_turned_off_refuse_new_mail_and_send_what_was_queued(
    ks: tuple[Stack, FakeMailgun, SmtpSink],
) -> None:
    stack = ks[0]
    later = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    queued = (await stack.http.post("/v1/emails", json=email(send_at=later))).json()["id"]
    await flag(stack, "scheduling.enabled", False)
    await flag(stack, "templates.enabled", False)
    try:
        refused = await stack.http.post("/v1/emails", json=email(send_at=later))
        assert refused.status_code == 503 and "scheduling.enabled" in refused.text
        templated = await stack.http.post("/v1/emails", json={"to": ["ann@example.com"], "template": "PasswordReset", "template_data": {}})
        assert templated.status_code == 503 and "templates.enabled" in templated.text
        batch = await stack.http.post("/v1/emails/batch", json={"emails": [email(send_at=later), email()]})
        assert [i["status"] for i in batch.json()["items"]] == [503, 202]
        assert (await stack.http.post("/v1/emails", json=email())).status_code == 202  # the rest goes on
        await wait_status(stack.http, queued, "sent")  # accepted before: sent at its time, never failed
    finally:
        await flag(stack, "scheduling.enabled", True)
        await flag(stack, "templates.enabled", True)
    assert (await stack.http.post("/v1/emails", json=email(send_at=later))).status_code == 202


async def test_flags_change_nothing_for_another_senders_rollout(ks: tuple[Stack, FakeMailgun, SmtpSink], sessions: Any) -> None:
    """Pausing targets senders: a pause for one user holds only that user's mail."""
    stack = ks[0]
    async with new_user(stack, sessions) as ann, new_user(stack, sessions) as bob:
        await flag(stack, "sending.paused", False, "ann's mail is on hold", senders=[f"user:{ann.id}"])
        try:
            held = (await ann.http.post("/v1/emails", json=ann.mail())).json()["id"]
            free = (await bob.http.post("/v1/emails", json=bob.mail(subject=f"bob {uuid.uuid4().hex[:6]}"))).json()["id"]
            await wait_status(stack.http, free, "sent")
            await wait_status(stack.http, held, "paused")
        finally:
            await flag(stack, "sending.paused", False)
        await wait_status(stack.http, held, "sent")
