"""SendGrid, Mailgun and SES drivers against local servers that check the documented request shape."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto.core import DEFAULT_ACCOUNT_ID
from moto.server import ThreadedMotoServer
from moto.ses.models import ses_backends

from devstack.net import free_port
from mailqueue.contracts import Content
from mailqueue.drivers.mailgun import MailgunDriver
from mailqueue.drivers.sendgrid import SendGridDriver
from mailqueue.drivers.ses import SesDriver
from mailqueue.egress import DestinationRefused, NotResolved
from mailqueue.errors import PermanentDeliveryError, ServerUnreachable, TransientDeliveryError
from mailqueue.message import build_message, envelope
from tests.fake_providers import FakeAws, FakeMailgun, FakeSendGrid, Scripted
from tests.helpers import Checked, make_spec

SENDGRID_KEY = "SG.test-key-5f0d2b9c7e"
MAILGUN_KEY = "key-mailgun-test-71ac0e"
AWS_KEY_ID, AWS_SECRET = "AKIATESTKEYID000", "aws-secret-test-0c9d8e7f"
SECRETS = (SENDGRID_KEY, MAILGUN_KEY, AWS_KEY_ID, AWS_SECRET)


def rich_message() -> tuple[EmailMessage, str, list[str]]:
    """Text + html, To, Cc, a Bcc-only recipient, a custom header and a PDF attachment."""
    spec = make_spec(to=["Ann Smith <ann@example.com>"], cc=["cc@example.com"], bcc=["hidden@example.com"],
                     headers={"X-Campaign": "spring"}, reply_to="Help <help@example.com>")
    spec.content = Content(subject="Your order", text="Plain words", html="<p>Rich <b>words</b></p>")
    msg = build_message(spec, spec.content)
    msg.add_attachment(b"%PDF-1.4 fake", maintype="application", subtype="pdf", filename="invoice.pdf")
    sender, recipients = envelope(spec)
    return msg, sender, recipients


@pytest.fixture
def sendgrid() -> Iterator[FakeSendGrid]:
    with FakeSendGrid(SENDGRID_KEY) as fake:
        yield fake


@pytest.fixture
def mailgun() -> Iterator[FakeMailgun]:
    with FakeMailgun(MAILGUN_KEY, "mg.example.com") as fake:
        yield fake


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def assert_logs_clean(logs: str) -> None:
    """No key in the log. The AWS access key ID is left out: botocore's own DEBUG log shows it in
    the signed Authorization header (Credential=...), as AWS treats it as an identifier; the
    secret access key never appears."""
    assert_no_secret(logs.replace(f"Credential={AWS_KEY_ID}/", "Credential=<id>/"))


# --- SendGrid -----------------------------------------------------------------------------------


async def test_sendgrid_sends_the_documented_request(sendgrid: FakeSendGrid) -> None:
    msg, sender, recipients = rich_message()
    driver = SendGridDriver(SENDGRID_KEY, base_url=sendgrid.url)
    delivery = await driver.send(msg, sender, recipients)
    await driver.aclose()

    [got] = sendgrid.received
    body = got.json
    assert got.headers["authorization"] == f"Bearer {SENDGRID_KEY}"
    assert body["personalizations"] == [{
        "to": [{"email": "ann@example.com", "name": "Ann Smith"}],
        "cc": [{"email": "cc@example.com"}],
        "bcc": [{"email": "hidden@example.com"}],
    }]
    assert body["from"] == {"email": "sender@example.com", "name": "Sender"}
    assert body["reply_to"] == {"email": "help@example.com", "name": "Help"}
    assert body["subject"] == "Your order"
    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
    assert body["content"][0]["value"].strip() == "Plain words" and "<b>words</b>" in body["content"][1]["value"]
    [attachment] = body["attachments"]
    assert base64.b64decode(attachment["content"]) == b"%PDF-1.4 fake"
    assert attachment | {"content": ""} == {"content": "", "filename": "invoice.pdf", "type": "application/pdf", "disposition": "attachment"}
    assert body["headers"]["X-Campaign"] == "spring" and body["headers"]["Message-ID"] == str(msg["Message-ID"])
    assert "To" not in body["headers"] and "Subject" not in body["headers"]
    assert delivery.provider_message_id.startswith("sg-")


@pytest.mark.parametrize(("status", "body", "error", "words"), [
    (429, {"errors": [{"message": "too many requests"}]}, TransientDeliveryError, "429: too many requests"),
    (500, {"errors": [{"message": "internal"}]}, TransientDeliveryError, "500"),
    (503, None, TransientDeliveryError, "503"),
    (400, {"errors": [{"message": "Does not contain a valid address.", "field": "personalizations.0.to.0.email"}]},
     PermanentDeliveryError, "Does not contain a valid address. (personalizations.0.to.0.email)"),
    (413, {"errors": [{"message": "too big"}]}, PermanentDeliveryError, "rejected the message (413)"),
    (422, {"errors": [{"message": "unprocessable"}]}, PermanentDeliveryError, "rejected the message (422): unprocessable"),
    (502, "<html>Bad Gateway</html>", TransientDeliveryError, "502: <html>Bad Gateway</html>"),
    (401, {"errors": [{"message": f"API key {SENDGRID_KEY} is invalid"}]}, PermanentDeliveryError,
     "refused the API key (401): API key [redacted] is invalid"),
    (401, {"errors": [{"message": "authorization grant is invalid"}]}, PermanentDeliveryError, "refused the API key (401)"),
    (403, {"errors": [{"message": "access forbidden"}]}, PermanentDeliveryError, "refused the API key (403)"),
])
async def test_sendgrid_answers_are_classified(
    sendgrid: FakeSendGrid, status: int, body: Any, error: type[Exception], words: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sendgrid.script.append(Scripted(status, body))
    msg, sender, recipients = rich_message()
    with pytest.raises(error) as caught:
        await SendGridDriver(SENDGRID_KEY, base_url=sendgrid.url).send(msg, sender, recipients)
    assert words in str(caught.value) and "sendgrid" in str(caught.value)
    assert_no_secret(str(caught.value), repr(caught.value))
    assert_logs_clean(caplog.text)


async def test_sendgrid_wrong_key_is_refused_by_the_fake_itself(sendgrid: FakeSendGrid) -> None:
    msg, sender, recipients = rich_message()
    with pytest.raises(PermanentDeliveryError, match="refused the API key") as caught:
        await SendGridDriver("SG.wrong-key", base_url=sendgrid.url).send(msg, sender, recipients)
    assert "SG.wrong-key" not in str(caught.value) and sendgrid.received == []


async def test_sendgrid_bcc_only_email_still_has_a_to(sendgrid: FakeSendGrid) -> None:
    spec = make_spec(to=["only@example.com"])
    msg = build_message(spec, spec.content)  # type: ignore[arg-type]
    del msg["To"]
    await SendGridDriver(SENDGRID_KEY, base_url=sendgrid.url).send(msg, "sender@example.com", ["only@example.com"])
    assert sendgrid.received[0].json["personalizations"] == [{"to": [{"email": "only@example.com"}]}]


async def test_sendgrid_bcc_only_email_reveals_no_recipient_to_another(sendgrid: FakeSendGrid) -> None:
    spec = make_spec(to=["x@example.com"])
    msg = build_message(spec, spec.content)  # type: ignore[arg-type]
    del msg["To"]
    await SendGridDriver(SENDGRID_KEY, base_url=sendgrid.url).send(msg, "sender@example.com", ["a@example.com", "b@example.com"])
    assert sendgrid.received[0].json["personalizations"] == [{"to": [{"email": "a@example.com"}]}, {"to": [{"email": "b@example.com"}]}]


async def test_sendgrid_envelope_decides_the_addresses(sendgrid: FakeSendGrid) -> None:
    """From/Reply-To headers with several addresses do not break the request; `from.email` is the
    envelope sender; a header recipient missing from the envelope is not sent to; a forwarded
    message attaches as its bytes."""
    msg, _, _ = rich_message()
    del msg["Reply-To"], msg["From"]
    msg["From"] = "Sender <sender@example.com>, Other <other@example.com>"
    msg["Reply-To"] = "a@example.com, b@example.com"
    forwarded = EmailMessage()
    forwarded["Subject"] = "Earlier"
    forwarded.set_content("old words")
    msg.add_attachment(forwarded, filename="earlier.eml")
    await SendGridDriver(SENDGRID_KEY, base_url=sendgrid.url).send(msg, "bounce@example.com", ["ann@example.com"])
    body = sendgrid.received[0].json
    assert body["from"] == {"email": "bounce@example.com"} and body["reply_to"] == {"email": "a@example.com"}
    assert body["personalizations"] == [{"to": [{"email": "ann@example.com", "name": "Ann Smith"}]}]
    [_, eml] = body["attachments"]
    assert eml["type"] == "message/rfc822" and message_from_bytes(base64.b64decode(eml["content"]))["Subject"] == "Earlier"


# --- Mailgun ------------------------------------------------------------------------------------


async def test_mailgun_sends_the_mime_message_to_every_envelope_recipient(mailgun: FakeMailgun) -> None:
    msg, sender, recipients = rich_message()
    driver = MailgunDriver(MAILGUN_KEY, "mg.example.com", base_url=mailgun.url)
    delivery = await driver.send(msg, sender, recipients)
    await driver.aclose()
    [got] = mailgun.received
    assert got.form["to"] == ["ann@example.com", "cc@example.com", "hidden@example.com"]
    assert got.mime is not None and got.mime["Subject"] == "Your order" and got.mime["Bcc"] is None
    assert got.mime.get_body(("plain",)).get_content().strip() == "Plain words"  # type: ignore[union-attr]
    assert [p.get_filename() for p in got.mime.iter_attachments()] == ["invoice.pdf"]
    assert got.mime["X-Campaign"] == "spring" and got.mime["Message-ID"] == msg["Message-ID"]
    assert delivery.provider_message_id.endswith("@mg.example.com") and "<" not in delivery.provider_message_id


def test_mailgun_regions() -> None:
    assert MailgunDriver("k", "d.example.com").url == "https://api.mailgun.net/v3/d.example.com/messages.mime"
    assert MailgunDriver("k", "d.example.com", region="eu").url == "https://api.eu.mailgun.net/v3/d.example.com/messages.mime"
    with pytest.raises(ValueError, match="unknown Mailgun region"):
        MailgunDriver("k", "d.example.com", region="ap")


@pytest.mark.parametrize(("status", "body", "error", "words"), [
    (429, {"message": "rate limited"}, TransientDeliveryError, "429: rate limited"),
    (500, {"message": "internal error"}, TransientDeliveryError, "mailgun answered 500: internal error"),
    (502, {"message": "bad gateway"}, TransientDeliveryError, "502"),
    (503, None, TransientDeliveryError, "mailgun answered 503"),
    (400, {"message": "to parameter is not a valid address"}, PermanentDeliveryError, "not a valid address"),
    (422, {"message": "message is too large"}, PermanentDeliveryError, "rejected the message (422): message is too large"),
    (401, f"Forbidden: {MAILGUN_KEY}", PermanentDeliveryError, "refused the API key (401): Forbidden: [redacted]"),
    (401, {"message": "Invalid private key"}, PermanentDeliveryError, "refused the API key (401): Invalid private key"),
    (403, {"message": "Domain is not allowed"}, PermanentDeliveryError, "refused the API key (403)"),
])
async def test_mailgun_answers_are_classified(
    mailgun: FakeMailgun, status: int, body: Any, error: type[Exception], words: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    mailgun.script.append(Scripted(status, body))
    msg, sender, recipients = rich_message()
    with pytest.raises(error) as caught:
        await MailgunDriver(MAILGUN_KEY, "mg.example.com", base_url=mailgun.url).send(msg, sender, recipients)
    assert words in str(caught.value) and "mailgun" in str(caught.value)
    assert_no_secret(str(caught.value), repr(caught.value))
    assert_logs_clean(caplog.text)


async def test_mailgun_wrong_key_and_unknown_domain(mailgun: FakeMailgun, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    msg, sender, recipients = rich_message()
    with pytest.raises(PermanentDeliveryError, match="refused the API key") as wrong:
        await MailgunDriver("key-wrong", "mg.example.com", base_url=mailgun.url).send(msg, sender, recipients)
    with pytest.raises(PermanentDeliveryError, match=r"\(404\): Domain not found") as unknown:
        await MailgunDriver(MAILGUN_KEY, "other.example.com", base_url=mailgun.url).send(msg, sender, recipients)
    assert "key-wrong" not in str(wrong.value) and mailgun.received == []
    assert_no_secret(str(unknown.value))
    assert_logs_clean(caplog.text)


# --- both HTTP drivers: the network ---------------------------------------------------------------


async def test_a_slow_or_absent_provider_is_transient(
    sendgrid: FakeSendGrid, mailgun: FakeMailgun, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    msg, sender, recipients = rich_message()
    sendgrid.script.append(Scripted(202, None, delay=1.5))
    mailgun.script.append(Scripted(200, {"id": "x"}, delay=1.5))
    errors = []
    with pytest.raises(TransientDeliveryError, match="sendgrid timed out") as caught:
        await SendGridDriver(SENDGRID_KEY, base_url=sendgrid.url, timeout=0.5).send(msg, sender, recipients)
    errors.append(caught.value)
    with pytest.raises(TransientDeliveryError, match="mailgun timed out") as caught:
        await MailgunDriver(MAILGUN_KEY, "mg.example.com", base_url=mailgun.url, timeout=0.5).send(msg, sender, recipients)
    errors.append(caught.value)
    # A timeout after the request went out may have delivered: an ordinary (counted) attempt.
    assert not any(isinstance(e, ServerUnreachable) for e in errors)
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnreachable, match="sendgrid could not be reached") as caught:
        await SendGridDriver(SENDGRID_KEY, base_url=nobody).send(msg, sender, recipients)
    errors.append(caught.value)
    with pytest.raises(ServerUnreachable, match="mailgun could not be reached") as caught:
        await MailgunDriver(MAILGUN_KEY, "mg.example.com", base_url=nobody).send(msg, sender, recipients)
    errors.append(caught.value)
    assert_no_secret(*(str(e) for e in errors), *(repr(e) for e in errors))
    assert_logs_clean(caplog.text)
    assert repr(SendGridDriver(SENDGRID_KEY)).count("SG.") == 0 and MAILGUN_KEY not in repr(MailgunDriver(MAILGUN_KEY, "d"))


# --- both HTTP drivers: the egress check ---------------------------------------------------------


async def test_a_checked_provider_is_reached_at_the_checked_address_under_its_own_name(
    sendgrid: FakeSendGrid, mailgun: FakeMailgun
) -> None:
    """The name resolves nowhere: only the address the check returned can be reached, and the
    request still names the host (Host header; TLS would verify it the same way)."""
    msg, sender, recipients = rich_message()
    checked = Checked("127.0.0.1")
    driver = SendGridDriver(SENDGRID_KEY, base_url=f"http://api.sendgrid.test:{sendgrid.port}", destination=checked)
    for _ in range(2):
        await driver.send(msg, sender, recipients)
    await driver.aclose()
    assert len(sendgrid.received) == 2 and sendgrid.received[0].headers["host"] == f"api.sendgrid.test:{sendgrid.port}"
    assert checked.asked == [("api.sendgrid.test", sendgrid.port)] * 2  # every connection checked (the fake speaks HTTP/1.0: one each)
    mg = MailgunDriver(MAILGUN_KEY, "mg.example.com", base_url=f"http://api.mailgun.test:{mailgun.port}", destination=Checked("127.0.0.1"))
    await mg.send(msg, sender, recipients)
    await mg.aclose()
    assert len(mailgun.received) == 1


async def test_a_refused_provider_endpoint_is_permanent_and_gets_no_request(sendgrid: FakeSendGrid, mailgun: FakeMailgun) -> None:
    msg, sender, recipients = rich_message()
    loopback = DestinationRefused("is a loopback address")
    with pytest.raises(PermanentDeliveryError) as caught:
        await SendGridDriver(SENDGRID_KEY, base_url=sendgrid.url, destination=Checked(refuse=loopback)).send(msg, sender, recipients)
    assert str(caught.value) == "sendgrid endpoint refused: localhost is a loopback address"
    with pytest.raises(PermanentDeliveryError, match="^mailgun endpoint refused: port 8080 is not an HTTP port"):
        await MailgunDriver(MAILGUN_KEY, "mg.example.com", base_url=mailgun.url,
                            destination=Checked(refuse=DestinationRefused("port 8080 is not an HTTP port", part="port"))).send(msg, sender, recipients)
    with pytest.raises(ServerUnreachable, match="^sendgrid could not be reached"):  # DNS may answer again: waited for
        await SendGridDriver(SENDGRID_KEY, base_url=sendgrid.url, destination=Checked(refuse=NotResolved("does not resolve to any address"))).send(
            msg, sender, recipients)
    with pytest.raises(PermanentDeliveryError, match="^ses endpoint refused: localhost is a loopback address"):
        await SesDriver(AWS_KEY_ID, AWS_SECRET, "eu-west-1", endpoint_url=sendgrid.url, destination=Checked(refuse=loopback)).send(
            msg, sender, recipients)
    assert sendgrid.requests == 0 and mailgun.requests == 0


async def test_provider_base_urls_go_through_the_egress_policy(sendgrid: FakeSendGrid, settings: Any, dns_stub: Any) -> None:
    """The operator's provider URLs too: 127.0.0.1 is refused in every spelling, `localhost` (allowed
    by name in the test stacks) is reached, and a name resolving to loopback is refused."""
    from mailqueue.drivers.factory import DriverFactory
    from mailqueue.drivers.log import LogDriver
    from mailqueue.crypto import SecretBox
    from mailqueue.models import SenderSettings

    dns_stub.set("sendgrid-proxy.test", "A", "127.0.0.1")
    msg, sender, recipients = rich_message()
    row = SenderSettings(user_id="u-sg", driver="sendgrid", api_key_enc=SecretBox.from_settings(settings).encrypt(SENDGRID_KEY))
    outcomes = {}
    for base in (f"http://127.0.0.1:{sendgrid.port}", f"http://2130706433:{sendgrid.port}", f"http://sendgrid-proxy.test:{sendgrid.port}",
                 sendgrid.url):
        factory = DriverFactory(settings.model_copy(update={"sendgrid_base_url": base}), LogDriver())
        try:
            await factory.for_sender(row).send(msg, sender, recipients)
            outcomes[base] = "sent"
        except PermanentDeliveryError as exc:
            outcomes[base] = str(exc)
        finally:
            await factory.aclose()
    assert outcomes == {
        f"http://127.0.0.1:{sendgrid.port}": "sendgrid endpoint refused: 127.0.0.1 is a loopback address",
        f"http://2130706433:{sendgrid.port}": "sendgrid endpoint refused: 2130706433 is a loopback address",
        f"http://sendgrid-proxy.test:{sendgrid.port}": "sendgrid endpoint refused: sendgrid-proxy.test resolves to a loopback address",
        sendgrid.url: "sent",
    }
    assert len(sendgrid.received) == 1


# --- SES ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_ses() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client("sesv2", region_name="eu-west-1", endpoint_url=url, aws_access_key_id=AWS_KEY_ID,
                 aws_secret_access_key=AWS_SECRET).create_email_identity(EmailIdentity="sender@example.com")
    yield url
    server.stop()


async def test_ses_sends_the_raw_message_to_every_envelope_recipient(moto_ses: str) -> None:
    msg, sender, recipients = rich_message()
    backend = ses_backends[DEFAULT_ACCOUNT_ID]["eu-west-1"]
    before = len(backend.sent_messages)
    delivery = await SesDriver(AWS_KEY_ID, AWS_SECRET, "eu-west-1", endpoint_url=moto_ses).send(msg, sender, recipients)
    [sent] = backend.sent_messages[before:]
    assert sent.source == "sender@example.com"
    # moto adds the header addresses to what the request named; the request itself is checked below.
    assert {a for _, a in getaddresses(sent.destinations)} == {"ann@example.com", "cc@example.com", "hidden@example.com"}
    raw = message_from_bytes(sent.raw_data.encode() if isinstance(sent.raw_data, str) else sent.raw_data, policy=policy.default)
    assert raw["Subject"] == "Your order" and raw["Message-ID"] == msg["Message-ID"]
    assert delivery.provider_message_id and delivery.provider_message_id == sent.id


async def test_ses_request_is_the_documented_raw_send() -> None:
    msg, sender, recipients = rich_message()
    driver = SesDriver(AWS_KEY_ID, AWS_SECRET, "eu-west-1", configuration_set="transactional")
    with Stubber(driver.client) as stub:
        stub.add_response("send_email", {"MessageId": "ses-1"}, expected_params={
            "FromEmailAddress": "sender@example.com",
            "Destination": {"ToAddresses": ["ann@example.com", "cc@example.com", "hidden@example.com"]},
            "Content": {"Raw": {"Data": msg.as_bytes()}},
            "ConfigurationSetName": "transactional",
        })
        delivery = await driver.send(msg, sender, recipients)
        stub.assert_no_pending_responses()
    assert delivery.provider_message_id == "ses-1"


async def test_ses_unverified_sender_is_permanent(moto_ses: str) -> None:
    msg, _, recipients = rich_message()
    with pytest.raises(PermanentDeliveryError, match="MessageRejected") as caught:
        await SesDriver(AWS_KEY_ID, AWS_SECRET, "eu-west-1", endpoint_url=moto_ses).send(msg, "nobody@unverified.example", recipients)
    assert_no_secret(str(caught.value))


@pytest.mark.parametrize(("code", "status", "error", "words"), [
    ("TooManyRequestsException", 429, TransientDeliveryError, "ses answered TooManyRequestsException"),
    ("Throttling", 400, TransientDeliveryError, "Throttling"),
    ("InternalFailure", 500, TransientDeliveryError, "InternalFailure"),
    ("LimitExceededException", 400, TransientDeliveryError, "LimitExceededException"),
    ("SlowDownPlease", 429, TransientDeliveryError, "ses answered SlowDownPlease"),  # an unknown code: its 429 decides
    ("ServiceUnavailable", 503, TransientDeliveryError, "ServiceUnavailable"),
    ("MailFromDomainNotVerifiedException", 400, PermanentDeliveryError, "MailFromDomainNotVerifiedException"),
    ("BadRequestException", 400, PermanentDeliveryError, "rejected the message (BadRequestException)"),
    ("NotFoundException", 404, PermanentDeliveryError, "NotFoundException"),
    ("SendingPausedException", 400, PermanentDeliveryError, "SendingPausedException"),
    ("InvalidClientTokenId", 403, PermanentDeliveryError, "refused the credentials"),
    ("MessageRejected", 400, PermanentDeliveryError, "rejected the message (MessageRejected)"),
    ("AccountSuspendedException", 400, PermanentDeliveryError, "AccountSuspendedException"),
    ("AccessDeniedException", 403, PermanentDeliveryError, "ses refused the credentials (AccessDeniedException)"),
    ("UnrecognizedClientException", 403, PermanentDeliveryError, "refused the credentials"),
    ("SignatureDoesNotMatch", 403, PermanentDeliveryError, "refused the credentials"),
])
async def test_ses_errors_are_classified(
    code: str, status: int, error: type[Exception], words: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    driver = SesDriver(AWS_KEY_ID, AWS_SECRET, "eu-west-1")
    msg, sender, recipients = rich_message()
    with Stubber(driver.client) as stub:
        stub.add_client_error("send_email", service_error_code=code, service_message=f"the {code} words", http_status_code=status)
        with pytest.raises(error) as caught:
            await driver.send(msg, sender, recipients)
    assert words in str(caught.value) and f"the {code} words" in str(caught.value)
    assert_no_secret(str(caught.value), repr(caught.value), repr(driver))
    assert_logs_clean(caplog.text)


async def test_ses_credentials_echoed_by_aws_are_redacted() -> None:
    driver = SesDriver(AWS_KEY_ID, AWS_SECRET, "eu-west-1")
    msg, sender, recipients = rich_message()
    with Stubber(driver.client) as stub:
        stub.add_client_error("send_email", service_error_code="SignatureDoesNotMatch", http_status_code=403,
                              service_message=f"Credential={AWS_KEY_ID}/eu-west-1/ses, secret {AWS_SECRET}")
        with pytest.raises(PermanentDeliveryError, match="refused the credentials") as caught:
            await driver.send(msg, sender, recipients)
    assert "Credential=[redacted]/eu-west-1/ses, secret [redacted]" in str(caught.value)
    assert_no_secret(str(caught.value))


async def test_ses_unreachable_is_transient(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    driver = SesDriver(AWS_KEY_ID, AWS_SECRET, "eu-west-1", endpoint_url=f"http://127.0.0.1:{free_port()}", timeout=2)
    msg, sender, recipients = rich_message()
    with pytest.raises(ServerUnreachable, match="ses could not be reached") as caught:
        await asyncio.wait_for(driver.send(msg, sender, recipients), 20)
    assert_no_secret(str(caught.value), repr(caught.value))
    assert_logs_clean(caplog.text)


@pytest.mark.parametrize(("answer", "error", "words"), [
    (Scripted(503, {"message": "Service Unavailable"}), TransientDeliveryError, "ses answered"),
    (Scripted(429, {"message": "Maximum sending rate exceeded."}, headers={"x-amzn-ErrorType": "TooManyRequestsException"}),
     TransientDeliveryError, "TooManyRequestsException: Maximum sending rate exceeded."),
    (Scripted(400, {"message": "Email address is not verified."}, headers={"x-amzn-ErrorType": "MessageRejected"}),
     PermanentDeliveryError, "rejected the message (MessageRejected): Email address is not verified."),
    (Scripted(200, {"MessageId": "late"}, delay=1.5), TransientDeliveryError, "ses could not be reached (ReadTimeoutError)"),
])
async def test_ses_over_the_wire_is_tried_once(answer: Scripted, error: type[Exception], words: str, caplog: pytest.LogCaptureFixture) -> None:
    """Real HTTP answers through botocore, and exactly one request each: Temporal retries, botocore must not."""
    caplog.set_level(logging.DEBUG)
    msg, sender, recipients = rich_message()
    with FakeAws() as aws:
        aws.script.extend([answer, Scripted(200, {"MessageId": "a-hidden-retry"})])
        driver = SesDriver(AWS_KEY_ID, AWS_SECRET, "eu-west-1", endpoint_url=aws.url, timeout=0.5)
        with pytest.raises(error) as caught:
            await driver.send(msg, sender, recipients)
        assert aws.requests == 1 and len(aws.script) == 1
        assert aws.paths == ["/v2/email/outbound-emails"]
    assert words in str(caught.value)
    assert not isinstance(caught.value, ServerUnreachable)  # it answered, or may have: a counted attempt
    assert_no_secret(str(caught.value), repr(caught.value))
    assert_logs_clean(caplog.text)


# --- through the worker: a user's provider settings ----------------------------------------------


async def test_a_users_sendgrid_settings_carry_their_email_and_the_key_stays_out_of_the_history(
    client: Any, settings: Any, sessions: Any, sendgrid: FakeSendGrid, caplog: pytest.LogCaptureFixture
) -> None:
    from mailqueue.contracts import EmailStatus, SenderType, workflow_id_for
    from mailqueue.crypto import SecretBox
    from mailqueue.models import Email
    from tests.helpers import make_sender
    from worker import build_worker
    from workflows.send_email import SendEmailWorkflow

    caplog.set_level(logging.DEBUG)
    box = SecretBox.from_settings(settings)
    user_id = await make_sender(sessions, driver="sendgrid", api_key_enc=box.encrypt(SENDGRID_KEY))
    routed = settings.model_copy(update={"sendgrid_base_url": sendgrid.url, "task_queue": settings.task_queue + "-sendgrid"})
    spec = make_spec(sender_type=SenderType.USER, sender_id=user_id)
    async with build_worker(client, routed):
        handle = await client.start_workflow(SendEmailWorkflow.run, spec, id=workflow_id_for(spec.email_id), task_queue=routed.task_queue)
        state = await handle.result()
        history = (await handle.fetch_history()).to_json()
    assert state.status is EmailStatus.SENT
    [got] = sendgrid.received
    assert got.headers["authorization"] == f"Bearer {SENDGRID_KEY}"
    assert got.json["personalizations"][0]["to"] == [{"email": "ann@example.com", "name": "Ann"}]
    async with sessions() as s:
        email = await s.get(Email, spec.email_id)
    assert email is not None and email.provider == "sendgrid" and email.provider_message_id == state.provider_message_id
    assert state.provider_message_id and state.provider_message_id.startswith("sg-")
    assert SENDGRID_KEY not in history and SENDGRID_KEY not in caplog.text
