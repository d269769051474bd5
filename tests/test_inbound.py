"""Provider events in (issue 14, item 3): /v1/inbound/{ses,sendgrid,mailgun} through the real API
process, a real worker, the real database and the local fake providers.

Signatures are made here the way each provider documents them, with keys of the test's own: an RSA
key and a self-signed certificate served by a local "SNS" (the certificate-URL allowlist lets it),
an ECDSA P-256 key for SendGrid, an HMAC key for Mailgun. Each route is tried genuine, tampered
(the body changed after signing), stale and badly keyed, and a refusal must change nothing.

A user's own routes (/v1/inbound/<provider>/<user id>) are tried with that user's keys, the operator's
and another user's, and with events about another user's email, which must stay out of reach."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from moto.server import ThreadedMotoServer
from temporalio.client import Client

from api.app import create_app
from devstack.devserver import TemporalDevServer
from devstack.net import free_port
from mailqueue import inbound
from mailqueue.config import Settings
from mailqueue.crypto import SecretBox, new_key
from mailqueue.models import SenderSettings
from tests.dns_stub import DnsStub
from tests.fake_providers import FakeMailgun, FakeSendGrid
from tests.helpers import Sender, Stack, new_user, post_email, running_stack, wait_status

TOPIC = "arn:aws:sns:eu-west-1:123456789012:mailqueue-ses-events"
SENDGRID_API_KEY = "SG.inbound-test-key"
MAILGUN_API_KEY = "key-inbound-test"
MAILGUN_DOMAIN = "mg.inbound.example"
MAILGUN_SIGNING_KEY = "mailgun-signing-key-for-tests-0123456789"
AWS_KEY_ID, AWS_SECRET, AWS_REGION = "AKIAINBOUNDTEST0000", "aws-secret-inbound-test", "eu-west-1"


# --- a local SNS: the signing certificate, and the subscription confirm URL -------------------------


def _self_signed(key: rsa.RSAPrivateKey, valid_days: tuple[int, int] = (-1, 30)) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.eu-west-1.amazonaws.com")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now + timedelta(days=valid_days[0]))
        .not_valid_after(now + timedelta(days=valid_days[1])).sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.PEM)


class LocalSns:
    """Serves /cert.pem (the key messages are signed with), /other.pem (another key's) and /expired.pem
    (the right key, expired), and records every GET (certificate fetches and subscription confirmations)."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        files = {"/cert.pem": _self_signed(self.key), "/other.pem": _self_signed(self.other_key),
                 "/expired.pem": _self_signed(self.key, (-30, -1))}
        self.port = free_port()
        self.url = f"http://localhost:{self.port}"
        self.gets: list[str] = []
        sns = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                sns.gets.append(self.path)
                if self.path in files:
                    body = files[self.path]
                elif self.path.startswith("/confirm?"):
                    body = b"<ConfirmSubscriptionResponse/>"
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> LocalSns:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def sign(self, message: dict[str, Any], *, version: str = "1", key: rsa.RSAPrivateKey | None = None,
             cert: str = "/cert.pem") -> dict[str, Any]:
        """The message with SignatureVersion, SigningCertURL and Signature, as SNS signs: "name\\nvalue\\n"
        for the type's fields in order (a Notification's Subject only when present)."""
        if message["Type"] == "Notification":
            names = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
        else:
            names = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
        text = "".join(f"{n}\n{message[n]}\n" for n in names if n in message).encode()
        digest = hashes.SHA1() if version == "1" else hashes.SHA256()  # noqa: S303 - SNS SignatureVersion 1
        signature = (key or self.key).sign(text, padding.PKCS1v15(), digest)
        return {**message, "SignatureVersion": version, "SigningCertURL": f"{self.url}{cert}",
                "Signature": base64.b64encode(signature).decode()}


def _sns_time(at: datetime | None = None) -> str:
    return (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def ses_notification(kind: str, message_id: str, recipients: list[str], *, topic: str = TOPIC, at: datetime | None = None,
                     bounce_type: str = "Permanent", event_publishing: bool = False) -> dict[str, Any]:
    """An SNS Notification carrying an SES event (https://docs.aws.amazon.com/ses/latest/dg/notification-contents.html)."""
    mail = {"timestamp": _sns_time(), "messageId": message_id, "source": "sender@example.com", "destination": recipients}
    ses: dict[str, Any] = {"eventType" if event_publishing else "notificationType": kind, "mail": mail}
    if kind == "Bounce":
        ses["bounce"] = {"bounceType": bounce_type, "bounceSubType": "General", "timestamp": _sns_time(), "feedbackId": "fb-1",
                         "bouncedRecipients": [{"emailAddress": r, "action": "failed", "status": "5.1.1",
                                                "diagnosticCode": "smtp; 550 5.1.1 user unknown"} for r in recipients]}
    elif kind == "Complaint":
        ses["complaint"] = {"complainedRecipients": [{"emailAddress": r} for r in recipients], "timestamp": _sns_time(),
                            "feedbackId": "fb-2", "complaintFeedbackType": "abuse"}
    elif kind == "Delivery":
        ses["delivery"] = {"timestamp": _sns_time(), "recipients": recipients, "smtpResponse": "250 ok"}
    return {
        "Type": "Notification", "MessageId": str(uuid.uuid4()), "TopicArn": topic, "Message": json.dumps(ses),
        "Timestamp": _sns_time(at), "UnsubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=Unsubscribe",
    }


# --- SendGrid and Mailgun signatures ------------------------------------------------------------------


def _public(key: ec.EllipticCurvePrivateKey) -> str:
    """A SendGrid verification key as SendGrid shows it: base64 DER."""
    return base64.b64encode(key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).decode()


SENDGRID_KEY = ec.generate_private_key(ec.SECP256R1())  # the operator's account
SENDGRID_PUBLIC = _public(SENDGRID_KEY)
# Users' own accounts (their sender settings): /v1/inbound/<provider>/<user id>.
USER_SENDGRID_KEY, OTHER_SENDGRID_KEY = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
USER_MAILGUN_KEY = "user-own-mailgun-signing-key-9876543210"
USER_TOPIC = "arn:aws:sns:eu-west-1:210987654321:user-ses-events"


def sendgrid_request(events: list[dict[str, Any]], *, key: ec.EllipticCurvePrivateKey = SENDGRID_KEY,
                     timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(events).encode()
    ts = str(timestamp if timestamp is not None else int(time.time()))
    signature = base64.b64encode(key.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))).decode()
    return body, {"X-Twilio-Email-Event-Webhook-Signature": signature, "X-Twilio-Email-Event-Webhook-Timestamp": ts,
                  "Content-Type": "application/json"}


def sendgrid_event(event: str, message_id: str, email: str, **extra: Any) -> dict[str, Any]:
    return {"email": email, "timestamp": int(time.time()), "event": event, "sg_event_id": uuid.uuid4().hex,
            "sg_message_id": f"{message_id}.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0", **extra}


def mailgun_request(event_data: dict[str, Any], *, key: str = MAILGUN_SIGNING_KEY, timestamp: int | None = None,
                    token: str | None = None) -> dict[str, Any]:
    ts, token = str(timestamp if timestamp is not None else int(time.time())), token or uuid.uuid4().hex * 2
    signature = hmac.new(key.encode(), (ts + token).encode(), hashlib.sha256).hexdigest()
    return {"signature": {"timestamp": ts, "token": token, "signature": signature}, "event-data": event_data}


def mailgun_event(event: str, message_id: str, recipient: str, **extra: Any) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex, "event": event, "timestamp": time.time(), "recipient": recipient,
            "message": {"headers": {"message-id": message_id, "to": recipient}}, **extra}


# --- the stack ------------------------------------------------------------------------------------------


@dataclass
class Inbound:
    stack: Stack
    sns: LocalSns
    sendgrid: FakeSendGrid
    mailgun: FakeMailgun
    ses_url: str  # moto's SES

    @property
    def http(self) -> httpx.AsyncClient:
        return self.stack.http


@pytest.fixture(scope="module")
async def inbound_stack(
    client: Client, database_url: str, temporal_server: TemporalDevServer, tmp_path_factory: pytest.TempPathFactory,
    dns_stub: DnsStub,
) -> AsyncIterator[Inbound]:
    tmp = tmp_path_factory.mktemp("inbound")
    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    ses_url = f"http://localhost:{moto_port}"  # by name: the test stacks' egress policy allows localhost
    with LocalSns() as sns, FakeSendGrid(SENDGRID_API_KEY) as sendgrid, FakeMailgun(MAILGUN_API_KEY, MAILGUN_DOMAIN) as mailgun:
        async with running_stack(
            client, database_url, temporal_server.address, dns_stub.server, tmp, "inbound",
            sns_topic_arns=f"arn:aws:sns:us-east-1:123456789012:other, {TOPIC}", sns_cert_url_pattern=f"{sns.url}/",
            sendgrid_webhook_public_key=SENDGRID_PUBLIC, mailgun_webhook_signing_key=MAILGUN_SIGNING_KEY,
            sendgrid_base_url=sendgrid.url, mailgun_base_url=mailgun.url, ses_endpoint_url=ses_url,
        ) as stack:
            yield Inbound(stack, sns, sendgrid, mailgun, ses_url)
    moto.stop()


@pytest.fixture
async def user(inbound_stack: Inbound, sessions: Any) -> AsyncIterator[Sender]:
    async with new_user(inbound_stack.stack, sessions) as sender:
        yield sender


@pytest.fixture
async def other(inbound_stack: Inbound, sessions: Any) -> AsyncIterator[Sender]:
    """A second user: their emails must stay out of reach of the first user's routes."""
    async with new_user(inbound_stack.stack, sessions) as sender:
        yield sender


async def _put_settings(sender: Sender, **body: Any) -> dict[str, Any]:
    put = await sender.http.put("/v1/settings/mail", json=body)
    assert put.status_code == 200, put.text
    return put.json()


async def _use_ses(inbound_stack: Inbound, sender: Sender, **settings: Any) -> Sender:
    """`sender` sending through their own SES account (moto's), their domain verified there."""
    ses = boto3.client("sesv2", region_name=AWS_REGION, endpoint_url=inbound_stack.ses_url, aws_access_key_id=AWS_KEY_ID,
                       aws_secret_access_key=AWS_SECRET)
    ses.create_email_identity(EmailIdentity=sender.domain)
    await _put_settings(sender, driver="ses", api_key=AWS_KEY_ID, api_secret=AWS_SECRET, ses_region=AWS_REGION, **settings)
    return sender


@pytest.fixture
async def ses_user(inbound_stack: Inbound, user: Sender) -> Sender:
    """A user sending through their own SES account (moto's), their domain verified there."""
    return await _use_ses(inbound_stack, user)


async def _sent(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """An email accepted and sent; its record (with the provider message id the send step recorded)."""
    r = await post_email(http, body, str(uuid.uuid4()))
    assert r.status_code == 202, r.text
    record = await wait_status(http, r.json()["id"], "sent")
    assert record["provider_message_id"], record
    return record


async def _record(http: httpx.AsyncClient, email_id: str) -> dict[str, Any]:
    r = await http.get(f"/v1/emails/{email_id}")
    assert r.status_code == 200, r.text
    return r.json()


async def _suppressed(http: httpx.AsyncClient, address: str, user_id: str | None = None) -> list[dict[str, Any]]:
    params = {"address": address} | ({"user_id": user_id} if user_id else {})
    r = await http.get("/v1/suppressions", params=params)
    assert r.status_code == 200, r.text
    return [{k: i[k] for k in ("address", "reason", "source")} for i in r.json()["items"]]


def _feedback_events(record: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    """The record's events from the receiving side, sorted: SendGrid dates its events to the second
    (by its clock), so their order among themselves and against our own events is not ours to assert."""
    kinds = ("delivered", "bounced", "complained", "unsubscribed")
    return sorted((e["event"], e["status"], e["detail"]) for e in record["events"] if e["event"] in kinds)


def _counts(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return r.json()


# --- end to end: a hard bounce through SendGrid stops the next email ---------------------------------------


async def test_a_sendgrid_hard_bounce_suppresses_the_address_and_the_next_email_is_not_sent(inbound_stack: Inbound, user: Sender) -> None:
    http = inbound_stack.http
    put = await user.http.put("/v1/settings/mail", json={"driver": "sendgrid", "api_key": SENDGRID_API_KEY})
    assert put.status_code == 200, put.text
    first = await _sent(user.http, user.mail(to=["Bob <bob@example.net>"]))
    assert len([r for r in inbound_stack.sendgrid.received if r.json["personalizations"][0]["to"][0]["email"] == "bob@example.net"]) == 1
    provider_id = first["provider_message_id"]
    assert provider_id.startswith("sg-")  # the fake's X-Message-Id, as SendGrid's

    delivered = sendgrid_event("delivered", provider_id, "bob@example.net", response="250 2.0.0 OK")
    bounce = sendgrid_event("bounce", provider_id, "bob@example.net", type="bounce", status="5.1.1", reason="550 5.1.1 user unknown")
    opened = sendgrid_event("open", provider_id, "bob@example.net")
    body, headers = sendgrid_request([delivered, bounce, opened])
    assert _counts(await http.post("/v1/inbound/sendgrid", content=body, headers=headers)) == {
        "recorded": 2, "duplicates": 0, "unknown": 0, "ignored": 1, "confirmed": False,
    }
    record = await _record(user.http, first["id"])
    assert record["status"] == "bounced"
    assert _feedback_events(record) == [
        ("bounced", "bounced", "hard bounce from sendgrid for bob@example.net: 5.1.1 550 5.1.1 user unknown"),
        ("delivered", "delivered", "delivered from sendgrid for bob@example.net: 250 2.0.0 OK"),
    ]
    assert await _suppressed(user.http, "bob@example.net") == [{"address": "bob@example.net", "reason": "hard_bounce", "source": "sendgrid"}]

    # SendGrid sends the batch again (it retries until it sees a 2xx): nothing changes.
    body, headers = sendgrid_request([delivered, bounce])
    assert _counts(await http.post("/v1/inbound/sendgrid", content=body, headers=headers))["duplicates"] == 2
    assert len((await _record(user.http, first["id"]))["events"]) == len(record["events"])

    # The next email to that address is accepted, never sent.
    sent_before = len(inbound_stack.sendgrid.received)
    r = await post_email(user.http, user.mail(to=["bob@example.net"]), str(uuid.uuid4()))
    assert r.status_code == 202, r.text
    after = await wait_status(user.http, r.json()["id"], "suppressed")
    assert any(e["event"] == "suppressed" and "hard_bounce" in (e["detail"] or "") for e in after["events"])
    # And mail to someone else through the same provider still goes: the provider was reachable all along.
    await _sent(user.http, user.mail(to=["carol@example.net"]))
    assert len(inbound_stack.sendgrid.received) == sent_before + 1
    assert all(r.json["personalizations"][0]["to"][0]["email"] != "bob@example.net" for r in inbound_stack.sendgrid.received[sent_before:])


# --- SendGrid: the signature ------------------------------------------------------------------------------


async def test_sendgrid_refuses_unsigned_tampered_stale_and_wrongly_keyed_events(inbound_stack: Inbound, user: Sender) -> None:
    http = inbound_stack.http
    await user.http.put("/v1/settings/mail", json={"driver": "sendgrid", "api_key": SENDGRID_API_KEY})
    sent = await _sent(user.http, user.mail(to=["dan@example.net"]))
    spam = sendgrid_event("spamreport", sent["provider_message_id"], "dan@example.net")
    body, headers = sendgrid_request([spam])

    unsigned = await http.post("/v1/inbound/sendgrid", content=body, headers={"Content-Type": "application/json"})
    assert unsigned.status_code == 401 and "WWW-Authenticate" in unsigned.headers, unsigned.text
    tampered = body.replace(b"dan@example.net", b"eve@example.net")
    assert (await http.post("/v1/inbound/sendgrid", content=tampered, headers=headers)).status_code == 403
    other_key = ec.generate_private_key(ec.SECP256R1())
    assert (await http.post("/v1/inbound/sendgrid", content=body, headers=sendgrid_request([spam], key=other_key)[1])).status_code == 403
    stale_body, stale_headers = sendgrid_request([spam], timestamp=int(time.time()) - 3600)
    stale = await http.post("/v1/inbound/sendgrid", content=stale_body, headers=stale_headers)
    assert stale.status_code == 403 and "older than" in stale.json()["detail"]
    garbled = dict(headers, **{"X-Twilio-Email-Event-Webhook-Signature": "not base64!"})
    assert (await http.post("/v1/inbound/sendgrid", content=body, headers=garbled)).status_code == 403

    # None of these changed anything.
    assert (await _record(user.http, sent["id"]))["status"] == "sent"
    assert await _suppressed(user.http, "dan@example.net") == []
    # The genuine one does.
    assert _counts(await http.post("/v1/inbound/sendgrid", content=body, headers=headers))["recorded"] == 1
    assert (await _record(user.http, sent["id"]))["status"] == "complained"
    assert await _suppressed(user.http, "dan@example.net") == [{"address": "dan@example.net", "reason": "complaint", "source": "sendgrid"}]


async def test_sendgrid_signed_bodies_that_are_not_events_are_4xx_and_unknown_ids_are_counted(inbound_stack: Inbound) -> None:
    http = inbound_stack.http
    for raw, status in ((b"not json", 400), (b'{"event": "bounce"}', 422), (b'[{"email": "a@example.com"}]', 422), (b"[1]", 422)):
        ts = str(int(time.time()))
        signature = base64.b64encode(SENDGRID_KEY.sign(ts.encode() + raw, ec.ECDSA(hashes.SHA256()))).decode()
        r = await http.post("/v1/inbound/sendgrid", content=raw, headers={
            "X-Twilio-Email-Event-Webhook-Signature": signature, "X-Twilio-Email-Event-Webhook-Timestamp": ts})
        assert r.status_code == status and "detail" in r.json(), (raw, r.text)
    body, headers = sendgrid_request([
        sendgrid_event("bounce", "never-sent-by-us", "x@example.net", type="bounce"),
        sendgrid_event("deferred", "never-sent-either", "y@example.net"),
        {"event": "processed", "email": "z@example.net"},
    ])
    assert _counts(await http.post("/v1/inbound/sendgrid", content=body, headers=headers)) == {
        "recorded": 0, "duplicates": 0, "unknown": 2, "ignored": 1, "confirmed": False,
    }
    assert await _suppressed(http, "x@example.net") == []


async def test_sendgrid_blocked_deferred_and_dropped_are_soft(inbound_stack: Inbound, user: Sender) -> None:
    http = inbound_stack.http
    await user.http.put("/v1/settings/mail", json={"driver": "sendgrid", "api_key": SENDGRID_API_KEY})
    sent = await _sent(user.http, user.mail(to=["fay@example.net"]))
    pid = sent["provider_message_id"]
    body, headers = sendgrid_request([
        sendgrid_event("bounce", pid, "fay@example.net", type="blocked", reason="IP blocked"),
        sendgrid_event("deferred", pid, "fay@example.net", response="421 try later"),
        sendgrid_event("dropped", pid, "fay@example.net", reason="Bounced Address"),
        sendgrid_event("unsubscribe", pid, "fay@example.net"),
    ])
    assert _counts(await http.post("/v1/inbound/sendgrid", content=body, headers=headers))["recorded"] == 4
    record = await _record(user.http, sent["id"])
    assert record["status"] == "sent"  # soft bounces and an unsubscribe say nothing final about delivery
    assert _feedback_events(record) == [
        ("bounced", None, "soft bounce from sendgrid for fay@example.net: IP blocked"),
        ("bounced", None, "soft bounce from sendgrid for fay@example.net: deferred 421 try later"),
        ("bounced", None, "soft bounce from sendgrid for fay@example.net: dropped Bounced Address"),
        ("unsubscribed", None, "unsubscribed from sendgrid for fay@example.net: unsubscribe"),
    ]
    assert await _suppressed(user.http, "fay@example.net") == [{"address": "fay@example.net", "reason": "unsubscribe", "source": "sendgrid"}]


# --- SES through SNS -----------------------------------------------------------------------------------------


async def test_ses_events_signed_by_sns_are_recorded(inbound_stack: Inbound, ses_user: Sender) -> None:
    """Mail through a user's SES (moto records the MessageId SES events name): a bounce (SignatureVersion 1),
    then a complaint (2, and event publishing's eventType), a soft bounce, a delivery, an event not recorded."""
    http, sns, mine = inbound_stack.http, inbound_stack.sns, ses_user.http
    sent = await _sent(mine, ses_user.mail(to=["gus@example.net", "hal@example.net"]))
    pid = sent["provider_message_id"]
    bounce = sns.sign(ses_notification("Bounce", pid, ["gus@example.net"]), version="1")
    assert _counts(await http.post("/v1/inbound/ses", content=json.dumps(bounce), headers={"Content-Type": "text/plain; charset=UTF-8"}))[
        "recorded"] == 1
    assert await _suppressed(mine, "gus@example.net") == [{"address": "gus@example.net", "reason": "hard_bounce", "source": "ses"}]
    assert (await _record(mine, sent["id"]))["status"] == "bounced"
    # The same notification again (SNS retries): a duplicate. The certificate was fetched once.
    assert _counts(await http.post("/v1/inbound/ses", json=bounce))["duplicates"] == 1
    assert inbound_stack.sns.gets.count("/cert.pem") == 1

    complaint = sns.sign(ses_notification("Complaint", pid, ["hal@example.net"], event_publishing=True), version="2")
    assert _counts(await http.post("/v1/inbound/ses", json=complaint))["recorded"] == 1
    assert await _suppressed(mine, "hal@example.net") == [{"address": "hal@example.net", "reason": "complaint", "source": "ses"}]
    record = await _record(mine, sent["id"])
    assert record["status"] == "complained"
    assert [e["event"] for e in record["events"]][-2:] == ["bounced", "complained"]

    soft = sns.sign(ses_notification("Bounce", pid, ["hal@example.net"], bounce_type="Transient"))
    delivery = sns.sign(ses_notification("Delivery", pid, ["gus@example.net"]))
    send = sns.sign(ses_notification("Send", pid, ["gus@example.net"], event_publishing=True))
    assert _counts(await http.post("/v1/inbound/ses", json=soft))["recorded"] == 1
    assert _counts(await http.post("/v1/inbound/ses", json=delivery))["recorded"] == 1
    assert _counts(await http.post("/v1/inbound/ses", json=send))["ignored"] == 1
    record = await _record(mine, sent["id"])
    assert record["status"] == "complained"  # never back down
    # Both recorded. Their events carry the provider's times, which these notifications made within the
    # same millisecond now and then: equal times have no order of their own.
    assert sorted(e["event"] for e in record["events"][-2:]) == ["bounced", "delivered"]


async def test_ses_refuses_unsigned_tampered_wrong_cert_stale_and_foreign_topics(inbound_stack: Inbound, ses_user: Sender) -> None:
    http, sns, mine = inbound_stack.http, inbound_stack.sns, ses_user.http
    sent = await _sent(mine, ses_user.mail(to=["ida@example.net"]))
    pid = sent["provider_message_id"]
    genuine = sns.sign(ses_notification("Bounce", pid, ["ida@example.net"]))

    unsigned = {k: v for k, v in genuine.items() if k != "Signature"}
    r = await http.post("/v1/inbound/ses", json=unsigned)
    assert r.status_code == 401 and "WWW-Authenticate" in r.headers, r.text
    tampered = dict(genuine, Message=genuine["Message"].replace("ida@example.net", "joe@example.net"))
    assert (await http.post("/v1/inbound/ses", json=tampered)).status_code == 403
    wrong_cert = sns.sign(ses_notification("Bounce", pid, ["ida@example.net"]), cert="/other.pem")
    assert (await http.post("/v1/inbound/ses", json=wrong_cert)).status_code == 403
    other_key = sns.sign(ses_notification("Bounce", pid, ["ida@example.net"]), key=sns.other_key)
    assert (await http.post("/v1/inbound/ses", json=other_key)).status_code == 403
    expired = sns.sign(ses_notification("Bounce", pid, ["ida@example.net"]), cert="/expired.pem")
    r = await http.post("/v1/inbound/ses", json=expired)
    assert r.status_code == 403 and "not valid now" in r.json()["detail"]
    fetched = list(sns.gets)
    foreign_cert = dict(genuine, SigningCertURL="https://sns.evil.example/cert.pem")
    r = await http.post("/v1/inbound/ses", json=foreign_cert)
    assert r.status_code == 403 and "SigningCertURL" in r.json()["detail"]
    assert sns.gets == fetched  # no request to a URL the allowlist does not name
    stale = sns.sign(ses_notification("Bounce", pid, ["ida@example.net"], at=datetime.now(UTC) - timedelta(hours=2)))
    r = await http.post("/v1/inbound/ses", json=stale)
    assert r.status_code == 403 and "older than" in r.json()["detail"]
    # Genuinely signed by SNS, but for someone else's topic (any AWS account can have SNS sign for it).
    foreign = sns.sign(ses_notification("Bounce", pid, ["ida@example.net"], topic="arn:aws:sns:eu-west-1:999999999999:theirs"))
    r = await http.post("/v1/inbound/ses", json=foreign)
    assert r.status_code == 403 and "MAILQUEUE_SNS_TOPIC_ARNS" in r.json()["detail"]
    for raw, status in ((b"{", 400), (b'{"Type": "Notification"}', 422), (b'{"Type": "Nope", "MessageId": "1"}', 422)):
        assert (await http.post("/v1/inbound/ses", content=raw)).status_code == status, raw

    assert (await _record(mine, sent["id"]))["status"] == "sent"
    assert await _suppressed(mine, "ida@example.net") == [] and await _suppressed(mine, "joe@example.net") == []
    assert _counts(await http.post("/v1/inbound/ses", json=genuine))["recorded"] == 1
    assert (await _record(mine, sent["id"]))["status"] == "bounced"


async def test_ses_subscription_confirmation_is_verified_then_confirmed(inbound_stack: Inbound) -> None:
    http, sns = inbound_stack.http, inbound_stack.sns
    token = uuid.uuid4().hex
    confirmation = {
        "Type": "SubscriptionConfirmation", "MessageId": str(uuid.uuid4()), "Token": token, "TopicArn": TOPIC,
        "Message": f"You have chosen to subscribe to the topic {TOPIC}.", "Timestamp": _sns_time(),
        "SubscribeURL": f"{sns.url}/confirm?Action=ConfirmSubscription&TopicArn={TOPIC}&Token={token}",
    }
    forged = sns.sign(confirmation, key=sns.other_key)
    assert (await http.post("/v1/inbound/ses", json=forged)).status_code == 403
    assert not [g for g in sns.gets if token in g]  # a forged confirmation is not followed
    elsewhere = sns.sign(dict(confirmation, SubscribeURL=f"https://evil.example/confirm?Token={token}"))
    assert (await http.post("/v1/inbound/ses", json=elsewhere)).status_code == 403

    r = await http.post("/v1/inbound/ses", json=sns.sign(confirmation), headers={"x-amz-sns-message-type": "SubscriptionConfirmation"})
    assert _counts(r)["confirmed"] is True
    assert [g for g in sns.gets if token in g] == [f"/confirm?Action=ConfirmSubscription&TopicArn={TOPIC}&Token={token}"]

    goodbye = sns.sign(dict(confirmation, Type="UnsubscribeConfirmation", MessageId=str(uuid.uuid4())))
    assert _counts(await http.post("/v1/inbound/ses", json=goodbye)) == {
        "recorded": 0, "duplicates": 0, "unknown": 0, "ignored": 0, "confirmed": False,
    }
    assert len([g for g in sns.gets if token in g]) == 1  # an unsubscribe confirmation is only logged


# --- Mailgun -------------------------------------------------------------------------------------------------


async def test_mailgun_events_are_verified_and_a_replayed_token_is_refused(inbound_stack: Inbound, user: Sender) -> None:
    http = inbound_stack.http
    put = await user.http.put("/v1/settings/mail", json={"driver": "mailgun", "api_key": MAILGUN_API_KEY, "mailgun_domain": MAILGUN_DOMAIN})
    assert put.status_code == 200, put.text
    sent = await _sent(user.http, user.mail(to=["kim@example.net"]))
    pid = sent["provider_message_id"]
    assert pid.endswith(f"@{MAILGUN_DOMAIN}") and not pid.startswith("<")  # the fake's id, as Mailgun's

    failed = mailgun_event("failed", pid, "kim@example.net", severity="permanent", reason="bounce",
                           **{"delivery-status": {"code": 550, "message": "5.1.1 mailbox unavailable"}})
    genuine = mailgun_request(failed)
    unsigned = {"event-data": failed}
    r = await http.post("/v1/inbound/mailgun", json=unsigned)
    assert r.status_code == 401 and "WWW-Authenticate" in r.headers, r.text
    tampered = json.loads(json.dumps(genuine))
    tampered["signature"]["timestamp"] = str(int(genuine["signature"]["timestamp"]) + 1)
    assert (await http.post("/v1/inbound/mailgun", json=tampered)).status_code == 403
    wrong_key = mailgun_request(failed, key="another-signing-key")
    assert (await http.post("/v1/inbound/mailgun", json=wrong_key)).status_code == 403
    stale = mailgun_request(failed, timestamp=int(time.time()) - 3600)
    r = await http.post("/v1/inbound/mailgun", json=stale)
    assert r.status_code == 403 and "older than" in r.json()["detail"]
    for raw, status in ((b"nope", 400), (b'{"signature": {}}', 422), (b'{"event-data": []}', 422)):
        assert (await http.post("/v1/inbound/mailgun", content=raw)).status_code == status, raw
    assert (await _record(user.http, sent["id"]))["status"] == "sent"
    assert await _suppressed(user.http, "kim@example.net") == []

    assert _counts(await http.post("/v1/inbound/mailgun", json=genuine))["recorded"] == 1
    record = await _record(user.http, sent["id"])
    assert record["status"] == "bounced" and record["events"][-1]["detail"] == (
        "hard bounce from mailgun for kim@example.net: 550 5.1.1 mailbox unavailable")
    assert await _suppressed(user.http, "kim@example.net") == [{"address": "kim@example.net", "reason": "hard_bounce", "source": "mailgun"}]
    # The very same request again: its token was used.
    r = await http.post("/v1/inbound/mailgun", json=genuine)
    assert r.status_code == 403 and "used before" in r.json()["detail"]
    # A fresh signature over the same event (Mailgun's retry): a duplicate, not a second event.
    assert _counts(await http.post("/v1/inbound/mailgun", json=mailgun_request(failed)))["duplicates"] == 1
    # One request sent twice at once: the database lets one token through (for every API process alike).
    twice = mailgun_request(failed)
    answers = await asyncio.gather(*(http.post("/v1/inbound/mailgun", json=twice) for _ in range(2)))
    assert sorted(a.status_code for a in answers) == [200, 403], [a.text for a in answers]
    assert len((await _record(user.http, sent["id"]))["events"]) == len(record["events"])


async def test_mailgun_temporary_failures_are_soft_and_other_kinds_are_recorded(inbound_stack: Inbound, user: Sender) -> None:
    http = inbound_stack.http
    await user.http.put("/v1/settings/mail", json={"driver": "mailgun", "api_key": MAILGUN_API_KEY, "mailgun_domain": MAILGUN_DOMAIN})
    sent = await _sent(user.http, user.mail(to=["lee@example.net"]))
    pid = f"<{sent['provider_message_id']}>"  # either form matches
    events = [
        mailgun_event("failed", pid, "lee@example.net", severity="temporary", **{"delivery-status": {"code": 452, "message": "mailbox full"}}),
        mailgun_event("delivered", pid, "lee@example.net", **{"delivery-status": {"code": 250, "message": "OK"}}),
        mailgun_event("opened", pid, "lee@example.net"),
        mailgun_event("unsubscribed", pid, "lee@example.net"),
    ]
    results = [_counts(await http.post("/v1/inbound/mailgun", json=mailgun_request(e))) for e in events]
    assert [(r["recorded"], r["ignored"]) for r in results] == [(1, 0), (1, 0), (0, 1), (1, 0)]
    record = await _record(user.http, sent["id"])
    assert record["status"] == "delivered"
    assert [e["event"] for e in record["events"]][-3:] == ["bounced", "delivered", "unsubscribed"]
    assert await _suppressed(user.http, "lee@example.net") == [{"address": "lee@example.net", "reason": "unsubscribe", "source": "mailgun"}]


async def test_bodies_over_the_request_limit_are_refused_before_anything_is_read(inbound_stack: Inbound) -> None:
    limit = inbound_stack.stack.settings.max_request_bytes
    for route in ("ses", "sendgrid", "mailgun"):
        r = await inbound_stack.http.post(f"/v1/inbound/{route}", content=b"[" + b" " * limit + b"]")
        assert r.status_code == 413 and "larger than" in r.json()["detail"], (route, r.text)


# --- a user's own provider account: /v1/inbound/<provider>/<user id> ------------------------------------------------


async def test_a_users_sendgrid_events_are_verified_with_their_own_key_and_touch_only_their_emails(
    inbound_stack: Inbound, user: Sender, other: Sender,
) -> None:
    http = inbound_stack.http
    await _put_settings(user, driver="sendgrid", api_key=SENDGRID_API_KEY, sendgrid_webhook_public_key=_public(USER_SENDGRID_KEY))
    await _put_settings(other, driver="sendgrid", api_key=SENDGRID_API_KEY, sendgrid_webhook_public_key=_public(OTHER_SENDGRID_KEY))
    mine = await _sent(user.http, user.mail(to=["uma@example.net"]))
    theirs = await _sent(other.http, other.mail(to=["uma@example.net"]))
    route = f"/v1/inbound/sendgrid/{user.id}"
    bounce = sendgrid_event("bounce", mine["provider_message_id"], "uma@example.net", type="bounce", status="5.1.1", reason="550 no such user")
    body, headers = sendgrid_request([bounce], key=USER_SENDGRID_KEY)

    # Signed by the operator's account or by another user's: not this user's events.
    for key in (SENDGRID_KEY, OTHER_SENDGRID_KEY):
        r = await http.post(route, content=body, headers=sendgrid_request([bounce], key=key)[1])
        assert r.status_code == 403 and "does not verify" in r.json()["detail"], r.text
    # The user's signature is no good on the operator's route either, and an unsigned request is a 401 here too.
    assert (await http.post("/v1/inbound/sendgrid", content=body, headers=headers)).status_code == 403
    unsigned = await http.post(route, content=body, headers={"Content-Type": "application/json"})
    assert unsigned.status_code == 401 and "WWW-Authenticate" in unsigned.headers, unsigned.text
    assert (await _record(user.http, mine["id"]))["status"] == "sent"
    assert await _suppressed(user.http, "uma@example.net") == []

    assert _counts(await http.post(route, content=body, headers=headers)) == {
        "recorded": 1, "duplicates": 0, "unknown": 0, "ignored": 0, "confirmed": False,
    }
    assert (await _record(user.http, mine["id"]))["status"] == "bounced"
    assert await _suppressed(user.http, "uma@example.net") == [{"address": "uma@example.net", "reason": "hard_bounce", "source": "sendgrid"}]

    # Signed by this user, about the other user's email: counted unknown, nothing of theirs changes.
    spam = sendgrid_event("spamreport", theirs["provider_message_id"], "uma@example.net")
    body, headers = sendgrid_request([spam], key=USER_SENDGRID_KEY)
    assert _counts(await http.post(route, content=body, headers=headers))["unknown"] == 1
    assert (await _record(other.http, theirs["id"]))["status"] == "sent"
    assert await _suppressed(other.http, "uma@example.net") == []
    # The very event, signed by its own sender's account on their route, is recorded: it was only out of reach.
    body, headers = sendgrid_request([spam], key=OTHER_SENDGRID_KEY)
    assert _counts(await http.post(f"/v1/inbound/sendgrid/{other.id}", content=body, headers=headers))["recorded"] == 1
    assert (await _record(other.http, theirs["id"]))["status"] == "complained"


async def test_a_users_ses_events_come_only_from_their_own_topics_and_touch_only_their_emails(
    inbound_stack: Inbound, ses_user: Sender, other: Sender,
) -> None:
    http, sns = inbound_stack.http, inbound_stack.sns
    await _use_ses(inbound_stack, ses_user, sns_topic_arns=[USER_TOPIC])
    await _use_ses(inbound_stack, other)
    mine = await _sent(ses_user.http, ses_user.mail(to=["vic@example.net"]))
    theirs = await _sent(other.http, other.mail(to=["vic@example.net"]))
    route = f"/v1/inbound/ses/{ses_user.id}"

    # The operator's topic (genuinely signed by SNS) on the user's route, the user's topic on the operator's route: refused.
    operators = sns.sign(ses_notification("Bounce", mine["provider_message_id"], ["vic@example.net"]))
    r = await http.post(route, json=operators)
    assert r.status_code == 403 and "the user's sns_topic_arns" in r.json()["detail"], r.text
    genuine = sns.sign(ses_notification("Bounce", mine["provider_message_id"], ["vic@example.net"], topic=USER_TOPIC))
    assert (await http.post("/v1/inbound/ses", json=genuine)).status_code == 403
    assert (await http.post(route, json=dict(genuine, Message=genuine["Message"].replace("vic@", "wes@")))).status_code == 403
    assert (await _record(ses_user.http, mine["id"]))["status"] == "sent"

    assert _counts(await http.post(route, json=genuine))["recorded"] == 1
    assert (await _record(ses_user.http, mine["id"]))["status"] == "bounced"
    assert await _suppressed(ses_user.http, "vic@example.net") == [{"address": "vic@example.net", "reason": "hard_bounce", "source": "ses"}]

    # From the user's topic, about the other user's email: unknown here, nothing of theirs changes.
    about_theirs = sns.sign(ses_notification("Complaint", theirs["provider_message_id"], ["vic@example.net"], topic=USER_TOPIC))
    assert _counts(await http.post(route, json=about_theirs))["unknown"] == 1
    assert (await _record(other.http, theirs["id"]))["status"] == "sent"
    assert await _suppressed(other.http, "vic@example.net") == []

    # The user's topic subscribes to the user's route: confirmed there.
    token = uuid.uuid4().hex
    confirmation = sns.sign({
        "Type": "SubscriptionConfirmation", "MessageId": str(uuid.uuid4()), "Token": token, "TopicArn": USER_TOPIC,
        "Message": f"You have chosen to subscribe to the topic {USER_TOPIC}.", "Timestamp": _sns_time(),
        "SubscribeURL": f"{sns.url}/confirm?Action=ConfirmSubscription&TopicArn={USER_TOPIC}&Token={token}",
    })
    assert _counts(await http.post(route, json=confirmation))["confirmed"] is True
    assert len([g for g in sns.gets if token in g]) == 1


async def test_a_users_mailgun_signing_key_is_a_secret_and_verifies_their_events(
    inbound_stack: Inbound, user: Sender, other: Sender, sessions: Any,
) -> None:
    http = inbound_stack.http
    mailgun = {"driver": "mailgun", "api_key": MAILGUN_API_KEY, "mailgun_domain": MAILGUN_DOMAIN}
    put = await _put_settings(user, **mailgun, mailgun_webhook_signing_key=USER_MAILGUN_KEY)
    shown = await user.http.get("/v1/settings/mail")
    assert shown.status_code == 200 and shown.json()["mailgun_webhook_signing_key_set"] is True and put == shown.json()
    assert USER_MAILGUN_KEY not in json.dumps(put) and USER_MAILGUN_KEY not in shown.text
    async with sessions() as s:
        stored = (await s.get(SenderSettings, user.id)).mailgun_webhook_signing_key_enc  # type: ignore[union-attr]
    assert stored and USER_MAILGUN_KEY not in stored
    await _put_settings(other, **mailgun)
    mine = await _sent(user.http, user.mail(to=["xia@example.net"]))
    theirs = await _sent(other.http, other.mail(to=["xia@example.net"]))
    route = f"/v1/inbound/mailgun/{user.id}"
    failed = mailgun_event("failed", mine["provider_message_id"], "xia@example.net", severity="permanent",
                           **{"delivery-status": {"code": 550, "message": "5.1.1 no mailbox"}})

    # Signed with the operator's key: not this user's; the user's signature is no good on the operator's route.
    r = await http.post(route, json=mailgun_request(failed))
    assert r.status_code == 403 and "does not verify" in r.json()["detail"], r.text
    assert (await http.post("/v1/inbound/mailgun", json=mailgun_request(failed, key=USER_MAILGUN_KEY))).status_code == 403
    assert (await _record(user.http, mine["id"]))["status"] == "sent"

    genuine = mailgun_request(failed, key=USER_MAILGUN_KEY)
    assert _counts(await http.post(route, json=genuine))["recorded"] == 1
    assert (await _record(user.http, mine["id"]))["status"] == "bounced"
    assert await _suppressed(user.http, "xia@example.net") == [{"address": "xia@example.net", "reason": "hard_bounce", "source": "mailgun"}]
    r = await http.post(route, json=genuine)  # the same token again
    assert r.status_code == 403 and "used before" in r.json()["detail"]

    # Signed by this user, about the other user's email: unknown, nothing of theirs changes.
    about_theirs = mailgun_event("complained", theirs["provider_message_id"], "xia@example.net")
    assert _counts(await http.post(route, json=mailgun_request(about_theirs, key=USER_MAILGUN_KEY)))["unknown"] == 1
    assert (await _record(other.http, theirs["id"]))["status"] == "sent"
    assert await _suppressed(other.http, "xia@example.net") == []

    # The key goes nowhere, so a change of driver keeps it; "" removes it, and the route refuses as for no user at all.
    moved = await _put_settings(user, driver="sendgrid", api_key=SENDGRID_API_KEY)
    assert moved["mailgun_webhook_signing_key_set"] is True and moved["api_key_set"] is True
    removed = await _put_settings(user, driver="sendgrid", mailgun_webhook_signing_key="")
    assert removed["mailgun_webhook_signing_key_set"] is False
    again = mailgun_request(mailgun_event("delivered", mine["provider_message_id"], "xia@example.net"), key=USER_MAILGUN_KEY)
    r = await http.post(route, json=again)
    assert r.status_code == 403 and "no such user, or no mailgun_webhook_signing_key" in r.json()["detail"], r.text
    assert USER_MAILGUN_KEY not in (inbound_stack.stack.tmp / "api.log").read_text()


async def test_an_unknown_user_and_a_user_without_the_key_get_the_same_refusal(inbound_stack: Inbound, user: Sender, other: Sender) -> None:
    """User ids cannot be probed: no user, and a user without that provider's key, are one answer."""
    http, sns = inbound_stack.http, inbound_stack.sns
    await _put_settings(user, sendgrid_webhook_public_key=_public(USER_SENDGRID_KEY))  # SendGrid only; `other` has nothing
    nobody = str(uuid.uuid4())
    sendgrid_body, sendgrid_headers = sendgrid_request([sendgrid_event("delivered", "m-1", "a@example.net")])
    requests = {
        "ses": {"json": sns.sign(ses_notification("Delivery", "m-1", ["a@example.net"], topic=USER_TOPIC))},
        "sendgrid": {"content": sendgrid_body, "headers": sendgrid_headers},
        "mailgun": {"json": mailgun_request(mailgun_event("delivered", "m-1", "a@example.net"), key=USER_MAILGUN_KEY)},
    }
    for provider, request in requests.items():
        without = [other.id] + ([user.id] if provider != "sendgrid" else [])
        answers = [await http.post(f"/v1/inbound/{provider}/{who}", **request) for who in (nobody, *without)]
        assert {a.status_code for a in answers} == {403}, (provider, [a.text for a in answers])
        assert len({a.text for a in answers}) == 1, (provider, [a.text for a in answers])
        assert "no such user, or no" in answers[0].json()["detail"]
    # The user's SendGrid route does take events: it answers for the signature, not "no such user".
    r = await http.post(f"/v1/inbound/sendgrid/{user.id}", **requests["sendgrid"])
    assert r.status_code == 403 and "does not verify" in r.json()["detail"]


async def test_inbound_keys_in_sender_settings_are_checked_when_stored(user: Sender) -> None:
    rsa_public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    rsa_b64 = base64.b64encode(rsa_public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).decode()
    many = [f"arn:aws:sns:eu-west-1:123456789012:t{i}" for i in range(21)]
    for body, field, words in (
        ({"sendgrid_webhook_public_key": "not a key"}, "sendgrid_webhook_public_key", "base64 DER"),
        ({"sendgrid_webhook_public_key": rsa_b64}, "sendgrid_webhook_public_key", "P-256"),
        ({"sns_topic_arns": ["arn:aws:sqs:eu-west-1:123456789012:queue"]}, "sns_topic_arns", "pattern"),
        ({"sns_topic_arns": TOPIC}, "sns_topic_arns", "list"),
        ({"sns_topic_arns": many}, "sns_topic_arns", "at most 20"),
        ({"mailgun_webhook_signing_key": "k" * 201}, "mailgun_webhook_signing_key", "at most 200"),
    ):
        r = await user.http.put("/v1/settings/mail", json=body)
        assert r.status_code == 422, (body, r.text)
        assert [e for e in r.json()["detail"] if field in e["loc"] and words in e["msg"]], (words, r.text)
    wrapped = "\n".join(textwrap.wrap(_public(USER_SENDGRID_KEY), 40))  # as pasted from a page
    stored = await _put_settings(user, sns_topic_arns=[USER_TOPIC, TOPIC, USER_TOPIC], sendgrid_webhook_public_key=wrapped)
    assert stored["sns_topic_arns"] == [USER_TOPIC, TOPIC] and stored["sendgrid_webhook_public_key"] == _public(USER_SENDGRID_KEY)
    # A PUT replaces the settings: left out, they go.
    cleared = await _put_settings(user)
    assert cleared["sns_topic_arns"] == [] and cleared["sendgrid_webhook_public_key"] is None


# --- configuration ----------------------------------------------------------------------------------------------


async def test_routes_not_configured_refuse_everything() -> None:
    bare = Settings(_env_file=None)  # type: ignore[call-arg]
    sns_body = json.dumps(ses_notification("Bounce", "m", ["a@example.com"]) | {"Signature": "x", "SignatureVersion": "1",
                                                                               "SigningCertURL": "https://sns.eu-west-1.amazonaws.com/c.pem"})
    certificates = inbound.SnsCertificates.from_settings(bare)
    operator, nobody = inbound.Keys.of_settings(bare), inbound.Keys.of_sender(None, bare)
    with pytest.raises(inbound.NotConfigured, match="MAILQUEUE_SNS_TOPIC_ARNS"):
        await inbound.verify_sns(sns_body.encode(), operator, certificates)
    with pytest.raises(inbound.NotConfigured, match="MAILQUEUE_SENDGRID_WEBHOOK_PUBLIC_KEY"):
        inbound.verify_sendgrid(b"[]", "sig", "1", operator)
    with pytest.raises(inbound.NotConfigured, match="MAILQUEUE_MAILGUN_WEBHOOK_SIGNING_KEY"):
        inbound.verify_mailgun(json.dumps(mailgun_request({})).encode(), operator)
    # A user's route: the same words for a user without the key and for no user at all.
    with pytest.raises(inbound.NotConfigured, match="no such user, or no sns_topic_arns"):
        await inbound.verify_sns(sns_body.encode(), nobody, certificates)
    with pytest.raises(inbound.NotConfigured, match="no such user, or no sendgrid_webhook_public_key"):
        inbound.verify_sendgrid(b"[]", "sig", "1", nobody)
    with pytest.raises(inbound.NotConfigured, match="no such user, or no mailgun_webhook_signing_key"):
        inbound.verify_mailgun(json.dumps(mailgun_request({})).encode(), nobody)


def test_a_users_signing_key_no_configured_key_opens_is_unavailable_not_a_refusal() -> None:
    """The operator dropped a key before `mailqueue rotate-secrets`: a 503 (Mailgun retries), not a 403 that loses the event."""
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    row = SenderSettings(user_id="u-1", mailgun_webhook_signing_key_enc=SecretBox([new_key()]).encrypt(USER_MAILGUN_KEY))
    with pytest.raises(inbound.Unavailable) as caught:
        inbound.Keys.of_sender(row, settings, SecretBox([new_key()]))
    assert USER_MAILGUN_KEY not in str(caught.value)
    assert inbound.Keys.of_sender(row, settings).mailgun_signing_key is None  # decrypted only for the Mailgun route


async def test_the_api_does_not_start_with_a_sendgrid_key_that_cannot_verify() -> None:
    rsa_public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    rsa_b64 = base64.b64encode(rsa_public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).decode()
    for key, words in (("not a key", "base64 DER"), (rsa_b64, "P-256")):
        app = create_app(Settings(_env_file=None, sendgrid_webhook_public_key=key))  # type: ignore[call-arg]
        with pytest.raises(ValueError, match=words):
            async with app.router.lifespan_context(app):
                pass
    assert isinstance(inbound.sendgrid_public_key(SENDGRID_PUBLIC), ec.EllipticCurvePublicKey)


def test_settings_read_topics_as_a_list_and_refuse_a_bad_url_pattern() -> None:
    with pytest.raises(ValueError, match="regular expression"):
        Settings(_env_file=None, sns_cert_url_pattern="(")  # type: ignore[call-arg]
    settings = Settings(_env_file=None, sns_topic_arns=f" {TOPIC} ,arn:aws:sns:us-east-1:1:b,")  # type: ignore[call-arg]
    assert settings.sns_topics == [TOPIC, "arn:aws:sns:us-east-1:1:b"]


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-abc.pem", True),
    ("https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem", True),
    ("https://sns.eu-west-1.amazonaws.com.evil.example/cert.pem", False),
    ("https://evil.example/sns.eu-west-1.amazonaws.com/cert.pem", False),
    ("http://sns.eu-west-1.amazonaws.com/cert.pem", False),
    ("https://sns.eu-west-1.amazonaws.com\\@evil.example/cert.pem", False),
    ("https://sns.eu-west-1.amazonaws.com:8443/cert.pem", False),
])
def test_the_default_certificate_allowlist_names_only_sns(url: str, allowed: bool) -> None:
    assert inbound.SnsCertificates.from_settings(Settings(_env_file=None)).allowed(url) is allowed  # type: ignore[call-arg]


def test_the_sns_string_to_sign_follows_aws() -> None:
    """AWS's documented layout: each signed name and value on its own line, Subject left out when absent."""
    message = inbound.SnsMessage.model_validate({"Type": "Notification", "MessageId": "m-1", "TopicArn": TOPIC, "Message": "hello",
                                                 "Timestamp": "2026-11-29T11:00:00.000Z"})
    assert inbound.sns_string_to_sign(message) == (
        f"Message\nhello\nMessageId\nm-1\nTimestamp\n2026-11-29T11:00:00.000Z\nTopicArn\n{TOPIC}\nType\nNotification\n".encode())


async def test_refusals_are_logged_without_secrets(inbound_stack: Inbound) -> None:
    """A refusal is logged with its reason, and no key is in the API's log (of every request of this module so far)."""
    r = await inbound_stack.http.post("/v1/inbound/mailgun", json=mailgun_request(mailgun_event("delivered", "x", "x@example.net"), key="k2"))
    assert r.status_code == 403 and MAILGUN_SIGNING_KEY not in r.text
    log = (inbound_stack.stack.tmp / "api.log").read_text()
    assert "mailgun event refused (BadSignature)" in log
    assert MAILGUN_SIGNING_KEY not in log and SENDGRID_API_KEY not in log and MAILGUN_API_KEY not in log
    assert USER_MAILGUN_KEY not in log  # a user's signing key, stored and used for their route (test_a_users_mailgun_...)
