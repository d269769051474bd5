"""DKIM on verified sender domains: keys made with the domain, the records to publish (checked
through the DNS stub), rotation, and mail signed on its way out through SMTP, checked with
dkimpy's verifier against the records in the stub."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import dkim
import dns.exception
import dns.resolver
import httpx
import pytest
from sqlmodel import col, select
from temporalio.client import Client

from devstack.devserver import TemporalDevServer
from mailqueue.config import Settings
from mailqueue.crypto import SecretBox, new_key
from mailqueue.db import create_engine, sessionmaker
from mailqueue.dkim_keys import dmarc_advice, new_keys, next_generation, spf_advice
from mailqueue.models import DkimKey, SenderDomain
from mailqueue.models import User as UserRow
from mailqueue.senders import rotate_secrets
from tests.conftest import scratch_database
from tests.dns_stub import DnsStub
from tests.fake_providers import FakeMailgun
from tests.helpers import (
    TEST_SECRET_KEY,
    SmtpSink,
    Stack,
    delivered,
    email,
    eventually,
    running_stack,
    verify_domain,
)

MAILGUN_KEY = "key-dkim-test"
MAILGUN_DOMAIN = "mg.dkim.example"


@dataclass
class Dkim:
    stack: Stack
    mailgun: FakeMailgun
    relay: SmtpSink  # a user's own SMTP server


@dataclass
class User:
    id: str
    http: httpx.AsyncClient


@pytest.fixture(scope="module")
async def dk(
    client: Client, database_url: str, temporal_server: TemporalDevServer, tmp_path_factory: pytest.TempPathFactory,
    dns_stub: DnsStub,
) -> AsyncIterator[Dkim]:
    tmp = tmp_path_factory.mktemp("dkim")
    with FakeMailgun(MAILGUN_KEY, MAILGUN_DOMAIN) as mailgun, SmtpSink() as relay:
        async with running_stack(
            client, database_url, temporal_server.address, dns_stub.server, tmp, "dkim", mailgun_base_url=mailgun.url,
        ) as stack:
            yield Dkim(stack, mailgun, relay)


@asynccontextmanager
async def _user(stack: Stack) -> AsyncIterator[User]:
    made = await stack.http.post("/v1/users", json={"name": f"dkim-{uuid.uuid4().hex[:8]}"})
    assert made.status_code == 201, made.text
    key = (await stack.http.post(f"/v1/users/{made.json()['id']}/api-keys")).json()["key"]
    async with httpx.AsyncClient(base_url=str(stack.http.base_url), headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        yield User(made.json()["id"], http)


@pytest.fixture
async def ann(dk: Dkim) -> AsyncIterator[User]:
    async with _user(dk.stack) as user:
        yield user


@pytest.fixture
async def bob(dk: Dkim) -> AsyncIterator[User]:
    async with _user(dk.stack) as user:
        yield user


def fresh_domain() -> str:
    return f"k{uuid.uuid4().hex[:10]}.example.org"


async def added(user: User, domain: str) -> dict[str, Any]:
    resp = await user.http.post("/v1/domains", json={"domain": domain})
    assert resp.status_code == 201, resp.text
    return resp.json()


async def verified(user: User, dns_stub: DnsStub, domain: str, *, publish_dkim: bool = True) -> dict[str, Any]:
    """Added, its ownership record (and, unless told otherwise, its DKIM records) published, and verified."""
    body = await added(user, domain)
    [record] = body["records"]
    dns_stub.add(record["name"], "TXT", record["value"])
    if publish_dkim:
        publish(dns_stub, body["dkim"])
    done = await user.http.post(f"/v1/domains/{domain}/verify")
    assert done.status_code == 200 and done.json()["status"] == "verified", done.text
    return done.json()


def publish(dns_stub: DnsStub, records: list[dict[str, Any]]) -> None:
    for r in records:
        dns_stub.set(r["record_name"], "TXT", r["record_value"])


def stub_txt(dns_stub: DnsStub) -> Any:
    """A dkimpy `dnsfunc` that asks the DNS stub, as a receiving server asks the domain's DNS."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], dns_stub.port, 5.0

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode(), "TXT", search=False)
        except dns.exception.DNSException:
            return None
        return b"".join(answer[0].strings)

    return txt


def signature_headers(data: bytes) -> list[dict[str, str]]:
    """The DKIM-Signature headers of a raw message, topmost first, as tag dicts."""
    found = []
    for name, value in dkim.DKIM(data).headers:
        if name.lower() == b"dkim-signature":
            text = re.sub(rb"\s+", b"", value).decode()
            found.append(dict(part.split("=", 1) for part in text.split(";") if part))
    return found


async def verifies(data: bytes, dns_stub: DnsStub) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of a raw message, against the records in the stub."""

    def check() -> list[bool]:
        verdicts = []
        for index in range(len(signature_headers(data))):
            try:
                verdicts.append(bool(dkim.DKIM(data).verify(idx=index, dnsfunc=stub_txt(dns_stub))))
            except dkim.DKIMException:
                verdicts.append(False)
        return verdicts

    return await asyncio.to_thread(check)


async def stored_keys(sessions: Any, domain_id: str) -> list[DkimKey]:
    async with sessions() as s:
        return list((await s.exec(select(DkimKey).where(col(DkimKey.domain_id) == domain_id))).all())


def secret_material(keys: list[DkimKey]) -> list[str]:
    """Pieces of the decrypted private keys that any leak would contain (a PEM body line; the Ed25519 seed)."""
    box = SecretBox([TEST_SECRET_KEY])
    pieces = []
    for key in keys:
        private = box.decrypt(key.private_key_enc)
        if key.algorithm == "rsa-sha256":
            assert private.startswith("-----BEGIN RSA PRIVATE KEY-----")
            # Lines of the private exponent and primes (the first ones hold the modulus, which the public key has too).
            pieces += [line for line in private.splitlines() if not line.startswith("-----")][8:12]
        else:
            assert len(base64.b64decode(private)) == 32
            pieces.append(private)
        pieces.append(key.private_key_enc)
    return pieces


# --- keys and records --------------------------------------------------------------------------------


async def test_a_new_domain_gets_an_rsa_and_an_ed25519_key_whose_records_are_shown_and_private_keys_never(
    dk: Dkim, ann: User, sessions: Any, dns_stub: DnsStub,
) -> None:
    domain = fresh_domain()
    resp = await ann.http.post("/v1/domains", json={"domain": domain})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    rsa, ed = body["dkim"]
    # The domain's first pair: mq<the day>1, one selector each.
    assert re.fullmatch(r"mq20\d{6}1-rsa", rsa["selector"]) and ed["selector"] == rsa["selector"].replace("-rsa", "-ed25519")
    assert rsa["algorithm"] == "rsa-sha256" and ed["algorithm"] == "ed25519-sha256"
    for record in (rsa, ed):
        assert record["type"] == "TXT" and record["record_name"] == f"{record['selector']}._domainkey.{domain}"
        assert record["status"] == "active" and record["published"] is None and record["retired_at"] is None
    assert rsa["record_value"].startswith("v=DKIM1; k=rsa; p=MII")  # a SubjectPublicKeyInfo, base64
    assert ed["record_value"].startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(ed["record_value"].rpartition("p=")[2])) == 32  # RFC 8463: the raw public key
    assert body["advice"]["dmarc"] == {
        "type": "TXT", "name": f"_dmarc.{domain}", "value": f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}",
        "note": body["advice"]["dmarc"]["note"],
    }
    # The test stack's relay is 127.0.0.1: where it sends from is not known here, and the advice says so.
    assert body["advice"]["spf"]["name"] == domain and body["advice"]["spf"]["value"] is None
    assert "ask the operator" in body["advice"]["spf"]["note"]

    async with sessions() as s:
        row = (await s.exec(select(SenderDomain).where(col(SenderDomain.id) == body["id"]))).one()
    keys = await stored_keys(sessions, row.id)
    assert sorted(k.selector for k in keys) == sorted([rsa["selector"], ed["selector"]])
    # Stored encrypted; in no answer (POST, GET, list, verify) and not in the API's log.
    answers = [resp.text, (await ann.http.get(f"/v1/domains/{domain}")).text, (await ann.http.get("/v1/domains")).text]
    publish(dns_stub, body["dkim"])
    dns_stub.add(body["records"][0]["name"], "TXT", body["records"][0]["value"])
    answers.append((await ann.http.post(f"/v1/domains/{domain}/verify")).text)
    answers.append((await dk.stack.http.get("/v1/domains", params={"user_id": ann.id})).text)
    log = (dk.stack.tmp / "api.log").read_text()
    for piece in secret_material(keys):
        assert all(piece not in text for text in answers), "a private key in an answer"
        assert piece not in log, "a private key in the API's log"
    assert (await ann.http.get(f"/v1/domains/{domain}")).json()["dkim"] == (await ann.http.get("/v1/domains")).json()[0]["dkim"]


def test_the_spf_advice_names_the_system_relay_when_it_can_be_known() -> None:
    def spf(**settings: Any) -> str | None:
        return spf_advice(Settings(**settings, _env_file=None), "example.org").value  # type: ignore[call-arg]

    assert spf(smtp_host="smtp.relay.example") == "v=spf1 a:smtp.relay.example ~all"
    assert spf(smtp_host="9.9.9.9") == "v=spf1 ip4:9.9.9.9 ~all"
    assert spf(smtp_host="2620:fe::fe") == "v=spf1 ip6:2620:fe::fe ~all"
    assert spf(smtp_host="127.0.0.1") is None and spf(smtp_host="localhost") is None and spf(smtp_host="10.1.2.3") is None
    assert spf(smtp_host="smtp.relay.example", driver="log") is None  # nothing leaves
    assert dmarc_advice("example.org").name == "_dmarc.example.org"
    assert next_generation(["mq202611291-rsa", "mq202611293-ed25519", "mq202611282-rsa", "other"], date(2026, 11, 29)) == "mq202611294"
    assert next_generation([], date(2026, 11, 30)) == "mq202611301"


async def test_verify_reports_for_each_key_whether_its_record_is_published_and_refuses_nothing_for_it(
    dk: Dkim, ann: User, dns_stub: DnsStub,
) -> None:
    domain = fresh_domain()
    body = await added(ann, domain)
    rsa, ed = body["dkim"]
    dns_stub.add(body["records"][0]["name"], "TXT", body["records"][0]["value"])
    dns_stub.set(rsa["record_name"], "TXT", rsa["record_value"])  # only the RSA record so far

    done = await ann.http.post(f"/v1/domains/{domain}/verify")
    assert done.status_code == 200 and done.json()["status"] == "verified", done.text  # a missing DKIM record refuses nothing
    shown = {r["algorithm"]: r for r in done.json()["dkim"]}
    assert shown["rsa-sha256"]["published"] is True and shown["ed25519-sha256"]["published"] is False
    assert shown["ed25519-sha256"]["checked_at"] is not None
    assert (await ann.http.get(f"/v1/domains/{domain}")).json()["dkim"] == done.json()["dkim"]  # remembered

    # Someone else's key at the name is not this key; split into DNS strings with spaces in p=, it still is.
    other = next(k for k in new_keys(SecretBox([new_key()]), "x", "mq1") if k.algorithm == "ed25519-sha256")
    dns_stub.set(ed["record_name"], "TXT", f"v=DKIM1; k=ed25519; p={other.public_key}")
    again = await ann.http.post(f"/v1/domains/{domain}/verify")
    assert [r["published"] for r in again.json()["dkim"]] == [True, False]
    key = ed["record_value"].rpartition("p=")[2]
    dns_stub.set(ed["record_name"], "TXT", "v=spf1 -all", f"v=DKIM1;  k=ed25519;  p={key[:20]} {key[20:]}")
    again = await ann.http.post(f"/v1/domains/{domain}/verify")
    assert [r["published"] for r in again.json()["dkim"]] == [True, True]
    assert again.json()["verified_at"] == done.json()["verified_at"]  # still verified once


async def test_a_rotation_makes_new_keys_active_and_keeps_the_old_ones_listed_until_the_domain_goes(
    dk: Dkim, ann: User, bob: User, sessions: Any,
) -> None:
    domain = fresh_domain()
    first = (await added(ann, domain))["dkim"]

    assert (await bob.http.post(f"/v1/domains/{domain}/dkim/rotate")).status_code == 404  # not Bob's
    assert (await bob.http.post(f"/v1/domains/{domain}/dkim/rotate", params={"user_id": ann.id})).status_code == 404
    assert (await ann.http.post(f"/v1/domains/{fresh_domain()}/dkim/rotate")).status_code == 404

    rotated = await ann.http.post(f"/v1/domains/{domain}/dkim/rotate")
    assert rotated.status_code == 200, rotated.text
    keys = rotated.json()["dkim"]
    assert [k["status"] for k in keys] == ["active", "active", "retired", "retired"]
    assert [k["selector"] for k in keys[2:]] == [k["selector"] for k in first]
    assert {k["selector"] for k in keys[:2]}.isdisjoint(k["selector"] for k in first)
    assert [k["algorithm"] for k in keys[:2]] == ["rsa-sha256", "ed25519-sha256"]
    assert all(k["retired_at"] for k in keys[2:]) and keys[2]["record_value"] == first[0]["record_value"]

    by_admin = await dk.stack.http.post(f"/v1/domains/{domain}/dkim/rotate", params={"user_id": ann.id})
    assert by_admin.status_code == 200, by_admin.text
    assert [k["status"] for k in by_admin.json()["dkim"]] == ["active"] * 2 + ["retired"] * 4
    assert [k["selector"] for k in by_admin.json()["dkim"][2:]] == [k["selector"] for k in keys]  # newest first
    assert (await ann.http.get(f"/v1/domains/{domain}")).json()["dkim"] == by_admin.json()["dkim"]

    domain_id = rotated.json()["id"]
    assert len(await stored_keys(sessions, domain_id)) == 6
    assert (await ann.http.delete(f"/v1/domains/{domain}")).status_code == 204
    assert await stored_keys(sessions, domain_id) == []  # the keys go with their domain


# --- signing -----------------------------------------------------------------------------------------


def _flipped(data: bytes, marker: bytes) -> bytes:
    """The message with one byte of its body changed (in `marker`, which is in the body)."""
    at = data.index(marker, data.index(b"\r\n\r\n"))
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


async def test_mail_from_a_verified_domain_is_signed_with_both_keys_and_a_flipped_body_byte_fails(
    dk: Dkim, ann: User, dns_stub: DnsStub, sessions: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mailqueue")
    caplog.set_level(logging.DEBUG, logger="dkimpy")
    domain = fresh_domain()
    body = await verified(ann, dns_stub, domain)
    sent = await ann.http.post("/v1/emails", json=email(**{
        "from": f"Ann Müller <ann@{domain}>", "to": ["Bob <bob@example.net>"], "cc": ["carol@example.net"],
        "reply_to": f"help@{domain}", "subject": "Grüße: order 4711",
        "text": "Grüße! Your order has shipped.\n" * 3, "html": "<p>Order 4711 has shipped.</p>",
        "headers": {"List-Unsubscribe": f"<mailto:unsubscribe@{domain}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
    }))
    assert sent.status_code == 202, sent.text
    [caught] = await delivered(dk.stack.sink, sent.json()["id"])

    rsa, ed = signature_headers(caught.data)  # RSA topmost: verifiers that check only the first know RSA
    assert (rsa["a"], rsa["s"]) == ("rsa-sha256", body["dkim"][0]["selector"])
    assert (ed["a"], ed["s"]) == ("ed25519-sha256", body["dkim"][1]["selector"])
    for sig in (rsa, ed):
        assert sig["d"] == domain and sig["c"] == "relaxed/relaxed"
        assert set(sig["h"].split(":")) == {
            "from", "to", "cc", "subject", "date", "message-id", "mime-version", "content-type", "list-unsubscribe",
            "list-unsubscribe-post", "reply-to",
        }
    assert await verifies(caught.data, dns_stub) == [True, True]
    assert dkim.verify(caught.data, dnsfunc=stub_txt(dns_stub))  # the plain check of the first signature, too
    assert await verifies(_flipped(caught.data, b"4711 has shipped"), dns_stub) == [False, False]
    resubjected = caught.data.replace(b"Subject: ", b"Subject: Re: ", 1)
    assert resubjected != caught.data and await verifies(resubjected, dns_stub) == [False, False]

    # The private keys are nowhere in the worker's log (this process) or the API's.
    keys = await stored_keys(sessions, body["id"])
    text = caplog.text + (dk.stack.tmp / "api.log").read_text()
    assert all(piece not in text for piece in secret_material(keys))


async def test_after_a_rotation_mail_through_the_users_own_smtp_server_is_signed_with_the_new_keys(
    dk: Dkim, ann: User, dns_stub: DnsStub,
) -> None:
    domain = fresh_domain()
    old = (await verified(ann, dns_stub, domain))["dkim"]
    put = await ann.http.put("/v1/settings/mail", json={
        "driver": "user_smtp", "smtp_host": "localhost", "smtp_port": dk.relay.port, "smtp_security": "none",
    })
    assert put.status_code == 200, put.text
    new = (await ann.http.post(f"/v1/domains/{domain}/dkim/rotate")).json()["dkim"][:2]
    publish(dns_stub, new)

    sent = await ann.http.post("/v1/emails", json=email(**{"from": f"ann@{domain}", "html": "<p>Batch 1200 packed.</p>"}))
    assert sent.status_code == 202, sent.text
    [caught] = await delivered(dk.relay, sent.json()["id"])
    assert [s["s"] for s in signature_headers(caught.data)] == [k["selector"] for k in new]
    assert all(s["s"] not in {k["selector"] for k in old} for s in signature_headers(caught.data))
    assert await verifies(caught.data, dns_stub) == [True, True]
    assert await verifies(_flipped(caught.data, b"1200 packed"), dns_stub) == [False, False]


async def test_provider_mail_and_the_systems_mail_carry_no_dkim_signature(dk: Dkim, bob: User, dns_stub: DnsStub) -> None:
    domain = fresh_domain()
    await verified(bob, dns_stub, domain)

    # Sent by the system (the bootstrap key), even from Bob's domain: the system has no keys here.
    system = await dk.stack.http.post("/v1/emails", json=email(**{"from": f"ops@{domain}"}))
    assert system.status_code == 202, system.text
    [caught] = await delivered(dk.stack.sink, system.json()["id"])
    assert caught.message["From"] == f"ops@{domain}" and signature_headers(caught.data) == []

    # Through Mailgun: the provider signs on its side.
    put = await bob.http.put("/v1/settings/mail", json={"driver": "mailgun", "api_key": MAILGUN_KEY, "mailgun_domain": MAILGUN_DOMAIN})
    assert put.status_code == 200, put.text
    sent = await bob.http.post("/v1/emails", json=email(**{"from": f"bob@{domain}"}))
    assert sent.status_code == 202, sent.text
    [mime] = await eventually(
        lambda: [r.mime for r in dk.mailgun.received if r.mime is not None and sent.json()["id"] in str(r.mime["Message-ID"])],
        timeout=60, what="the email never reached the fake Mailgun",
    )
    assert mime["From"] == f"bob@{domain}" and mime.get_all("DKIM-Signature") is None


async def test_a_domain_verified_without_keys_sends_unsigned(dk: Dkim, ann: User, sessions: Any) -> None:
    """Domains verified before DKIM (or inserted by an admin's tooling) have no keys: their mail goes as before."""
    domain = fresh_domain()
    await verify_domain(sessions, ann.id, domain)
    sent = await ann.http.post("/v1/emails", json=email(**{"from": f"ann@{domain}"}))
    assert sent.status_code == 202, sent.text
    [caught] = await delivered(dk.stack.sink, sent.json()["id"])
    assert signature_headers(caught.data) == []


async def test_rotate_secrets_reencrypts_the_dkim_private_keys(tmp_path: Path) -> None:
    old, new = new_key(), new_key()
    with scratch_database(tmp_path) as url:
        engine = create_engine(url)
        try:
            fresh = sessionmaker(engine)
            async with fresh() as s:
                s.add(UserRow(id="u1", name="u1"))
                await s.commit()
                s.add(SenderDomain(id="d1", user_id="u1", domain="example.org", token="t"))
                await s.commit()
                keys = new_keys(SecretBox([old]), "d1", "mq202611291")
                plain = [SecretBox([old]).decrypt(k.private_key_enc) for k in keys]
                s.add_all(keys)
                await s.commit()
            assert await rotate_secrets(fresh, SecretBox([new, old])) == 2
            async with fresh() as s:
                stored = {k.id: k for k in (await s.exec(select(DkimKey))).all()}
            assert [SecretBox([new]).decrypt(stored[k.id].private_key_enc) for k in keys] == plain
        finally:
            await engine.dispose()
