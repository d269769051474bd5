"""Outbound webhooks (issue 14, item 2): signed deliveries of every event, in order, retried through
outages, disabled after the disable window, redelivered on request; through the real API process, a
real worker (the webhook task queue), real Temporal, the real SMTP sink, and a local receiver that
verifies every POST with the `standardwebhooks` library."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf import json_format
from sqlmodel import col, select
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowExecutionStatus

from api.app import create_app
from mailqueue import webhooks
from mailqueue.events import feed_end
from mailqueue.accounts import new_id
from mailqueue.config import Settings
from mailqueue.crypto import SecretBox
from mailqueue.models import WebhookEndpoint
from devstack.devserver import TemporalDevServer
from devstack.net import free_port
from devstack.supervisor import dev_settings
from tests.dns_stub import DnsStub
from tests.helpers import (
    EMAIL_SETTLES,
    Sender,
    Stack,
    delivered,
    eventually,
    fast_settings,
    new_user,
    running_stack,
    wait_status,
)
from tests.webhook_receiver import WebhookReceiver

# Short waits and retries: a test stack's endpoint retries within a second, and the disable window
# (3 days in production) is long enough for every test here but the one about it.
FAST = {
    "webhook_allow_private": True,
    "webhook_retry_initial_seconds": 0.2,
    "webhook_retry_maximum_seconds": 1.0,
    "webhook_wait_seconds": 2.0,
    "webhook_timeout_seconds": 5.0,
    "webhook_disable_after_seconds": 600.0,
    "webhook_loops_per_run": 5,  # continue-as-new happens within a test, too
    "events_poll_seconds": 0.2,
}


@pytest.fixture(scope="module")
async def stack(
    client: Client, database_url: str, temporal_server: TemporalDevServer, tmp_path_factory: pytest.TempPathFactory,
    dns_stub: DnsStub,
) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("webhooks")
    async with running_stack(client, database_url, temporal_server.address, dns_stub.server, tmp, "hooks", **FAST) as stack:
        yield stack


@pytest.fixture
async def user(stack: Stack, sessions: Any) -> AsyncIterator[Sender]:
    async with new_user(stack, sessions) as sender:
        yield sender


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as r:
        yield r


async def add_endpoint(http: httpx.AsyncClient, receiver: WebhookReceiver, **body: Any) -> dict[str, Any]:
    made = await http.post("/v1/webhooks", json={"url": receiver.url, **body})
    assert made.status_code == 201, made.text
    receiver.secret = made.json()["secret"]
    return made.json()


async def send(user: Sender, n: int, **overrides: Any) -> list[str]:
    """n emails from the user, accepted; their ids in order of acceptance."""
    ids = []
    for i in range(n):
        r = await user.http.post("/v1/emails", json=user.mail(subject=f"hook {i}", **overrides))
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


async def feed(http: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    """The caller's whole feed (GET /v1/events), oldest first."""
    out: list[dict[str, Any]] = []
    after = None
    while True:
        page = (await http.get("/v1/events", params={"limit": 1000, **params, **({"after": after} if after else {})})).json()
        out.extend(page["events"])
        after = page["next"]
        if not page["more"]:
            return out


async def deliveries(http: httpx.AsyncClient, endpoint_id: str) -> list[dict[str, Any]]:
    r = await http.get(f"/v1/webhooks/{endpoint_id}/deliveries", params={"page_size": 100})
    assert r.status_code == 200, r.text
    return r.json()["items"]


# --- delivery -----------------------------------------------------------------------------------


async def test_receiver_down_for_30_s_while_100_emails_are_sent_gets_every_event_once_in_order(
    stack: Stack, user: Sender, receiver: WebhookReceiver,
) -> None:
    hook = await add_endpoint(user.http, receiver)
    receiver.down()
    loop = asyncio.get_running_loop()
    went_down = loop.time()
    ids = await send(user, 100)
    for email_id in ids:
        await wait_status(user.http, email_id, "sent")

    async def refused_attempts() -> bool:
        rows = await deliveries(user.http, hook["id"])
        return any(r["status_code"] is None and "could not be reached" in (r["error"] or "") for r in rows)

    await eventually(refused_attempts, timeout=EMAIL_SETTLES, what="no attempt was made while the receiver was down")
    assert receiver.received == []
    await asyncio.sleep(max(0.0, 30 - (loop.time() - went_down)))  # down for 30 s in all
    receiver.up()

    expected = await feed(user.http)
    assert len(expected) >= 300 and {e["email_id"] for e in expected} == set(ids)  # queued, sending, sent at least

    async def all_arrived() -> bool:
        return len(receiver.verified()) >= len(expected)

    await eventually(
        all_arrived, timeout=EMAIL_SETTLES, progress=lambda: len(receiver.received),
        what=lambda: f"{len(receiver.verified())} of {len(expected)} events arrived",
    )
    got = receiver.verified()
    assert all(r.verified for r in receiver.received), "a POST failed standardwebhooks verification"
    webhook_ids = [r.webhook_id for r in got]
    assert len(webhook_ids) == len(set(webhook_ids)), "an event arrived twice"
    # In feed order, so each email's events in the order they happened, and exactly the owner's feed.
    assert [r.payload["data"]["cursor"] for r in got] == [e["cursor"] for e in expected]
    assert [(r.payload["type"], r.payload["data"]["email_id"]) for r in got] == [(f"email.{e['event']}", e["email_id"]) for e in expected]
    # Nothing already delivered went again: one accepted delivery row per event.
    assert (await user.http.get(f"/v1/webhooks/{hook['id']}")).json()["failing_since"] is None


async def test_a_500_then_200_is_retried_and_both_attempts_are_recorded(stack: Stack, user: Sender, receiver: WebhookReceiver) -> None:
    hook = await add_endpoint(user.http, receiver, event_types=["sent"])
    receiver.script.append(500)
    [email_id] = await send(user, 1)
    await eventually(lambda: receiver.verified(), timeout=EMAIL_SETTLES, what="the event never arrived")
    assert [r.answered for r in receiver.received] == [500, 200]
    first, again = receiver.received
    assert first.webhook_id == again.webhook_id and again.payload["data"]["email_id"] == email_id
    assert again.payload["type"] == "email.sent" and again.payload["data"]["status"] == "sent"

    async def both_recorded() -> list[dict[str, Any]] | None:
        rows = await deliveries(user.http, hook["id"])
        return rows if len(rows) == 2 else None

    rows = await eventually(both_recorded, timeout=EMAIL_SETTLES, what="the attempts were not both recorded")
    # Newest first: the 200 (attempt 2) over the 500 (attempt 1), one event.
    assert [(r["status_code"], r["attempt"], r["redelivery"]) for r in rows] == [(200, 2, False), (500, 1, False)]
    assert rows[0]["event_id"] == rows[1]["event_id"] == first.webhook_id
    assert rows[1]["error"] is None and rows[0]["latency_ms"] is not None


async def test_redeliver_sends_the_same_webhook_id_again_recorded_as_a_redelivery(
    stack: Stack, user: Sender, receiver: WebhookReceiver,
) -> None:
    hook = await add_endpoint(user.http, receiver, event_types=["sent"])
    await send(user, 1)
    await eventually(lambda: receiver.verified(), timeout=EMAIL_SETTLES, what="the event never arrived")
    [row] = await eventually(lambda: deliveries(user.http, hook["id"]), timeout=EMAIL_SETTLES, what="no delivery recorded")
    # Rotated first: the redelivery is signed with the new secret (the old one signs nothing any more).
    rotated = await user.http.post(f"/v1/webhooks/{hook['id']}/rotate-secret")
    assert rotated.status_code == 200 and rotated.json()["secret"] != receiver.secret
    receiver.secret = rotated.json()["secret"]
    r = await user.http.post(f"/v1/webhooks/{hook['id']}/deliveries/{row['id']}/redeliver")
    assert r.status_code == 202, r.text
    assert r.json()["event_id"] == row["event_id"]
    await eventually(lambda: len(receiver.verified()) == 2, timeout=EMAIL_SETTLES, what="the redelivery never arrived")
    assert [x.webhook_id for x in receiver.verified()] == [row["event_id"]] * 2
    assert receiver.verified()[0].body == receiver.verified()[1].body  # the same event, as it was

    async def recorded() -> list[dict[str, Any]] | None:
        rows = await deliveries(user.http, hook["id"])
        return rows if len(rows) == 2 else None

    newest, first = await eventually(recorded, timeout=EMAIL_SETTLES, what="the redelivery was not recorded")
    assert (newest["redelivery"], newest["event_id"], newest["status_code"], newest["attempt"]) == (True, row["event_id"], 200, 1)
    assert first["id"] == row["id"] and not first["redelivery"]
    missing = await user.http.post(f"/v1/webhooks/{hook['id']}/deliveries/{'0' * 36}/redeliver")
    assert missing.status_code == 404


async def test_a_slow_receiver_does_not_hold_up_sending(stack: Stack, user: Sender, receiver: WebhookReceiver) -> None:
    receiver.hold_until_released()
    await add_endpoint(user.http, receiver)
    ids = await send(user, 5)
    await eventually(lambda: receiver.calls >= 1, timeout=EMAIL_SETTLES, what="the first call never reached the receiver")
    for email_id in ids:
        await delivered(stack.sink, email_id)
        await wait_status(user.http, email_id, "sent")
    sent = {e["email_id"] for e in await feed(user.http, type="sent")}
    assert sent == set(ids)
    # Every email went out and says so while the receiver still holds its first call.
    assert receiver.received == [] and not receiver.release.is_set()
    receiver.release.set()
    expected = await feed(user.http)
    await eventually(
        lambda: len({r.webhook_id for r in receiver.verified()}) >= len(expected), timeout=EMAIL_SETTLES,
        progress=lambda: len(receiver.received), what="the held events never arrived",
    )
    # The held calls timed out on our side and were tried again: a receiver may see an event twice
    # (Standard Webhooks' at-least-once); the same webhook-id tells it so. First arrivals, in order:
    firsts = list(dict.fromkeys((r.webhook_id, r.payload["data"]["cursor"]) for r in receiver.verified()))
    assert [cursor for _, cursor in firsts] == [e["cursor"] for e in expected]
    assert len({webhook_id for webhook_id, _ in firsts}) == len(expected)


async def test_delete_stops_the_endpoints_workflow(stack: Stack, user: Sender, receiver: WebhookReceiver, client: Client) -> None:
    hook = await add_endpoint(user.http, receiver)
    handle = client.get_workflow_handle(f"webhook-{hook['id']}")
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    assert (await user.http.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204
    assert (await user.http.get(f"/v1/webhooks/{hook['id']}")).status_code == 404

    async def ended() -> bool:
        return (await client.get_workflow_handle(f"webhook-{hook['id']}").describe()).status != WorkflowExecutionStatus.RUNNING

    await eventually(ended, timeout=EMAIL_SETTLES, what="the endpoint's workflow still runs")
    await send(user, 1)
    await asyncio.sleep(1)  # nothing can arrive: the workflow has ended
    assert receiver.calls == 0


# --- the disable window ---------------------------------------------------------------------------


async def test_an_endpoint_failing_past_the_disable_window_is_disabled_with_the_reason(
    client: Client, database_url: str, temporal_server: TemporalDevServer, tmp_path: Path, dns_stub: DnsStub, sessions: Any,
    receiver: WebhookReceiver,
) -> None:
    settings = FAST | {"webhook_disable_after_seconds": 3.0, "webhook_retry_maximum_seconds": 0.5}
    async with (
        running_stack(client, database_url, temporal_server.address, dns_stub.server, tmp_path, "hooks-off", **settings) as short,
        new_user(short, sessions) as ann,
    ):
        receiver.script.extend([503] * 1000)
        hook = await add_endpoint(ann.http, receiver, event_types=["sent"])
        await send(ann, 1)

        async def disabled() -> dict[str, Any] | None:
            body = (await ann.http.get(f"/v1/webhooks/{hook['id']}")).json()
            return body if body["status"] == "disabled" else None

        body = await eventually(disabled, timeout=EMAIL_SETTLES, what="the endpoint was never disabled")
        assert "failed for 3 s without a delivery" in body["disabled_reason"] and "answered 503" in body["disabled_reason"]
        assert body["disabled_at"] is not None and body["failing_since"] is not None
        rows = await deliveries(ann.http, hook["id"])
        assert len(rows) >= 2 and all(r["status_code"] == 503 for r in rows)
        assert [r["attempt"] for r in rows] == list(range(len(rows), 0, -1))
        history = await client.get_workflow_handle(f"webhook-{hook['id']}").fetch_history()
        assert any(
            e.HasField("activity_task_scheduled_event_attributes") and e.activity_task_scheduled_event_attributes.activity_type.name == "webhook_disable"
            for e in history.events
        )
        assert (await client.get_workflow_handle(f"webhook-{hook['id']}").describe()).status == WorkflowExecutionStatus.COMPLETED
        answered = len(receiver.received)
        await send(ann, 1)
        await asyncio.sleep(1)
        assert len(receiver.received) == answered  # disabled: nothing more is sent

        # Enabled again (the receiver fixed): what it missed arrives, in order — the event it failed
        # on first, then the one sent while it was disabled.
        receiver.script.clear()
        enabled = await ann.http.post(f"/v1/webhooks/{hook['id']}/enable")
        assert enabled.status_code == 200, enabled.text
        assert (enabled.json()["status"], enabled.json()["disabled_reason"]) == ("active", None)
        missed = (await ann.http.get("/v1/events", params={"type": "sent"})).json()["events"]
        assert len(missed) == 2

        async def arrived() -> list[str] | None:
            cursors = list(dict.fromkeys(r.payload["data"]["cursor"] for r in receiver.verified()))
            return cursors if len(cursors) >= len(missed) else None

        assert await eventually(arrived, timeout=EMAIL_SETTLES, what="the missed events never arrived") == [e["cursor"] for e in missed]
        assert (await ann.http.post(f"/v1/webhooks/{hook['id']}/enable")).json()["status"] == "active"  # again: unchanged
        log = (tmp_path / "api.log").read_text()
        assert receiver.secret is not None and receiver.secret not in log


# --- the API's rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://example.com/hook", "http:// or https://"),
        ("https://user:pw@example.com/hook", "credentials"),
        ("https://", "no host"),
        ("not a url", "spaces"),
    ],
)
async def test_a_url_that_is_not_http_is_refused(stack: Stack, user: Sender, url: str, says: str) -> None:
    r = await user.http.post("/v1/webhooks", json={"url": url})
    assert r.status_code == 422 and says in r.text, r.text


async def test_an_unknown_event_type_is_refused(stack: Stack, user: Sender) -> None:
    r = await user.http.post("/v1/webhooks", json={"url": "https://example.com/hook", "event_types": ["sent", "exploded"]})
    assert r.status_code == 422 and "exploded" in r.text
    assert (await user.http.get("/v1/webhooks")).json()["total"] == 0


async def test_private_urls_are_refused_without_the_setting(
    database_url: str, temporal_server: TemporalDevServer, dns_stub: DnsStub, stack: Stack, user: Sender, receiver: WebhookReceiver,
) -> None:
    """The stacks here allow private URLs (as `make dev` does); an API without the setting refuses them, saying which rule."""
    strict = fast_settings(
        database_url, temporal_server.address, 1, stack.settings.task_queue, dns_servers=[dns_stub.server], egress_allow=[],
    )
    assert not strict.webhook_allow_private
    app = create_app(strict)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api", headers={"Authorization": f"Bearer {user.key}"},
    ) as http:
        for url, rule in [
            (receiver.url, "loopback"), ("http://10.1.2.3/hook", "private"), ("http://169.254.169.254/latest", "metadata"),
            ("http://[fe80::1]/hook", "link-local"), ("http://localhost/hook", "local name"),
        ]:
            r = await http.post("/v1/webhooks", json={"url": url})
            assert r.status_code == 422 and rule in r.text, (url, r.text)
        r = await http.post("/v1/webhooks", json={"url": "https://93.184.215.14:8443/hook"})
        assert r.status_code == 422 and "port 8443" in r.text
    # Allowed with the setting (this module's stack): made, and its workflow running.
    await add_endpoint(user.http, receiver)


async def test_another_users_endpoint_is_not_found(stack: Stack, sessions: Any, user: Sender, receiver: WebhookReceiver) -> None:
    hook = await add_endpoint(user.http, receiver)
    async with new_user(stack, sessions) as other:
        base = f"/v1/webhooks/{hook['id']}"
        for method, path in [
            ("GET", base), ("DELETE", base), ("POST", f"{base}/rotate-secret"), ("GET", f"{base}/deliveries"),
            ("POST", f"{base}/deliveries/{'0' * 36}/redeliver"),
        ]:
            assert (await other.http.request(method, path)).status_code == 404, (method, path)
        assert (await other.http.get("/v1/webhooks")).json()["items"] == []
        assert (await other.http.get("/v1/webhooks", params={"user_id": user.id})).status_code == 404
    # An admin sees it.
    assert (await stack.http.get(base)).status_code == 200
    assert hook["id"] in {h["id"] for h in (await stack.http.get("/v1/webhooks", params={"user_id": user.id})).json()["items"]}
    assert (await user.http.get(base)).json()["id"] == hook["id"]


def _payloads(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("metadata"), dict) and "encoding" in node["metadata"]:
            yield node
        for value in node.values():
            yield from _payloads(value)
    elif isinstance(node, list):
        for value in node:
            yield from _payloads(value)


async def test_the_secret_is_shown_once_and_never_again(
    stack: Stack, user: Sender, receiver: WebhookReceiver, client: Client, caplog: pytest.LogCaptureFixture,
) -> None:
    hook = await add_endpoint(user.http, receiver)
    secret = hook["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    await send(user, 1)
    await eventually(lambda: len(receiver.verified()) >= 3, timeout=EMAIL_SETTLES, what="the events never arrived")
    rotated = (await user.http.post(f"/v1/webhooks/{hook['id']}/rotate-secret")).json()["secret"]
    seen = [
        (await user.http.get(f"/v1/webhooks/{hook['id']}")).text, (await user.http.get("/v1/webhooks")).text,
        (await stack.http.get("/v1/webhooks")).text, (await user.http.get(f"/v1/webhooks/{hook['id']}/deliveries")).text,
        (stack.tmp / "api.log").read_text(), caplog.text,  # the API's log, and the in-process worker's
    ]
    handle = client.get_workflow_handle(f"webhook-{hook['id']}")
    raw = json.loads((await handle.fetch_history()).to_json())
    encoded = [json_format.ParseDict(p, Payload()) for p in _payloads(raw)]
    assert encoded, "the history holds no payloads"
    decoded = await client.data_converter.payload_codec.decode(encoded) if client.data_converter.payload_codec else encoded
    seen.append(json.dumps(raw))
    seen.extend(p.data.decode("utf-8", "replace") for p in decoded)
    assert any(hook["id"] in text for text in seen[-len(decoded):]), "the decoded history does not even name the endpoint"
    for value in (secret, secret.removeprefix("whsec_"), rotated, rotated.removeprefix("whsec_")):
        assert not any(value in text for text in seen)


async def test_a_worker_starts_the_workflow_of_an_active_endpoint_that_has_none(
    stack: Stack, user: Sender, receiver: WebhookReceiver, sessions: Any, client: Client,
) -> None:
    """An endpoint whose workflow never started (the API's start lost): the worker's start sweep runs it."""
    receiver.secret = webhooks.new_secret()
    async with sessions() as s:
        row = WebhookEndpoint(
            id=new_id(), owner=f"user:{user.id}", url=receiver.url, event_types=["sent"],
            secret_enc=SecretBox.from_settings(stack.settings).encrypt(receiver.secret), cursor=str(await feed_end(s)),
        )
        s.add(row)
        await s.commit()
    [email_id] = await send(user, 1)
    await wait_status(user.http, email_id, "sent")
    await asyncio.sleep(1)
    assert receiver.calls == 0  # nothing delivers it yet
    assert await webhooks.start_active_endpoints(client, sessions, stack.settings) >= 1
    await eventually(lambda: receiver.verified(), timeout=EMAIL_SETTLES, what="the sweep's workflow delivered nothing")
    assert [r.payload["data"]["email_id"] for r in receiver.verified()] == [email_id]


def test_make_dev_allows_private_webhook_urls_unless_configured(tmp_path: Path) -> None:
    args = argparse.Namespace(
        data_dir=tmp_path, host="127.0.0.1", api_port=8123, temporal_port=7233, ui_port=8233, smtp_port=1025, mail_port=8025,
    )
    assert not Settings(_env_file=None).webhook_allow_private  # type: ignore[call-arg]
    assert dev_settings(args, Settings(_env_file=None)).webhook_allow_private  # type: ignore[call-arg]
    kept = Settings(webhook_allow_private=False, _env_file=None)  # type: ignore[call-arg]
    assert not dev_settings(args, kept).webhook_allow_private


async def test_an_idle_endpoints_cursor_moves_past_events_it_does_not_get(
    stack: Stack, sessions: Any, user: Sender, receiver: WebhookReceiver,
) -> None:
    """Another sender's events: not delivered, but read past once (the cursor moves), and the
    endpoint's own events after them still arrive."""
    hook = await add_endpoint(user.http, receiver)
    async with new_user(stack, sessions) as other:
        [theirs] = await send(other, 1)
        await wait_status(other.http, theirs, "sent")
        after_theirs = (await feed(stack.http))[-1]["cursor"]

    def position(cursor: str) -> tuple[int, int]:
        xid, seq = cursor.split("-")
        return int(xid), int(seq)

    async def moved() -> bool:
        now = (await user.http.get(f"/v1/webhooks/{hook['id']}")).json()["cursor"]
        return position(now) >= position(after_theirs)

    await eventually(moved, timeout=EMAIL_SETTLES, what="the idle endpoint's cursor never moved past the other sender's events")
    assert receiver.calls == 0
    [mine] = await send(user, 1)
    await eventually(
        lambda: {r.payload["data"]["event"] for r in receiver.verified()} >= {"queued", "sent"}, timeout=EMAIL_SETTLES,
        what="the endpoint's own events never arrived",
    )
    assert {r.payload["data"]["email_id"] for r in receiver.verified()} == {mine}


async def test_without_temporal_nothing_is_made(
    database_url: str, dns_stub: DnsStub, stack: Stack, user: Sender, receiver: WebhookReceiver, sessions: Any,
) -> None:
    """An endpoint whose workflow cannot start is not kept (it would get nothing): 503, try again."""
    settings = stack.settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})  # nobody listens
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api", headers={"Authorization": f"Bearer {user.key}"},
    ) as http:
        r = await http.post("/v1/webhooks", json={"url": receiver.url})
        assert r.status_code == 503 and r.headers["Retry-After"], r.text
        assert "whsec_" not in r.text
    async with sessions() as s:
        mine = (await s.exec(select(WebhookEndpoint).where(col(WebhookEndpoint.owner) == f"user:{user.id}"))).all()
    assert mine == []
