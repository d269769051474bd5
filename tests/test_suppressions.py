"""Suppressions and one-click unsubscribe (issue 14, items 4 and 5), through the real API process,
a real worker and the real SMTP sink."""

from __future__ import annotations

import argparse
import base64
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client
from temporalio.service import RPCError

from api.app import create_app
from devstack.devserver import TemporalDevServer
from devstack.net import free_port
from devstack.supervisor import dev_settings
from mailqueue import search
from mailqueue.config import Settings
from mailqueue.contracts import workflow_id_for
from mailqueue.crypto import new_key
from mailqueue.suppressions import BadToken, Unsubscribe, UnsubscribeTokens, match_key
from tests.dns_stub import DnsStub
from tests.helpers import (
    AUTH,
    ApiProcess,
    Sender,
    Stack,
    closed_run,
    delivered,
    fast_settings,
    new_user,
    running_stack,
    wait_status,
)

PUBLIC_URL = "https://mail.example.test"
LINK = re.compile(r"^<https://mail\.example\.test/u/([A-Za-z0-9_-]{40,})>$")


@pytest.fixture(scope="module")
async def stack(
    client: Client, database_url: str, temporal_server: TemporalDevServer, tmp_path_factory: pytest.TempPathFactory,
    dns_stub: DnsStub,
) -> AsyncIterator[Stack]:
    """The shared test stack, with a public URL for unsubscribe links."""
    tmp = tmp_path_factory.mktemp("suppressions")
    async with running_stack(
        client, database_url, temporal_server.address, dns_stub.server, tmp, "suppress", public_url=PUBLIC_URL,
    ) as stack:
        yield stack


@pytest.fixture
async def user(stack: Stack, sessions: Any) -> AsyncIterator[Sender]:
    async with new_user(stack, sessions) as sender:
        yield sender


def _rcpts(stack: Stack, email_id: str) -> list[str]:
    return [r for m in stack.sink.messages if email_id in str(m.message["Message-ID"]) for r in m.rcpt_tos]


async def _never_started(client: Client, email_id: str) -> bool:
    """No workflow was ever started for the email: nothing can send it, now or later."""
    try:
        await client.get_workflow_handle(workflow_id_for(email_id)).describe()
    except RPCError as exc:
        return "not found" in exc.message.lower()
    return False


# --- the API -----------------------------------------------------------------------------------


async def test_add_list_filter_page_and_remove(user: Sender) -> None:
    http = user.http
    first = await http.post("/v1/suppressions", json={"address": "Ann <ann@Example.ORG>"})
    assert first.status_code == 201, first.text
    assert first.json() | {"created_at": None} == {
        "address": "ann@example.org", "reason": "manual", "source": "api", "sender": f"user:{user.id}", "created_at": None,
    }
    # The domain matches in any case: the same entry, unchanged, with 200.
    again = await http.post("/v1/suppressions", json={"address": "ann@EXAMPLE.org", "reason": "complaint"})
    assert again.status_code == 200 and again.json() == first.json()
    for address, reason in (("bob@example.org", "hard_bounce"), ("carol@example.org", "complaint")):
        assert (await http.post("/v1/suppressions", json={"address": address, "reason": reason})).status_code == 201

    page1 = (await http.get("/v1/suppressions", params={"page_size": 2})).json()
    page2 = (await http.get("/v1/suppressions", params={"page_size": 2, "page": 2})).json()
    assert page1["total"] == page2["total"] == 3
    listed = [i["address"] for i in page1["items"] + page2["items"]]
    assert listed == ["carol@example.org", "bob@example.org", "ann@example.org"]  # newest first
    bounced = (await http.get("/v1/suppressions", params={"reason": "hard_bounce"})).json()
    assert [i["address"] for i in bounced["items"]] == ["bob@example.org"]
    one = (await http.get("/v1/suppressions", params={"address": "Bob <bob@EXAMPLE.ORG>"})).json()
    assert one["total"] == 1 and one["items"][0]["reason"] == "hard_bounce"

    assert (await http.delete("/v1/suppressions/ann@EXAMPLE.org")).status_code == 204
    assert (await http.delete("/v1/suppressions/ann@example.org")).status_code == 404
    assert (await http.get("/v1/suppressions")).json()["total"] == 2

    for bad in ({"address": "not an address"}, {"address": "a@example.org", "reason": "because"}, {"address": "a@example.org", "x": 1}):
        assert (await http.post("/v1/suppressions", json=bad)).status_code == 422, bad
    for bad_address in ("nope", "", " "):
        assert (await http.get("/v1/suppressions", params={"address": bad_address})).status_code == 422
    assert (await http.get("/v1/suppressions", params={"reason": "nope"})).status_code == 422


async def test_each_sender_sees_only_its_own_list_and_admins_any(stack: Stack, sessions: Any, user: Sender) -> None:
    assert (await user.http.post("/v1/suppressions", json={"address": "dave@example.org"})).status_code == 201
    async with new_user(stack, sessions) as other:
        assert (await other.http.get("/v1/suppressions")).json()["total"] == 0
        assert (await other.http.get("/v1/suppressions", params={"user_id": user.id})).status_code == 404
        assert (await other.http.delete("/v1/suppressions/dave@example.org")).status_code == 404
        assert (await other.http.delete("/v1/suppressions/dave@example.org", params={"user_id": user.id})).status_code == 404
        refused = await other.http.post("/v1/suppressions", json={"address": "eve@example.org", "user_id": user.id})
        assert refused.status_code == 404
    # The bootstrap key's own list is the system's: not the user's.
    system = (await stack.http.get("/v1/suppressions", params={"address": "dave@example.org"})).json()
    assert system["total"] == 0
    theirs = (await stack.http.get("/v1/suppressions", params={"user_id": user.id})).json()
    assert [i["address"] for i in theirs["items"]] == ["dave@example.org"]
    added = await stack.http.post("/v1/suppressions", json={"address": "frank@example.org", "user_id": user.id})
    assert added.status_code == 201 and added.json()["sender"] == f"user:{user.id}"
    assert (await user.http.get("/v1/suppressions")).json()["total"] == 2
    assert (await stack.http.delete("/v1/suppressions/frank@example.org", params={"user_id": user.id})).status_code == 204
    assert (await user.http.get("/v1/suppressions")).json()["total"] == 1


# --- suppressed recipients are not mailed --------------------------------------------------------


async def test_the_door_drops_suppressed_recipients_and_sends_to_the_rest(stack: Stack, user: Sender) -> None:
    assert (await user.http.post("/v1/suppressions", json={"address": "bob@EXAMPLE.com", "reason": "hard_bounce"})).status_code == 201
    r = await user.http.post("/v1/emails", json=user.mail(to=["Bob <bob@example.com>"], cc=["carol@example.com"]))
    assert r.status_code == 202, r.text
    email_id = r.json()["id"]
    done = await wait_status(user.http, email_id, "sent")
    await delivered(stack.sink, email_id)
    assert _rcpts(stack, email_id) == ["carol@example.com"]
    assert done["to"] == ["Bob <bob@example.com>"]  # the record keeps what was asked for
    dropped = [e for e in done["events"] if e["event"] == "suppressed"]
    assert [(e["status"], e["detail"]) for e in dropped] == [(None, "1 recipient suppressed (hard_bounce)")]


async def test_an_email_to_suppressed_recipients_only_ends_suppressed_unsent(stack: Stack, client: Client, user: Sender) -> None:
    for address in ("gina@example.com", "hal@example.com"):
        assert (await user.http.post("/v1/suppressions", json={"address": address})).status_code == 201
    r = await user.http.post("/v1/emails", json=user.mail(to=["gina@example.com"], bcc=["hal@Example.com"]))
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "suppressed"
    email_id = r.json()["id"]
    record = (await user.http.get(f"/v1/emails/{email_id}")).json()
    assert record["status"] == "suppressed"
    assert sorted((e["event"], e["status"], e["detail"]) for e in record["events"]) == [
        ("queued", "queued", "accepted"), ("suppressed", "suppressed", "2 recipients suppressed (manual); nothing to send"),
    ]
    assert await _never_started(client, email_id)
    assert _rcpts(stack, email_id) == []
    assert (await user.http.post(f"/v1/emails/{email_id}/cancel")).status_code == 409
    assert (await user.http.post(f"/v1/emails/{email_id}/retry")).status_code == 409


async def test_suppressions_are_per_sender(stack: Stack, sessions: Any, user: Sender) -> None:
    assert (await user.http.post("/v1/suppressions", json={"address": "ivy@example.com"})).status_code == 201
    async with new_user(stack, sessions) as other:
        r = await other.http.post("/v1/emails", json=other.mail(to=["ivy@example.com"]))
        assert r.status_code == 202 and r.json()["status"] == "queued"
        await wait_status(other.http, r.json()["id"], "sent")
        assert _rcpts(stack, r.json()["id"]) == ["ivy@example.com"]


async def test_suppressed_while_scheduled_is_not_sent(stack: Stack, client: Client, user: Sender) -> None:
    send_at = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    r = await user.http.post("/v1/emails", json=user.mail(to=["jack@example.com"], cc=["kim@example.com"], send_at=send_at))
    alone = await user.http.post("/v1/emails", json=user.mail(to=["jack@example.com"], send_at=send_at))
    assert r.status_code == alone.status_code == 202 and r.json()["status"] == alone.json()["status"] == "scheduled"
    assert (await user.http.post("/v1/suppressions", json={"address": "jack@EXAMPLE.COM", "reason": "complaint"})).status_code == 201

    partly = await wait_status(user.http, r.json()["id"], "sent")
    assert _rcpts(stack, r.json()["id"]) == ["kim@example.com"]
    assert [e["detail"] for e in partly["events"] if e["event"] == "suppressed"] == [
        "1 recipient suppressed (complaint) since the email was accepted"
    ]

    email_id = alone.json()["id"]
    await closed_run(client, email_id)  # its run has ended: nothing of it can be sent any more
    record = (await user.http.get(f"/v1/emails/{email_id}")).json()
    assert record["status"] == "suppressed" and record["sent_at"] is None
    assert ("suppressed", "suppressed", "1 recipient suppressed (complaint); nothing sent") in [
        (e["event"], e["status"], e["detail"]) for e in record["events"]
    ]
    assert _rcpts(stack, email_id) == []
    # The workflow says so too (patch send-honours-suppressions): its answer and the Temporal UI's EmailStatus.
    handle = client.get_workflow_handle(workflow_id_for(email_id))
    assert (await handle.result())["status"] == "suppressed"
    assert (await handle.describe()).typed_search_attributes.get(search.STATUS) == "suppressed"


# --- one-click unsubscribe ---------------------------------------------------------------------


async def test_one_click_unsubscribe_end_to_end(stack: Stack, user: Sender) -> None:
    r = await user.http.post("/v1/emails", json=user.mail(to=["Lea <lea@example.com>"], category="marketing"))
    assert r.status_code == 202, r.text
    email_id = r.json()["id"]
    await wait_status(user.http, email_id, "sent")
    (caught,) = await delivered(stack.sink, email_id)
    link = LINK.match(str(caught.message["List-Unsubscribe"]))
    assert link, caught.message["List-Unsubscribe"]
    assert caught.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    token = link[1]

    async with httpx.AsyncClient(base_url=str(stack.http.base_url), timeout=30) as anyone:  # no API key
        page = await anyone.get(f"/u/{token}")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<form method="post">' in page.text and "<button" in page.text
        assert (await user.http.get("/v1/suppressions", params={"address": "lea@example.com"})).json()["total"] == 0

        for _ in range(2):  # a mail client's one-click POST; the second changes nothing
            done = await anyone.post(
                f"/u/{token}", content="List-Unsubscribe=One-Click", headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            assert done.status_code == 200, done.text
    listed = (await user.http.get("/v1/suppressions", params={"address": "lea@example.com"})).json()
    assert [(i["address"], i["reason"], i["source"]) for i in listed["items"]] == [("lea@example.com", "unsubscribe", "unsubscribe link")]

    again = await user.http.post("/v1/emails", json=user.mail(to=["lea@example.com"], category="marketing"))
    assert again.status_code == 202 and again.json()["status"] == "suppressed"


async def test_an_email_without_a_category_has_no_unsubscribe_link(stack: Stack, user: Sender) -> None:
    r = await user.http.post("/v1/emails", json=user.mail(to=["max@example.com"], category="receipts"))
    assert r.status_code == 202, r.text
    (caught,) = await delivered(stack.sink, r.json()["id"])
    assert caught.message["List-Unsubscribe"] is None
    flagged = await user.http.post("/v1/emails", json=user.mail(to=["max@example.com"], unsubscribe=True))
    (caught,) = await delivered(stack.sink, flagged.json()["id"])
    assert LINK.match(str(caught.message["List-Unsubscribe"]))


async def test_bad_unsubscribe_requests_are_refused(stack: Stack, user: Sender) -> None:
    several = await user.http.post("/v1/emails", json=user.mail(to=["a@example.com", "b@example.com"], unsubscribe=True))
    assert several.status_code == 422 and "exactly one recipient" in several.text
    cc = await user.http.post("/v1/emails", json=user.mail(to=["a@example.com"], cc=["b@example.com"], category="marketing"))
    assert cc.status_code == 422
    both = await user.http.post(
        "/v1/emails", json=user.mail(to=["a@example.com"], unsubscribe=True, headers={"List-Unsubscribe": "<https://x.example/u>"}),
    )
    assert both.status_code == 422 and "not both" in both.text
    assert (await user.http.post("/v1/emails", json=user.mail(category="bad category"))).status_code == 422

    r = await user.http.post("/v1/emails", json=user.mail(to=["nia@example.com"], unsubscribe=True))
    (caught,) = await delivered(stack.sink, r.json()["id"])
    token = LINK.match(str(caught.message["List-Unsubscribe"]))[1]  # type: ignore[index]
    tampered = token[:30] + ("A" if token[30] != "A" else "B") + token[31:]
    async with httpx.AsyncClient(base_url=str(stack.http.base_url), timeout=30) as anyone:
        for bad in (tampered, token[:-4], "x", "a" * 5000, "%C3%A9t%C3%A9", "..%2F..", "bad=token"):
            for method in ("GET", "POST"):
                answer = await anyone.request(method, f"/u/{bad}")
                assert answer.status_code == 404, (method, bad, answer.status_code)
    assert (await user.http.get("/v1/suppressions", params={"address": "nia@example.com"})).json()["total"] == 0


# --- the rules on their own -----------------------------------------------------------------------


def test_addresses_match_on_the_domain_in_any_case_and_the_local_part_as_written() -> None:
    assert match_key("Ann <Ann@Example.ORG>") == match_key("Ann@example.org.") == "Ann@example.org"
    assert match_key("ann@example.org") != match_key("Ann@example.org")
    assert match_key("jo@B\u00fccher.DE") == "jo@xn--bcher-kva.de"
    for bad in ("", "no-at-sign", "@example.org", "a@", "a@localhost"):
        with pytest.raises(ValueError):
            match_key(bad)


def test_tokens_survive_a_key_rotation_and_nothing_else() -> None:
    old, new = new_key(), new_key()
    target = Unsubscribe("user:42", "ann@example.org", "marketing")
    token = UnsubscribeTokens([old]).make(target)
    assert UnsubscribeTokens([new, old]).read(token) == target  # the new key first: old links still work
    with pytest.raises(BadToken):
        UnsubscribeTokens([new]).read(token)  # the old key dropped
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert b"ann@example.org" not in raw and b"user:42" not in raw  # encrypted: no address in a logged URL


def test_make_dev_sets_the_public_url_and_keeps_the_unsubscribe_key_in_the_data_folder(tmp_path: Path) -> None:
    args = argparse.Namespace(
        data_dir=tmp_path, host="127.0.0.1", api_port=8123, temporal_port=7233, ui_port=8233, smtp_port=1025, mail_port=8025,
    )
    dev = dev_settings(args, Settings(_env_file=None))  # type: ignore[call-arg]
    assert dev.public_url == "http://127.0.0.1:8123"
    assert dev.unsubscribe_key_file == tmp_path.resolve() / "unsubscribe.key"
    token = UnsubscribeTokens.from_settings(dev).make(Unsubscribe("system:", "ann@example.org"))
    assert (tmp_path / "unsubscribe.key").exists()
    assert UnsubscribeTokens.from_settings(dev).read(token).address == "ann@example.org"
    kept = Settings(public_url="https://mail.example.org", _env_file=None)  # type: ignore[call-arg]
    assert dev_settings(args, kept).public_url == "https://mail.example.org"


async def test_without_a_public_url_unsubscribe_links_are_refused(stack: Stack) -> None:
    settings = stack.settings.model_copy(update={"public_url": None})
    async with ApiProcess(settings, stack.tmp / "api-no-url.log") as api, httpx.AsyncClient(base_url=api.url, headers=AUTH, timeout=30) as http:
        r = await http.post("/v1/emails", json={"to": ["ann@example.com"], "subject": "Hi", "text": "Hi", "category": "marketing"})
        assert r.status_code == 422 and "MAILQUEUE_PUBLIC_URL" in r.text


async def test_a_bad_unsubscribe_key_stops_the_api_at_start(database_url: str, temporal_server: TemporalDevServer) -> None:
    """Not at the first marketing email (a 500 then): at start, with the setting named."""
    settings = fast_settings(
        database_url, temporal_server.address, free_port(), "unsubscribe-key", public_url="https://mail.example.org",
        unsubscribe_keys="not-a-fernet-key",
    )
    app = create_app(settings)
    with pytest.raises(ValueError, match="Fernet key"):
        async with app.router.lifespan_context(app):
            pass
