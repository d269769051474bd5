"""Users, API keys and isolation; sender settings (encrypted, masked); sending through a user's own SMTP."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from sqlmodel import select

from mailqueue.models import SenderSettings
from devstack.net import free_port
from tests.helpers import ScriptedHandler, Stack, email, eventually, tls_issued_by, trusted_ca, verify_domain, wait_status

PASSWORD = "user-Smtp-passw0rd-9d1f"
ANN_FROM = "Ann <ann@example.org>"  # in Ann's verified domain (example.com is the test stacks' system domain)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[trustme.CA]:
    with trusted_ca(tmp_path_factory.mktemp("ca")) as authority:
        yield authority


@pytest.fixture(scope="module")
def user_smtp(ca: trustme.CA) -> Iterator[tuple[ScriptedHandler, int]]:
    """The user's own relay: STARTTLS required, AUTH PLAIN with one login."""

    def auth(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
        ok = isinstance(data, LoginPassword) and text(data.login) == "ann" and text(data.password) == PASSWORD
        return AuthResult(success=ok, handled=False)

    # Reached as `localhost` (the test stacks' allowed name): the connection goes to the address
    # the egress check returned, and TLS verifies the name.
    ctx = tls_issued_by(ca, "localhost")
    handler, port = ScriptedHandler(), free_port()
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, tls_context=ctx, require_starttls=True,
        authenticator=auth, auth_require_tls=True, auth_exclude_mechanism=["LOGIN"],
    )
    controller.start()
    yield handler, port
    controller.stop()


async def _user(stack: Stack, name: str, **fields: Any) -> tuple[dict[str, Any], httpx.AsyncClient]:
    made = await stack.http.post("/v1/users", json={"name": name, **fields})
    assert made.status_code == 201, made.text
    user = made.json()
    issued = await stack.http.post(f"/v1/users/{user['id']}/api-keys", json={"name": "tests"})
    assert issued.status_code == 201, issued.text
    key = issued.json()["key"]
    client = httpx.AsyncClient(base_url=str(stack.http.base_url), headers={"Authorization": f"Bearer {key}"}, timeout=30)
    return user | {"key": key, "key_id": issued.json()["id"]}, client


@pytest.fixture
async def ann_and_bob(
    stack: Stack, sessions: Any
) -> AsyncIterator[tuple[dict[str, Any], httpx.AsyncClient, dict[str, Any], httpx.AsyncClient]]:
    suffix = os.urandom(3).hex()
    ann, ann_http = await _user(stack, f"ann-{suffix}", email="ann@example.com")
    await verify_domain(sessions, ann["id"], "example.org")  # Ann sends as ANN_FROM
    bob, bob_http = await _user(stack, f"bob-{suffix}")
    yield ann, ann_http, bob, bob_http
    await ann_http.aclose()
    await bob_http.aclose()


async def test_keys_are_shown_once_stored_hashed_and_revocable(stack: Stack, sessions: Any) -> None:
    user, http = await _user(stack, f"keys-{os.urandom(3).hex()}")
    try:
        everyone = {u["id"]: u for u in (await stack.http.get("/v1/users")).json()}
        assert [k["prefix"] for k in everyone[user["id"]]["api_keys"]] == [user["key"][:10]]
        listed = (await stack.http.get(f"/v1/users/{user['id']}")).json()
        assert [k["prefix"] for k in listed["api_keys"]] == [user["key"][:10]]
        assert user["key"] not in json.dumps(listed) and "key_hash" not in json.dumps(listed)
        assert (await http.get("/v1/emails")).status_code == 200
        used = (await stack.http.get(f"/v1/users/{user['id']}")).json()["api_keys"][0]
        assert used["last_used_at"] is not None
        assert (await http.post("/v1/users", json={"name": "x"})).status_code == 403  # users cannot make users

        gone = await stack.http.delete(f"/v1/users/{user['id']}/api-keys/{user['key_id']}")
        assert gone.status_code == 204
        assert (await http.get("/v1/emails")).status_code == 401
        assert (await stack.http.post("/v1/users", json={"name": user["name"]})).status_code == 409
    finally:
        await http.aclose()


async def test_a_user_sees_and_touches_only_their_own_emails(stack: Stack, ann_and_bob: Any) -> None:
    ann, ann_http, bob, bob_http = ann_and_bob
    later = datetime.now(UTC) + timedelta(days=30)
    scheduled = await ann_http.post("/v1/emails", json=email(send_at=later.isoformat(), **{"from": ANN_FROM}))
    assert scheduled.status_code == 202, scheduled.text
    email_id = scheduled.json()["id"]
    await wait_status(ann_http, email_id, "scheduled")

    assert (await bob_http.get(f"/v1/emails/{email_id}")).status_code == 404
    assert email_id not in {e["id"] for e in (await bob_http.get("/v1/emails", params={"page_size": 100})).json()["items"]}
    assert (await bob_http.post(f"/v1/emails/{email_id}/cancel", json={})).status_code == 404
    assert (await bob_http.post(f"/v1/emails/{email_id}/retry")).status_code == 404
    assert (await bob_http.patch(f"/v1/emails/{email_id}", json={"send_at": (later + timedelta(days=1)).isoformat()})).status_code == 404
    assert (await bob_http.get("/v1/settings/mail", params={"user_id": ann["id"]})).status_code == 404

    mine = (await ann_http.get("/v1/emails", params={"page_size": 100})).json()
    assert {e["id"] for e in mine["items"]} == {email_id} and mine["total"] == 1
    assert mine["items"][0]["sender"] == {"type": "user", "id": ann["id"]}
    assert (await stack.http.get(f"/v1/emails/{email_id}")).status_code == 200  # the admin sees all
    assert (await ann_http.post(f"/v1/emails/{email_id}/cancel", json={})).status_code == 200


async def test_settings_are_validated_encrypted_and_never_shown(stack: Stack, ann_and_bob: Any, sessions: Any) -> None:
    ann, ann_http, _, _ = ann_and_bob
    assert (await ann_http.get("/v1/settings/mail")).json()["driver"] == "system_smtp"
    lacking = await ann_http.put("/v1/settings/mail", json={"driver": "mailgun", "api_key": "key-123"})
    assert lacking.status_code == 422 and "mailgun_domain" in lacking.text
    bad = await ann_http.put("/v1/settings/mail", json={"driver": "ses", "api_key": "AK", "api_secret": "s", "ses_region": "moon"})
    assert bad.status_code == 422

    server = {"driver": "user_smtp", "smtp_host": "localhost", "smtp_port": 2525, "smtp_username": "ann", "smtp_security": "starttls"}
    put = await ann_http.put("/v1/settings/mail", json=server | {"smtp_password": PASSWORD, "hourly_limit": 100})
    assert put.status_code == 200, put.text
    assert put.json()["smtp_password_set"] is True and PASSWORD not in put.text
    got = await ann_http.get("/v1/settings/mail")
    assert PASSWORD not in got.text and got.json()["smtp_username"] == "ann"
    async with sessions() as s:
        row = (await s.exec(select(SenderSettings).where(SenderSettings.user_id == ann["id"]))).one()
    assert row.smtp_password_enc and PASSWORD not in row.smtp_password_enc

    # A PUT without the password keeps it for the same server and login; "" removes it.
    kept = await ann_http.put("/v1/settings/mail", json=server | {"hourly_limit": 50, "smtp_host": "LOCALHOST"})
    assert kept.status_code == 200, kept.text
    assert kept.json()["smtp_password_set"] is True
    cleared = await ann_http.put("/v1/settings/mail", json=server | {"smtp_password": ""})
    assert cleared.json()["smtp_password_set"] is False
    # It is bound to where it was given for: another port, login or security clears it (unless given again).
    for change in ({"smtp_port": 587}, {"smtp_username": "mallory"}, {"smtp_security": "tls"}):
        again = await ann_http.put("/v1/settings/mail", json=server | {"smtp_password": PASSWORD})
        assert again.json()["smtp_password_set"] is True
        moved = await ann_http.put("/v1/settings/mail", json=server | change)
        assert moved.status_code == 200 and moved.json()["smtp_password_set"] is False, (change, moved.text)
        given = await ann_http.put("/v1/settings/mail", json=server | change | {"smtp_password": PASSWORD})
        assert given.json()["smtp_password_set"] is True, change
    # And a provider's keys to their provider.
    sendgrid = await ann_http.put("/v1/settings/mail", json={"driver": "sendgrid", "api_key": "SG.key"})
    assert sendgrid.json()["api_key_set"] is True
    lacking = await ann_http.put("/v1/settings/mail", json={"driver": "mailgun", "mailgun_domain": "mg.example.com"})
    assert lacking.status_code == 422 and lacking.json()["detail"][0]["loc"] == ["body", "api_key"], lacking.text
    assert (await stack.http.get("/v1/settings/mail")).status_code == 422  # the bootstrap key must name a user
    assert (await stack.http.get("/v1/settings/mail", params={"user_id": ann["id"]})).json()["driver"] == "sendgrid"


async def test_user_smtp_with_starttls_and_auth_sends_and_a_wrong_password_fails_clearly(
    stack: Stack, ann_and_bob: Any, user_smtp: tuple[ScriptedHandler, int], client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ann, ann_http, _, _ = ann_and_bob
    handler, port = user_smtp
    settings = {"driver": "user_smtp", "smtp_host": "localhost", "smtp_port": port, "smtp_username": "ann",
                "smtp_security": "starttls", "default_from": ANN_FROM}
    assert (await ann_http.put("/v1/settings/mail", json=settings | {"smtp_password": PASSWORD})).status_code == 200

    tested = await ann_http.post("/v1/settings/mail/test", json={"to": "ann@example.com"})
    assert tested.status_code == 200, tested.text
    assert tested.json()["status"] == "sent" and tested.json()["provider"] == "smtp", tested.text

    sent = await ann_http.post("/v1/emails", json=email(subject="through Ann's relay"))
    done = await wait_status(ann_http, sent.json()["id"], "sent")
    assert done["from"] == ANN_FROM
    assert [m.message["Subject"] for m in handler.messages] == ["mailqueue test email", "through Ann's relay"]
    assert not stack.sink.by_message_id(done["message_id"])  # not through the system's server

    wrong = "not-" + PASSWORD
    assert (await ann_http.put("/v1/settings/mail", json=settings | {"smtp_password": wrong})).status_code == 200
    refused = await ann_http.post("/v1/emails", json=email(subject="refused"))
    failed = await wait_status(ann_http, refused.json()["id"], "failed")
    # Classified in our words with the reply's codes: a user's server is quoted to nobody but the operator's log.
    assert failed["last_error"] == "authentication failed (535 5.7.8)" and failed["attempts"] == 1, failed["last_error"]
    history = await client.get_workflow_handle(f"email-{refused.json()['id']}").fetch_history()
    for secret in (PASSWORD, wrong):
        assert secret not in history.to_json()
        assert secret not in json.dumps(failed)
        assert secret not in caplog.text
        assert secret not in Path(stack.tmp / "api.log").read_text()


async def test_a_senders_driver_is_kept_rebuilt_on_a_settings_change_and_the_old_one_closed(dns_stub: Any) -> None:
    from email.message import EmailMessage

    from mailqueue.config import Settings
    from mailqueue.drivers.log import LogDriver
    from mailqueue.drivers.factory import DriverFactory
    from tests.helpers import SmtpSink

    with SmtpSink() as sink:
        settings = Settings(send_timeout_seconds=0.2, egress_allow=["localhost"], dns_servers=[dns_stub.server], _env_file=None)  # type: ignore[call-arg]
        factory = DriverFactory(settings, LogDriver())
        factory.RETIRE_MARGIN_SECONDS = 0.2
        row = SenderSettings(user_id="u1", driver="user_smtp", smtp_host="localhost", smtp_port=sink.port, smtp_security="none")
        first = factory.for_sender(row)
        msg = EmailMessage()
        msg["Subject"], msg["Message-ID"] = "pooled", "<pooled@example.com>"
        msg.set_content("x")
        await first.send(msg, "a@example.com", ["b@example.com"])  # leaves a pooled connection open
        assert first._idle  # type: ignore[attr-defined]

        row.hourly_limit, row.default_from = 5, "Other <other@example.com>"  # read per email: same driver
        assert factory.for_sender(row) is first and factory.retiring == 0

        row.smtp_username = "someone"  # what the driver is built from: a new one, the old one retired
        second = factory.for_sender(row)
        assert second is not first and factory.retiring == 1
        assert first._idle, "closed too early: a send that took it may still be running"  # type: ignore[attr-defined]
        await eventually(lambda: factory.retiring == 0, timeout=10, what="the replaced driver was never closed")
        assert not first._idle, "the replaced driver was closed but its pooled connection kept"  # type: ignore[attr-defined]

        row.smtp_username = None
        third = factory.for_sender(row)
        assert factory.retiring == 1
        await factory.aclose()  # shutdown closes the retiring ones at once
        assert factory.retiring == 0 and third is not second
