"""DKIM for sender domains: their keys, the DNS records that publish them, checking those records, signing mail.

Each domain has two active keys, RSA-2048 and Ed25519, each under its own selector: mail gets a
signature from each (RFC 8463 dual signing: a receiver that knows Ed25519 checks both, any other
the RSA one). A rotation makes a new pair and retires the old one, which stays listed: its record
must stay in DNS while mail signed with it can still be checked (the retry window, and receivers
that look again later). Deleting retired keys is not done here.

Only mail leaving through an SMTP driver (the system relay or a user's own server) is signed here,
and only a user's mail from one of their verified domains; SendGrid, Mailgun and SES sign with keys
of their own. The private keys are encrypted at rest (SecretBox) and decrypted in the send step
only: never in the API, a log, an error or a workflow's history.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mailqueue.accounts import new_id
from mailqueue.config import Settings
from mailqueue.contracts import SenderType
from mailqueue.crypto import SecretBox
from mailqueue.domains import address_domain
from mailqueue.drivers.base import DriverName
from mailqueue.errors import PermanentDeliveryError
from mailqueue.models import DkimAlgorithm, DkimKey, DomainStatus, SenderDomain, utcnow
from mailqueue.resolver import LookupFailed, lookup

RSA_BITS = 2048
# The k= of a key's record, and the end of its selector.
KEY_TYPE = {DkimAlgorithm.RSA: "rsa", DkimAlgorithm.ED25519: "ed25519"}
# Signed when present (RFC 6376 5.4.1's list, and the one-click unsubscribe of RFC 8058, which
# must be signed for receivers to honour it).
SIGNED_HEADERS = (
    "From", "To", "Cc", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    "List-Unsubscribe", "List-Unsubscribe-Post", "Reply-To",
)
CANONICALIZATION = (b"relaxed", b"relaxed")

_GENERATION = re.compile(r"^mq(\d{8})(\d+)-")


# --- keys ----------------------------------------------------------------------------------------


def _key_pair(algorithm: DkimAlgorithm) -> tuple[str, str]:
    """(the private key as dkimpy reads it, the public key as the record's p= holds it)."""
    if algorithm is DkimAlgorithm.RSA:
        private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        public = private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return pem.decode("ascii"), base64.b64encode(public).decode("ascii")
    seed = ed25519.Ed25519PrivateKey.generate()
    raw = seed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    public = seed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii"), base64.b64encode(public).decode("ascii")


def next_generation(selectors: Sequence[str], today: date) -> str:
    """The selector stem of a domain's next key pair: mq<yyyymmdd><n>, n counting that day's pairs."""
    stem = f"mq{today:%Y%m%d}"
    taken = [int(m.group(2)) for s in selectors if (m := _GENERATION.match(s)) and m.group(1) == stem[2:]]
    return f"{stem}{max(taken, default=0) + 1}"


def new_keys(box: SecretBox, domain_id: str, generation: str) -> list[DkimKey]:
    """A new active pair (RSA and Ed25519) for a domain, private keys encrypted. CPU-bound (RSA key
    generation takes a fraction of a second): callers on an event loop run it in a thread."""
    now = utcnow()
    keys = []
    for algorithm in (DkimAlgorithm.RSA, DkimAlgorithm.ED25519):
        private, public = _key_pair(algorithm)
        keys.append(DkimKey(
            id=new_id(), domain_id=domain_id, selector=f"{generation}-{KEY_TYPE[algorithm]}", algorithm=algorithm.value,
            private_key_enc=box.encrypt(private), public_key=public, created_at=now,
        ))
    return keys


async def keys_of(session: AsyncSession, domain_ids: Sequence[str]) -> dict[str, list[DkimKey]]:
    """The keys of these domains, each domain's newest first (RSA before Ed25519)."""
    found: dict[str, list[DkimKey]] = {i: [] for i in domain_ids}
    if domain_ids:
        query = (
            select(DkimKey).where(col(DkimKey.domain_id).in_(domain_ids))
            .order_by(col(DkimKey.created_at).desc(), col(DkimKey.algorithm).desc())
        )
        for key in (await session.exec(query)).all():
            found[key.domain_id].append(key)
    return found


# --- the records to publish, and checking them ---------------------------------------------------


def record_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}"


def record_value(key: DkimKey) -> str:
    return f"v=DKIM1; k={KEY_TYPE[DkimAlgorithm(key.algorithm)]}; p={key.public_key}"


def _tags(value: str) -> dict[str, str]:
    tags = {}
    for part in value.split(";"):
        name, sep, text = part.partition("=")
        if sep:
            tags[name.strip().lower()] = text.strip()
    return tags


def matches(value: str, key: DkimKey) -> bool:
    """Whether a TXT record's text publishes this key (spaces inside p= allowed, as DNS consoles split it)."""
    tags = _tags(value)
    return (
        tags.get("v", "DKIM1") == "DKIM1"
        and tags.get("k", "rsa").lower() == KEY_TYPE[DkimAlgorithm(key.algorithm)]
        and re.sub(r"\s+", "", tags.get("p", "")) == key.public_key
    )


async def check_published(settings: Settings, domain: str, keys: Sequence[DkimKey]) -> None:
    """Look each key's record up and note whether it publishes the key (`published`, `checked_at`)."""

    async def found(key: DkimKey) -> bool:
        try:
            values = await lookup(settings, record_name(key.selector, domain), "TXT")
        except LookupFailed:
            return False
        return any(matches(v, key) for v in values)

    answers = await asyncio.gather(*(found(k) for k in keys))
    now = utcnow()
    for key, published in zip(keys, answers, strict=True):
        key.published, key.checked_at = published, now


@dataclass(frozen=True)
class Advice:
    """A TXT record worth publishing besides the DKIM keys; `value` None: not known here (`note` says why)."""

    name: str
    value: str | None
    note: str


def _relay_mechanism(settings: Settings) -> str | None:
    """The SPF mechanism naming the system relay, when it can be known from its settings."""
    if settings.driver != DriverName.SMTP:
        return None
    host = settings.smtp_host.strip().rstrip(".").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"a:{host}" if "." in host and host != "localhost" else None
    return f"ip{address.version}:{address}" if address.is_global else None


def spf_advice(settings: Settings, domain: str) -> Advice:
    mechanism = _relay_mechanism(settings)
    others = (
        "If your sender settings use your own SMTP server or a provider, name theirs instead "
        "(include:sendgrid.net, include:mailgun.org, include:amazonses.com). A domain has one SPF record: "
        "if it has one already, add the mechanism to it."
    )
    if mechanism is None:
        return Advice(domain, None, "The system relay's sending address is not known here: ask the operator which SPF "
                                    "mechanism covers it. " + others)
    return Advice(domain, f"v=spf1 {mechanism} ~all", "Names the system relay. " + others)


def dmarc_advice(domain: str) -> Advice:
    return Advice(
        f"_dmarc.{domain}", f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}",
        "Start with p=none and read the aggregate reports (rua: any mailbox you read); once everything that sends "
        "as the domain passes SPF or DKIM, move to p=quarantine, then p=reject.",
    )


# --- signing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    selector: str
    algorithm: DkimAlgorithm
    private_key: bytes = field(repr=False)  # decrypted: in the send step's memory only


@dataclass(frozen=True)
class DkimSigner:
    """Signs a serialized message with each of a domain's active keys: the DKIM-Signature headers
    (RSA topmost, for verifiers that check only the first) followed by the message."""

    domain: str
    keys: tuple[SigningKey, ...]

    def __call__(self, message: bytes) -> bytes:
        signatures = []
        for key in self.keys:
            signer = dkim.DKIM(message, signature_algorithm=key.algorithm.value.encode())
            present = {name.lower() for name, _ in signer.headers}
            headers = [h.encode() for h in SIGNED_HEADERS if h.lower().encode() in present]
            try:
                signatures.append(signer.sign(
                    key.selector.encode(), self.domain.encode(), key.private_key, canonicalize=CANONICALIZATION,
                    include_headers=headers,
                ))
            except dkim.DKIMException as exc:
                # Its class only: a key-parsing error may quote what it could not parse.
                raise PermanentDeliveryError(f"DKIM signing with selector {key.selector} failed ({type(exc).__name__})") from None
        return b"".join(signatures) + message

    @property
    def selectors(self) -> list[str]:
        return [k.selector for k in self.keys]


async def signer_for(
    session: AsyncSession, box: SecretBox, sender_type: SenderType, sender_id: str | None, from_address: str,
) -> DkimSigner | None:
    """The signer of a user's email from one of their verified domains with active keys (None: not signed).
    The private keys are read by the send step and decrypted here, in its memory."""
    if sender_type != SenderType.USER or sender_id is None:
        return None  # the system's mail: no keys of its own here
    try:
        domain = address_domain(from_address)
    except ValueError:
        return None
    query = (
        select(DkimKey).join(SenderDomain, col(DkimKey.domain_id) == col(SenderDomain.id))
        .where(
            col(SenderDomain.user_id) == sender_id, col(SenderDomain.domain) == domain,
            col(SenderDomain.status) == DomainStatus.VERIFIED.value, col(DkimKey.retired_at).is_(None),
        )
        .order_by(col(DkimKey.algorithm).desc(), col(DkimKey.created_at).desc())
    )
    keys = (await session.exec(query)).all()
    if not keys:
        return None
    return DkimSigner(domain, tuple(
        SigningKey(k.selector, DkimAlgorithm(k.algorithm), box.decrypt(k.private_key_enc).encode("ascii")) for k in keys
    ))


def retire(keys: Sequence[DkimKey], at: datetime) -> None:
    for key in keys:
        if key.retired_at is None:
            key.retired_at = at
