"""Sender identity: verified sender domains (/v1/domains, DNS TXT through the stub), and a user's
From, default_from and Message-ID bound to them."""

from __future__ import annotations

import argparse
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.supervisor import dev_settings
from mailqueue.config import Settings
from mailqueue.domains import reserved_for_system, system_domains, system_message_id_domain
from tests.dns_stub import DnsStub
from tests.helpers import ApiProcess, Stack, delivered, email, total_emails, wait_status


@dataclass
class User:
    id: str
    http: httpx.AsyncClient


async def _user(stack: Stack, **fields: Any) -> User:
    made = await stack.http.post("/v1/users", json={"name": f"domains-{uuid.uuid4().hex[:8]}", **fields})
    assert made.status_code == 201, made.text
    key = (await stack.http.post(f"/v1/users/{made.json()['id']}/api-keys")).json()["key"]
    return User(made.json()["id"], httpx.AsyncClient(base_url=str(stack.http.base_url), headers={"Authorization": f"Bearer {key}"}, timeout=30))


@pytest.fixture
async def ann(stack: Stack) -> AsyncIterator[User]:
    user = await _user(stack, email="ann@example.net")
    yield user
    await user.http.aclose()


@pytest.fixture
async def bob(stack: Stack) -> AsyncIterator[User]:
    user = await _user(stack)
    yield user
    await user.http.aclose()


def fresh_domain() -> str:
    return f"d{uuid.uuid4().hex[:10]}.example.org"


async def verified(user: User, dns_stub: DnsStub, domain: str) -> dict[str, Any]:
    """The user adds the domain, publishes its record in DNS, and verifies it: as a real user would."""
    added = await user.http.post("/v1/domains", json={"domain": domain})
    assert added.status_code == 201, added.text
    [record] = added.json()["records"]
    dns_stub.add(record["name"], "TXT", record["value"])
    done = await user.http.post(f"/v1/domains/{domain}/verify")
    assert done.status_code == 200 and done.json()["status"] == "verified", done.text
    return done.json()


# --- the resource ----------------------------------------------------------------------------------


async def test_a_domain_is_added_pending_and_verified_through_its_txt_record(stack: Stack, ann: User, dns_stub: DnsStub) -> None:
    domain = fresh_domain()
    added = await ann.http.post("/v1/domains", json={"domain": domain.upper() + "."})  # normalized: lower case, no dot
    assert added.status_code == 201, added.text
    body = added.json()
    assert added.headers["Location"] == f"/v1/domains/{domain}"
    assert body["domain"] == domain and body["user_id"] == ann.id and body["status"] == "pending" and body["verified_at"] is None
    [record] = body["records"]
    assert record["type"] == "TXT" and record["name"] == f"_mailqueue.{domain}"
    assert record["value"].startswith("mailqueue-verification=") and len(record["value"]) > len("mailqueue-verification=") + 20
    assert (await ann.http.post("/v1/domains", json={"domain": domain})).status_code == 409

    missing = await ann.http.post(f"/v1/domains/{domain}/verify")  # nothing published yet: NXDOMAIN
    assert missing.status_code == 422, missing.text
    [err] = missing.json()["detail"]
    assert err["loc"] == ["path", "domain"] and "does not exist in DNS" in err["msg"] and record["value"] in err["msg"]
    assert err["expected"] == {"type": "TXT", "name": record["name"], "value": record["value"]} and err["found"] == []

    dns_stub.set(record["name"], "TXT", "v=spf1 -all", "mailqueue-verification=someone-elses-token")
    wrong = await ann.http.post(f"/v1/domains/{domain}/verify")
    assert wrong.status_code == 422
    [err] = wrong.json()["detail"]
    assert "do not include" in err["msg"] and sorted(err["found"]) == ["mailqueue-verification=someone-elses-token", "v=spf1 -all"]
    assert (await ann.http.get(f"/v1/domains/{domain}")).json()["status"] == "pending"

    dns_stub.add(record["name"], "TXT", record["value"])
    done = await ann.http.post(f"/v1/domains/{domain}/verify")
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "verified" and done.json()["verified_by"] == "dns" and done.json()["verified_at"]
    dns_stub.set(record["name"], "TXT")  # verified stays verified: asking again changes nothing
    again = await ann.http.post(f"/v1/domains/{domain}/verify")
    assert again.status_code == 200 and again.json()["verified_at"] == done.json()["verified_at"]

    listed = (await ann.http.get("/v1/domains")).json()
    assert [d["domain"] for d in listed] == [domain] and listed[0]["status"] == "verified"
    assert [d["domain"] for d in (await stack.http.get("/v1/domains", params={"user_id": ann.id})).json()] == [domain]
    assert domain in {d["domain"] for d in (await stack.http.get("/v1/domains")).json()}  # the admin sees everyone's


async def test_another_user_can_neither_see_nor_remove_nor_borrow_a_domain(stack: Stack, ann: User, bob: User, dns_stub: DnsStub) -> None:
    domain = fresh_domain()
    await verified(ann, dns_stub, domain)

    assert (await bob.http.get(f"/v1/domains/{domain}")).status_code == 404
    assert (await bob.http.get(f"/v1/domains/{domain}", params={"user_id": ann.id})).status_code == 404
    assert (await bob.http.delete(f"/v1/domains/{domain}", params={"user_id": ann.id})).status_code == 404
    assert (await bob.http.get("/v1/domains", params={"user_id": ann.id})).status_code == 404
    assert (await bob.http.get("/v1/domains")).json() == []
    assert (await bob.http.post("/v1/domains", json={"domain": fresh_domain(), "user_id": ann.id})).status_code == 404

    # Bob may claim it too, but Ann's published record does not prove it for him: his token is his own.
    mine = await bob.http.post("/v1/domains", json={"domain": domain})
    assert mine.status_code == 201 and mine.json()["records"][0]["value"] not in {
        d["records"][0]["value"] for d in (await ann.http.get("/v1/domains")).json()
    }
    refused = await bob.http.post(f"/v1/domains/{domain}/verify")
    assert refused.status_code == 422 and "do not include" in refused.text
    forced = await bob.http.post(f"/v1/domains/{domain}/verify", json={"force": True})
    assert forced.status_code == 422 and forced.json()["detail"][0]["loc"] == ["body", "force"]
    assert (await bob.http.post("/v1/emails", json=email(**{"from": f"bob@{domain}"}))).status_code == 422
    assert (await ann.http.get(f"/v1/domains/{domain}")).json()["status"] == "verified"  # Ann's untouched


async def test_an_admin_may_vouch_for_a_domain_and_remove_one(stack: Stack, ann: User, dns_stub: DnsStub) -> None:
    domain = fresh_domain()
    assert (await stack.http.post("/v1/domains", json={"domain": domain})).status_code == 422  # the bootstrap key names a user
    added = await stack.http.post("/v1/domains", json={"domain": domain, "user_id": ann.id})
    assert added.status_code == 201 and added.json()["user_id"] == ann.id
    assert (await stack.http.post(f"/v1/domains/{domain}/verify", json={"force": True})).status_code == 422  # whose?
    forced = await stack.http.post(f"/v1/domains/{domain}/verify", params={"user_id": ann.id}, json={"force": True})
    assert forced.status_code == 200, forced.text
    assert forced.json()["status"] == "verified" and forced.json()["verified_by"] == "admin:admin"
    sent = await ann.http.post("/v1/emails", json=email(**{"from": f"ann@{domain}"}))
    assert sent.status_code == 202, sent.text

    assert (await ann.http.delete(f"/v1/domains/{domain}")).status_code == 204
    assert (await ann.http.get(f"/v1/domains/{domain}")).status_code == 404
    assert (await ann.http.delete(f"/v1/domains/{domain}")).status_code == 404
    gone = await ann.http.post("/v1/emails", json=email(**{"from": f"ann@{domain}"}))
    assert gone.status_code == 422 and "not one of your verified sender domains" in gone.text


@pytest.mark.parametrize(
    ("domain", "why"),
    [
        ("example.com", "reserved for the system"),  # the domain of the stack's default_from
        ("mail.example.com", "reserved for the system"),  # and everything under it
        ("EXAMPLE.com.", "reserved for the system"),
        ("ann@example.org", "email address"),
        ("localhost", "domain name like example.org"),
        ("10.0.0.5", "IP address"),
        ("-bad-.example.org", "not a valid domain name"),
        ("exa mple.org", "not a valid domain name"),
    ],
)
async def test_reserved_and_malformed_domains_are_refused(stack: Stack, ann: User, domain: str, why: str) -> None:
    refused = await ann.http.post("/v1/domains", json={"domain": domain})
    assert refused.status_code == 422, refused.text
    [err] = refused.json()["detail"]
    assert err["loc"] == ["body", "domain"] and why in err["msg"], err
    assert (await ann.http.get("/v1/domains")).json() == []


def test_the_systems_domains_and_every_name_under_them_are_reserved() -> None:
    settings = Settings(  # type: ignore[call-arg]
        default_from="App <noreply@mail.corp.example>", message_id_domain="mid.bücher.example", system_domains=["Ops.Example."],
        _env_file=None,
    )
    assert system_domains(settings) == {"mail.corp.example", "mid.xn--bcher-kva.example", "ops.example"}
    assert reserved_for_system(settings, "mail.corp.example") == "mail.corp.example"
    assert reserved_for_system(settings, "eu.mail.corp.example") == "mail.corp.example"
    assert reserved_for_system(settings, "ops.example") == "ops.example"
    assert reserved_for_system(settings, "corp.example") is None  # only the system's own names, not their parents
    assert reserved_for_system(settings, "notops.example") is None
    assert system_message_id_domain(settings) == "mid.xn--bcher-kva.example"
    assert system_message_id_domain(Settings(_env_file=None)) == "example.com"  # type: ignore[call-arg]


async def test_a_unicode_domain_is_kept_in_its_ascii_form(stack: Stack, ann: User) -> None:
    label = f"bücher{uuid.uuid4().hex[:6]}"
    added = await ann.http.post("/v1/domains", json={"domain": f"{label}.de"})
    assert added.status_code == 201, added.text
    ascii_name = added.json()["domain"]
    assert ascii_name.startswith("xn--") and ascii_name.isascii() and added.json()["shown_as"] == f"{ascii_name} (written {label}.de)"
    assert added.json()["records"][0]["name"] == f"_mailqueue.{ascii_name}"
    assert (await ann.http.get(f"/v1/domains/{label}.de")).json()["domain"] == ascii_name  # either spelling finds it


# --- From, default_from and Message-ID ---------------------------------------------------------------


async def test_spoofed_from_is_refused_and_a_verified_one_is_delivered_with_its_message_id(
    stack: Stack, ann: User, dns_stub: DnsStub
) -> None:
    domain = fresh_domain()
    await verified(ann, dns_stub, domain)
    pending = fresh_domain()
    assert (await ann.http.post("/v1/domains", json={"domain": pending})).status_code == 201
    before = await total_emails(stack.http)

    spoofed = {
        "PayPal <service@paypal.com>": "paypal.com is not one of your verified sender domains",
        "Payroll <payroll@example.com>": "example.com is the system's own domain",
        "Payroll <payroll@mail.example.com>": "is the system's own domain",
        f"Ann <ann@{pending}>": f"{pending} is not verified yet",
        f"Ann <ann@sub.{domain}>": "not one of your verified sender domains",  # a subdomain is verified on its own
        "PayPal <service@pаypal.com>": "xn--pypal-4ve.com (written pаypal.com) is not one of your verified",  # Cyrillic а
    }
    for sender, why in spoofed.items():
        refused = await ann.http.post("/v1/emails", json=email(**{"from": sender}))
        assert refused.status_code == 422, (sender, refused.text)
        [err] = refused.json()["detail"]
        assert err["loc"] == ["body", "from"] and why in err["msg"], err
        assert "ascii" not in err["msg"], err
    nothing = await ann.http.post("/v1/emails", json=email())  # no from, no default_from: not the system's address either
    assert nothing.status_code == 422
    assert "give `from`, or set default_from in /v1/settings/mail" in nothing.json()["detail"][0]["msg"]
    assert await total_emails(stack.http) == before

    sent = await ann.http.post("/v1/emails", json=email(**{"from": f"Ann Smith <Ann@{domain.upper()}>"}))
    assert sent.status_code == 202, sent.text
    [caught] = await delivered(stack.sink, sent.json()["id"])
    assert caught.message["From"] == f"Ann Smith <Ann@{domain}>" and caught.mail_from == f"Ann@{domain}"
    assert caught.message["Message-ID"] == f"<{sent.json()['id']}@{domain}>"


async def test_a_batch_refuses_each_spoofed_email_on_its_own(stack: Stack, ann: User, dns_stub: DnsStub) -> None:
    domain = fresh_domain()
    await verified(ann, dns_stub, domain)
    mine = {"from": f"ann@{domain}"}
    resp = await ann.http.post("/v1/emails/batch", json={"emails": [
        email(**mine), email(**{"from": "service@paypal.com"}), email(headers={"DKIM-Signature": "v=1; d=paypal.com"}, **mine),
    ]})
    assert resp.status_code == 200, resp.text
    first, spoofed, forged = resp.json()["items"]
    assert first["status"] == 202 and spoofed["status"] == 422 and forged["status"] == 422
    assert spoofed["detail"][0]["loc"] == ["from"] and "paypal.com" in spoofed["detail"][0]["msg"]
    assert forged["detail"][0]["loc"] == ["headers"] and "DKIM-Signature" in forged["detail"][0]["msg"]


async def test_default_from_must_be_verified_on_put_and_is_then_used_by_emails_and_the_test_send(
    stack: Stack, ann: User, dns_stub: DnsStub
) -> None:
    no_default = await ann.http.post("/v1/settings/mail/test", json={"to": "ann@example.net"})
    assert no_default.status_code == 422 and no_default.json()["detail"][0]["loc"] == ["settings", "default_from"]

    for sender in ("Shop <shop@paypal.com>", "System <noreply@example.com>"):
        refused = await ann.http.put("/v1/settings/mail", json={"default_from": sender})
        assert refused.status_code == 422, refused.text
        [err] = refused.json()["detail"]
        assert err["loc"] == ["body", "default_from"] and "default_from" in err["msg"], err
    assert (await ann.http.get("/v1/settings/mail")).json()["default_from"] is None

    domain = fresh_domain()
    await verified(ann, dns_stub, domain)
    assert (await ann.http.put("/v1/settings/mail", json={"default_from": f"Ann <ann@{domain}>"})).status_code == 200
    sent = await ann.http.post("/v1/emails", json=email())
    assert sent.status_code == 202, sent.text
    [caught] = await delivered(stack.sink, sent.json()["id"])
    assert caught.message["From"] == f"Ann <ann@{domain}>" and caught.message["Message-ID"].endswith(f"@{domain}>")

    tested = await ann.http.post("/v1/settings/mail/test", json={"to": "ann@example.net"})
    assert tested.status_code == 200 and tested.json()["status"] == "sent", tested.text
    [test_mail] = await delivered(stack.sink, tested.json()["email_id"])
    assert test_mail.message["From"] == f"Ann <ann@{domain}>" and test_mail.message["Message-ID"].endswith(f"@{domain}>")

    # The domain removed: the stored default_from no longer sends, with a message that says why.
    assert (await ann.http.delete(f"/v1/domains/{domain}")).status_code == 204
    stale = await ann.http.post("/v1/emails", json=email())
    assert stale.status_code == 422 and "your default_from" in stale.json()["detail"][0]["msg"]


async def test_a_templates_default_from_counts_as_the_users_from(stack: Stack, ann: User, dns_stub: DnsStub) -> None:
    name = f"shop-{uuid.uuid4().hex[:8]}"
    made = await stack.http.post("/v1/templates", json={
        "name": name, "subject": "Hi", "text": "Hello", "default_from": "Shop <shop@example.com>", "default_from_name": "The Shop",
    })
    assert made.status_code == 201, made.text
    refused = await ann.http.post("/v1/emails", json={"to": ["bob@example.net"], "template": name})
    assert refused.status_code == 422 and "the template's default_from" in refused.json()["detail"][0]["msg"], refused.text

    domain = fresh_domain()
    await verified(ann, dns_stub, domain)
    sent = await ann.http.post("/v1/emails", json={"to": ["bob@example.net"], "template": name, "from": f"shop@{domain}"})
    assert sent.status_code == 202, sent.text
    [caught] = await delivered(stack.sink, sent.json()["id"])
    assert caught.message["From"] == f"shop@{domain}"


async def test_the_bootstrap_key_sends_from_any_address_with_the_systems_message_id(stack: Stack) -> None:
    sent = await stack.http.post("/v1/emails", json=email(**{"from": "Ops <ops@elsewhere.example.net>"}))
    assert sent.status_code == 202, sent.text
    [caught] = await delivered(stack.sink, sent.json()["id"])
    assert caught.message["From"] == "Ops <ops@elsewhere.example.net>"
    assert caught.message["Message-ID"] == f"<{sent.json()['id']}@example.com>"  # the system's, not the typed one
    done = await wait_status(stack.http, sent.json()["id"], "sent")
    assert done["sender"] == {"type": "system", "id": None}


# --- make dev: permissive, and says so ---------------------------------------------------------------


def test_make_dev_lets_users_send_from_any_domain_unless_configured(tmp_path: Path) -> None:
    args = argparse.Namespace(  # `mailqueue dev`'s options, as its parser gives them
        data_dir=tmp_path, host="127.0.0.1", api_port=8000, temporal_port=7233, ui_port=8233, smtp_port=1025, mail_port=8025,
    )
    assert dev_settings(args, Settings(_env_file=None)).require_verified_from is False  # type: ignore[call-arg]
    strict = Settings(require_verified_from=True, _env_file=None)  # type: ignore[call-arg]
    assert dev_settings(args, strict).require_verified_from is True


async def test_make_dev_lets_users_reach_the_local_catcher_by_the_name_localhost_only(tmp_path: Path) -> None:
    from mailqueue.egress import DestinationRefused, check_destination

    args = argparse.Namespace(
        data_dir=tmp_path, host="127.0.0.1", api_port=8000, temporal_port=7233, ui_port=8233, smtp_port=1025, mail_port=8025,
    )
    dev = dev_settings(args, Settings(_env_file=None))  # type: ignore[call-arg]
    assert await check_destination(dev, "localhost", 1025, kind="smtp")  # the README's user_smtp example
    for host in ("127.0.0.1", "2130706433", "postgresql"):
        with pytest.raises(DestinationRefused):
            await check_destination(dev, host, 1025, kind="smtp")
    assert dev_settings(args, Settings(egress_allow=[], _env_file=None)).egress_allow == []  # type: ignore[call-arg]


async def test_when_verification_is_off_an_unverified_from_is_sent_and_logged(stack: Stack, ann: User) -> None:
    log = stack.tmp / "permissive-api.log"
    async with ApiProcess(stack.settings.model_copy(update={"require_verified_from": False}), log) as api:
        async with httpx.AsyncClient(base_url=api.url, headers=ann.http.headers, timeout=30) as http:
            sent = await http.post("/v1/emails", json=email(**{"from": "PayPal <service@paypal.com>"}))
            assert sent.status_code == 202, sent.text
            fallback = await http.post("/v1/emails", json=email())  # no from anywhere: the system's, as before
            assert fallback.status_code == 202, fallback.text
    [caught] = await delivered(stack.sink, sent.json()["id"])
    assert caught.message["From"] == "PayPal <service@paypal.com>"
    assert caught.message["Message-ID"] == f"<{sent.json()['id']}@example.com>"  # never the unverified domain
    [system] = await delivered(stack.sink, fallback.json()["id"])
    assert system.message["From"] == "mailqueue <noreply@example.com>"
    text = log.read_text()
    assert "MAILQUEUE_REQUIRE_VERIFIED_FROM is off" in text  # at start
    assert f"user {ann.id} sends from the domain paypal.com, which would be refused" in text
    assert f"user {ann.id} sends from the system's address, which would be refused" in text
    assert "service@paypal.com" not in text  # the domain is logged, not the address
