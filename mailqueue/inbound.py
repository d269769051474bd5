"""Provider events in: check that a webhook request really comes from the provider (SES through
SNS, SendGrid's Event Webhook, Mailgun's webhooks) and turn its events into Feedback, which
mailqueue/feedback.py records (suppression, event, status).

Whose keys verify a request is a `Keys`: the operator's (MAILQUEUE_SNS_TOPIC_ARNS, ...) on
/v1/inbound/<provider>, or one user's own (their sender settings) on /v1/inbound/<provider>/<user id>,
since mail through a user's own provider account comes back signed with that account's keys.

Each provider signs differently:
- SNS: RSA over a canonical string of the message's fields (SignatureVersion 1: SHA-1, 2: SHA-256),
  with a certificate fetched from SigningCertURL, which must be an SNS endpoint. Any AWS account can
  sign genuine SNS messages, so the topic must also be one of ours.
- SendGrid: ECDSA P-256 / SHA-256 over the timestamp header followed by the raw body.
- Mailgun: HMAC-SHA256 (hex) over timestamp + token; a token is accepted once (the caller keeps them).

A request that is not the provider's raises a `Refused` (its `status` is the HTTP answer), a body
that is not what the provider documents a `Malformed`; nothing is recorded then.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import functools
import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError

from mailqueue.config import Settings
from mailqueue.crypto import SecretBox, SecretKeyError
from mailqueue.drivers.base import DriverName, remote_text
from mailqueue.feedback import DIAGNOSTIC_MAX, Feedback, FeedbackKind
from mailqueue.models import SenderSettings

log = logging.getLogger("mailqueue.inbound")

# Sources, as suppressions and events name them.
SES, SENDGRID, MAILGUN = DriverName.SES.value, DriverName.SENDGRID.value, DriverName.MAILGUN.value  # as Email.provider says
# SNS: a message older than this is stale (AWS's advice); one dated ahead of our clock by more than
# the skew is refused too.
SNS_MAX_AGE = timedelta(hours=1)
CLOCK_SKEW = timedelta(minutes=5)
CERT_MAX_BYTES = 64 * 1024
CERT_CACHE_SIZE = 32
FETCH_TIMEOUT_SECONDS = 10.0


# --- refusals ------------------------------------------------------------------------------------


class Refused(Exception):
    """The request is not a genuine, fresh event of the provider: nothing was changed."""

    status: ClassVar[int] = 403


class NotConfigured(Refused):
    """The operator has not set up this provider's route (no key, no topic): every request is refused."""


class Unsigned(Refused):
    status = 401


class BadSignature(Refused):
    """The signature does not verify (tampered body, another key, an untrusted certificate)."""


class Stale(Refused):
    """Signed too long ago (or dated ahead of our clock): a replay of an old request, or a clock far off."""


class Replayed(Refused):
    """A signed token seen before (Mailgun): the same request again."""


class TopicNotAllowed(Refused):
    """A genuine SNS message from a topic that is not one of MAILQUEUE_SNS_TOPIC_ARNS."""


class Unavailable(Exception):
    """What verifying or confirming needs (the SNS certificate, SNS's confirm URL) cannot be reached now."""


class Malformed(ValueError):
    """The body is not what the provider sends: `errors` (pydantic's, field by field) when it was JSON."""

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors


@dataclass
class Batch:
    """The events of one request, normalised; `ignored`: events of kinds not recorded (opens, clicks,
    deferrals of SES, ...) or that lack what they need (a message id)."""

    events: list[Feedback] = field(default_factory=list)
    ignored: int = 0


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Malformed("the body is not JSON") from None


@functools.lru_cache(maxsize=None)
def _adapter(model: Any) -> TypeAdapter[Any]:
    """Built once per model (a TypeAdapter builds its validator: too slow for every request)."""
    return TypeAdapter(model)


def _model(model: Any, data: Any) -> Any:
    try:
        return _adapter(model).validate_python(data)
    except ValidationError as exc:
        raise Malformed("the body is not what the provider sends", exc.errors(include_url=False)) from None


def _b64(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadSignature("the signature is not base64") from None


def _unix_time(value: str | float | int) -> datetime:
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        raise BadSignature("the signed timestamp is not a time") from None


def _fresh(at: datetime, max_age: timedelta, now: datetime) -> None:
    if at < now - max_age or at > now + CLOCK_SKEW:
        raise Stale(f"signed at {at.isoformat()}: older than {int(max_age.total_seconds())} s (or ahead of our clock)")


def _text(value: Any, limit: int = 320) -> str | None:
    """A string field of a provider's event, or None when it is anything else (or longer than `limit`:
    an address or id cut short would name something else)."""
    if not isinstance(value, str) or not value.strip() or len(value.strip()) > limit or "\x00" in value:
        return None
    return value.strip()


def _at(value: Any) -> datetime | None:
    """A provider's event time: unix seconds or ISO 8601; None when unreadable (the record's time is used)."""
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, str):
            at = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return at if at.tzinfo else at.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        pass
    return None


# --- whose keys ------------------------------------------------------------------------------------

# Where each key is set: (the operator's variable, the field of a user's sender settings).
_WHERE = {
    SES: ("MAILQUEUE_SNS_TOPIC_ARNS", "sns_topic_arns"),
    SENDGRID: ("MAILQUEUE_SENDGRID_WEBHOOK_PUBLIC_KEY", "sendgrid_webhook_public_key"),
    MAILGUN: ("MAILQUEUE_MAILGUN_WEBHOOK_SIGNING_KEY", "mailgun_webhook_signing_key"),
}
_NAMES = {SES: "SES", SENDGRID: "SendGrid", MAILGUN: "Mailgun"}


@dataclass(frozen=True)
class Keys:
    """What verifies one route's requests: the operator's settings (`of_settings`) or one user's sender
    settings (`of_sender`). A key left unset refuses every request of its provider."""

    sns_topics: tuple[str, ...] = ()
    sendgrid_public_key: str | None = None  # base64 DER, as SendGrid shows it
    mailgun_signing_key: SecretStr | None = None
    max_age: timedelta = timedelta(seconds=600)  # SendGrid's and Mailgun's signed timestamps
    per_user: bool = False  # a user's route: a refusal for a missing key must not tell "no such user" from "no key"

    @classmethod
    def of_settings(cls, settings: Settings) -> Keys:
        return cls(tuple(settings.sns_topics), settings.sendgrid_webhook_public_key, settings.mailgun_webhook_signing_key,
                   timedelta(seconds=settings.inbound_max_age_seconds))

    @classmethod
    def of_sender(cls, row: SenderSettings | None, settings: Settings, secrets: SecretBox | None = None) -> Keys:
        """One user's keys (`row` None: an unknown user, who has none). The Mailgun key is decrypted only
        when `secrets` is given (the Mailgun route): one that no configured key opens is `Unavailable`."""
        mailgun = None
        if row is not None and secrets is not None and row.mailgun_webhook_signing_key_enc:
            try:
                mailgun = SecretStr(secrets.decrypt(row.mailgun_webhook_signing_key_enc))
            except SecretKeyError as exc:  # the operator dropped a key before `mailqueue rotate-secrets`
                raise Unavailable(str(exc)) from None
        return cls(
            tuple(row.sns_topic_arns or ()) if row else (), row.sendgrid_webhook_public_key if row else None, mailgun,
            timedelta(seconds=settings.inbound_max_age_seconds), per_user=True,
        )

    def unset(self, source: str) -> NotConfigured:
        variable, setting = _WHERE[source]
        if self.per_user:  # the same words whether the user exists or not: ids cannot be probed
            return NotConfigured(f"{_NAMES[source]} events are not taken on this route: no such user, or no {setting} in their sender settings")
        return NotConfigured(f"{_NAMES[source]} events are not configured here: set {variable}")

    def topic_refused(self, topic: str) -> TopicNotAllowed:
        listed = "the user's sns_topic_arns" if self.per_user else "MAILQUEUE_SNS_TOPIC_ARNS"
        return TopicNotAllowed(f"topic {topic!r} is not one of {listed}")


# --- SES through SNS -----------------------------------------------------------------------------


class SnsMessage(BaseModel):
    """An SNS HTTP(S) delivery (https://docs.aws.amazon.com/sns/latest/dg/sns-message-and-json-formats.html).
    Raw message delivery must be off: the envelope carries the signature."""

    model_config = ConfigDict(extra="ignore")
    Type: Literal["Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"]
    MessageId: str = Field(min_length=1, max_length=200)
    TopicArn: str = Field(min_length=1, max_length=1024)
    Message: str = Field(max_length=1_000_000)
    Timestamp: str = Field(max_length=64)
    Subject: str | None = Field(default=None, max_length=1000)
    SubscribeURL: str | None = Field(default=None, max_length=4096)
    UnsubscribeURL: str | None = Field(default=None, max_length=4096)
    Token: str | None = Field(default=None, max_length=4096)
    SignatureVersion: str | None = Field(default=None, max_length=8)
    Signature: str | None = Field(default=None, max_length=4096)
    SigningCertURL: str | None = Field(default=None, max_length=4096)


# The fields each message type signs, in this order (AWS: "Verifying the signatures of Amazon SNS messages").
_SIGNED_NOTIFICATION = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_SIGNED_CONFIRMATION = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")


def sns_string_to_sign(message: SnsMessage) -> bytes:
    """The canonical string: "name\\nvalue\\n" for each signed field, a Notification's Subject only when
    it has one. A confirmation lacking a signed field is malformed."""
    names = _SIGNED_NOTIFICATION if message.Type == "Notification" else _SIGNED_CONFIRMATION
    parts = []
    for name in names:
        value = getattr(message, name)
        if value is None:
            if name == "Subject":
                continue
            raise Malformed(f"an SNS {message.Type} without {name}")
        parts.append(f"{name}\n{value}\n")
    return "".join(parts).encode()


class SnsCertificates:
    """SNS signing certificates, fetched only from URLs the pattern allows (AWS's SNS endpoints
    unless MAILQUEUE_SNS_CERT_URL_PATTERN says otherwise, for tests) and kept by URL."""

    def __init__(self, pattern: str, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._pattern = re.compile(pattern)
        self._transport = transport
        self._keys: OrderedDict[str, tuple[rsa.RSAPublicKey, datetime, datetime]] = OrderedDict()  # key, valid from, until

    @classmethod
    def from_settings(cls, settings: Settings) -> SnsCertificates:
        return cls(settings.sns_cert_url_pattern)

    def allowed(self, url: str) -> bool:
        if self._pattern.match(url) is None or any(c.isspace() or ord(c) < 32 or c == "\\" for c in url):
            return False
        try:
            return httpx.URL(url).scheme in ("https", "http")
        except httpx.InvalidURL:
            return False

    async def _get(self, url: str, limit: int | None) -> bytes:
        try:
            async with (
                httpx.AsyncClient(timeout=FETCH_TIMEOUT_SECONDS, follow_redirects=False, transport=self._transport) as http,
                http.stream("GET", url) as response,
            ):
                if response.status_code >= 500 or response.status_code == 429:
                    raise Unavailable(f"SNS answered {response.status_code}")
                if response.status_code != 200:
                    raise BadSignature(f"SNS answered {response.status_code}")  # not the URL: a SubscribeURL holds a token
                body = b""
                if limit is None:
                    return body  # the answer's status is all that counts
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise BadSignature("the signing certificate is too large")
                return body
        except httpx.HTTPError as exc:
            raise Unavailable(f"SNS could not be reached ({type(exc).__name__})") from None

    async def public_key(self, url: str) -> rsa.RSAPublicKey:
        """The key of the certificate at `url`, while the certificate is valid."""
        if not self.allowed(url):
            raise BadSignature("SigningCertURL is not an SNS endpoint")
        if (kept := self._keys.get(url)) is None:
            kept = self._keys[url] = await self._fetch(url)
            while len(self._keys) > CERT_CACHE_SIZE:
                self._keys.popitem(last=False)
        self._keys.move_to_end(url)
        key, valid_from, valid_until = kept
        if not valid_from <= datetime.now(UTC) <= valid_until:
            raise BadSignature("the signing certificate is not valid now")
        return key

    async def _fetch(self, url: str) -> tuple[rsa.RSAPublicKey, datetime, datetime]:
        pem = await self._get(url, CERT_MAX_BYTES)
        try:
            certificate = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise BadSignature("SigningCertURL does not hold a certificate") from None
        key = certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise BadSignature("the signing certificate's key is not RSA")
        return key, certificate.not_valid_before_utc, certificate.not_valid_after_utc

    async def confirm(self, url: str) -> None:
        """Visit a SubscriptionConfirmation's SubscribeURL: SNS then delivers the topic's messages here."""
        if not self.allowed(url):
            raise BadSignature("SubscribeURL is not an SNS endpoint")
        await self._get(url, None)


async def verify_sns(body: bytes, keys: Keys, certificates: SnsCertificates, now: datetime | None = None) -> SnsMessage:
    """The SNS message in `body`, once it is known genuine, from one of the keys' topics and fresh."""
    message: SnsMessage = _model(SnsMessage, _json(body))
    if not keys.sns_topics:
        raise keys.unset(SES)
    if not (message.Signature and message.SigningCertURL and message.SignatureVersion):
        raise Unsigned("an SNS message without Signature, SignatureVersion and SigningCertURL")
    if message.TopicArn not in keys.sns_topics:
        raise keys.topic_refused(message.TopicArn)
    algorithm: hashes.HashAlgorithm
    if message.SignatureVersion == "1":
        algorithm = hashes.SHA1()  # noqa: S303 - SNS's SignatureVersion 1 is SHA1withRSA
    elif message.SignatureVersion == "2":
        algorithm = hashes.SHA256()
    else:
        raise BadSignature(f"unknown SignatureVersion {message.SignatureVersion!r}")
    signed = sns_string_to_sign(message)
    signature = _b64(message.Signature)
    key = await certificates.public_key(message.SigningCertURL)
    try:
        key.verify(signature, signed, padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        raise BadSignature("the SNS signature does not verify") from None
    sent = _at(message.Timestamp)
    if sent is None:
        raise Malformed("the SNS Timestamp is not a time")
    _fresh(sent, SNS_MAX_AGE, now or datetime.now(UTC))
    return message


def _diagnostic(*parts: Any) -> str:
    """The server's words, as text safe to record (the drivers' rule: no control characters, cut short)."""
    words = " ".join(str(p) for p in parts if isinstance(p, str | int) and not isinstance(p, bool) and str(p).strip())
    return remote_text(words, limit=DIAGNOSTIC_MAX)


def ses_events(message: SnsMessage) -> Batch:
    """A Notification's SES event (notification or event publishing: notificationType or eventType):
    Bounce (Permanent: hard; Transient, Undetermined: soft), Complaint and Delivery, one per recipient."""
    batch = Batch()
    try:
        data = json.loads(message.Message)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        batch.ignored += 1  # e.g. a test message published from the SNS console
        return batch
    kind = data.get("notificationType") or data.get("eventType")
    mail = data.get("mail") if isinstance(data.get("mail"), dict) else {}
    message_id = _text(mail.get("messageId"), 512)
    sections = {"Bounce": ("bounce", "bouncedRecipients"), "Complaint": ("complaint", "complainedRecipients"),
                "Delivery": ("delivery", "recipients")}
    if kind not in sections or not message_id:
        batch.ignored += 1  # Send, Reject, Open, Click, DeliveryDelay, ...: not what the record says
        return batch
    name, list_name = sections[kind]
    section = data.get(name) if isinstance(data.get(name), dict) else {}
    recipients = section.get(list_name) if isinstance(section.get(list_name), list) else []
    at = _at(section.get("timestamp"))
    for entry in recipients or [None]:
        address = _text(entry.get("emailAddress") if isinstance(entry, dict) else entry)
        common = {"source": SES, "provider": SES, "event_key": f"{message.MessageId}\n{address or ''}", "recipient": address,
                  "provider_message_id": message_id, "at": at}
        if kind == "Bounce":
            details = entry if isinstance(entry, dict) else {}
            batch.events.append(Feedback(
                kind=FeedbackKind.BOUNCED, hard=section.get("bounceType") == "Permanent",
                diagnostic=_diagnostic(details.get("status"), details.get("diagnosticCode")) or _diagnostic(
                    section.get("bounceType"), section.get("bounceSubType")), **common,
            ))
        elif kind == "Complaint":
            batch.events.append(Feedback(kind=FeedbackKind.COMPLAINED, diagnostic=_diagnostic(section.get("complaintFeedbackType")), **common))
        else:
            batch.events.append(Feedback(kind=FeedbackKind.DELIVERED, diagnostic=_diagnostic(section.get("smtpResponse")), **common))
    return batch


# --- SendGrid ------------------------------------------------------------------------------------

SENDGRID_SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"


def sendgrid_public_key(value: str, name: str = "MAILQUEUE_SENDGRID_WEBHOOK_PUBLIC_KEY") -> ec.EllipticCurvePublicKey:
    """The Event Webhook's verification key, base64 DER (SubjectPublicKeyInfo) as SendGrid shows it;
    `name`: where it was given, for the error."""
    try:
        key = load_der_public_key(base64.b64decode("".join(value.split()), validate=True))
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not a base64 DER public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{name} is not an ECDSA P-256 key")
    return key


def verify_sendgrid(body: bytes, signature: str | None, timestamp: str | None, keys: Keys, now: datetime | None = None) -> None:
    if not keys.sendgrid_public_key:
        raise keys.unset(SENDGRID)
    if not signature or not timestamp:
        raise Unsigned(f"a SendGrid event without {SENDGRID_SIGNATURE} and {SENDGRID_TIMESTAMP}")
    _fresh(_unix_time(timestamp), keys.max_age, now or datetime.now(UTC))
    try:
        key = sendgrid_public_key(keys.sendgrid_public_key)
    except ValueError:  # checked at the start (the operator's) or when stored (a user's): never here
        raise keys.unset(SENDGRID) from None
    try:
        key.verify(_b64(signature), timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BadSignature("the SendGrid signature does not verify") from None


class SendGridEvent(BaseModel):
    """One event of the Event Webhook (https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event);
    other fields are kept out."""

    model_config = ConfigDict(extra="ignore")
    event: str = Field(max_length=64)
    email: str | None = Field(default=None, max_length=1000)
    sg_event_id: str | None = Field(default=None, max_length=200)
    sg_message_id: str | None = Field(default=None, max_length=1000)
    timestamp: int | float | None = None
    type: str | None = Field(default=None, max_length=64)  # bounce: "bounce" or "blocked"
    reason: str | None = Field(default=None, max_length=10_000)
    status: str | None = Field(default=None, max_length=64)
    response: str | None = Field(default=None, max_length=10_000)


def sendgrid_events(body: bytes) -> Batch:
    """delivered; bounce (type "bounce": hard, "blocked": soft); deferred and dropped: soft (the
    event only: SendGrid tries a deferral again, and a drop is its own list's word, not the
    recipient's); spamreport: complained; unsubscribe, group_unsubscribe: unsubscribed."""
    data = _json(body)
    events: list[SendGridEvent] = _model(list[SendGridEvent], data)
    batch = Batch()
    for item in events:
        message_id = _text((item.sg_message_id or "").split(".", 1)[0], 512)  # the X-Message-Id our driver recorded
        if not message_id or not item.sg_event_id:
            batch.ignored += 1
            continue
        common = {"source": SENDGRID, "provider": SENDGRID, "event_key": item.sg_event_id, "recipient": _text(item.email),
                  "provider_message_id": message_id, "at": _at(item.timestamp)}
        if item.event == "delivered":
            batch.events.append(Feedback(kind=FeedbackKind.DELIVERED, diagnostic=_diagnostic(item.response), **common))
        elif item.event == "bounce":
            batch.events.append(Feedback(kind=FeedbackKind.BOUNCED, hard=item.type != "blocked",
                                         diagnostic=_diagnostic(item.status, item.reason), **common))
        elif item.event in ("deferred", "dropped"):
            batch.events.append(Feedback(kind=FeedbackKind.BOUNCED, hard=False,
                                         diagnostic=_diagnostic(item.event, item.status, item.reason or item.response), **common))
        elif item.event == "spamreport":
            batch.events.append(Feedback(kind=FeedbackKind.COMPLAINED, **common))
        elif item.event in ("unsubscribe", "group_unsubscribe"):
            batch.events.append(Feedback(kind=FeedbackKind.UNSUBSCRIBED, diagnostic=item.event, **common))
        else:
            batch.ignored += 1  # processed, open, click: not what the record says
    return batch


# --- Mailgun -------------------------------------------------------------------------------------


class MailgunSignature(BaseModel):
    model_config = ConfigDict(extra="ignore")
    timestamp: str | int = Field(union_mode="left_to_right")
    token: str = Field(min_length=1, max_length=200)
    signature: str = Field(max_length=200)


class MailgunWebhook(BaseModel):
    """A webhook request (https://documentation.mailgun.com/docs/mailgun/user-manual/tracking-messages/#webhooks)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    signature: MailgunSignature | None = None
    event_data: dict[str, Any] = Field(alias="event-data")


def verify_mailgun(body: bytes, keys: Keys, now: datetime | None = None) -> tuple[MailgunWebhook, str]:
    """The webhook in `body` once genuine and fresh, and the digest of its token: the caller refuses
    a digest it has seen (`token_digest`; one table for every key: a token is a token)."""
    hook: MailgunWebhook = _model(MailgunWebhook, _json(body))
    if keys.mailgun_signing_key is None or not keys.mailgun_signing_key.get_secret_value():
        raise keys.unset(MAILGUN)
    signed = hook.signature
    if signed is None or not signed.signature:
        raise Unsigned("a Mailgun event without its signature")
    timestamp = str(signed.timestamp)[:32]
    _fresh(_unix_time(timestamp), keys.max_age, now or datetime.now(UTC))
    key = keys.mailgun_signing_key.get_secret_value().encode()
    expected = hmac.new(key, (timestamp + signed.token).encode(), hashlib.sha256).hexdigest().encode()
    if not hmac.compare_digest(expected, signed.signature.strip().lower().encode()):
        raise BadSignature("the Mailgun signature does not verify")
    return hook, token_digest(MAILGUN, signed.token)


def token_digest(source: str, token: str) -> str:
    return hashlib.sha256(f"{source}\n{token}".encode()).hexdigest()


def mailgun_events(hook: MailgunWebhook) -> Batch:
    """delivered; failed (severity permanent: hard bounce, temporary: soft); complained; unsubscribed."""
    data = hook.event_data
    batch = Batch()
    message = data.get("message") if isinstance(data.get("message"), dict) else {}
    headers = message.get("headers") if isinstance(message.get("headers"), dict) else {}
    message_id, event_key = _text(headers.get("message-id"), 512), _text(data.get("id"), 200)
    event = data.get("event")
    if not message_id or not event_key or event not in ("delivered", "failed", "complained", "unsubscribed"):
        batch.ignored += 1  # accepted, opened, clicked, stored: not what the record says
        return batch
    status = data.get("delivery-status") if isinstance(data.get("delivery-status"), dict) else {}
    common = {"source": MAILGUN, "provider": MAILGUN, "event_key": event_key, "recipient": _text(data.get("recipient")),
              "provider_message_id": message_id, "at": _at(data.get("timestamp"))}
    if event == "delivered":
        batch.events.append(Feedback(kind=FeedbackKind.DELIVERED, diagnostic=_diagnostic(status.get("code"), status.get("message")), **common))
    elif event == "failed":
        batch.events.append(Feedback(
            kind=FeedbackKind.BOUNCED, hard=data.get("severity") == "permanent",
            diagnostic=_diagnostic(status.get("code"), status.get("message") or status.get("description") or data.get("reason")), **common,
        ))
    elif event == "complained":
        batch.events.append(Feedback(kind=FeedbackKind.COMPLAINED, **common))
    else:
        batch.events.append(Feedback(kind=FeedbackKind.UNSUBSCRIBED, **common))
    return batch
