"""Sender identity: the domains a user may send from, how they prove one is theirs, and the system's own.

A user adds a domain and publishes a TXT record `_mailqueue.<domain>` holding
`mailqueue-verification=<token>`; once the record is seen (or an admin vouches for the domain) the
user may send from any address in that exact domain: a verified example.org does not cover
news.example.org (a subdomain is often someone else's: verify it too). Tokens are random per user
and domain, so one user's published record never verifies the domain for another; two users who
can both change a domain's DNS (two teams of one company) may each verify it.

The system's domains (MAILQUEUE_SYSTEM_DOMAINS, the domain of MAILQUEUE_DEFAULT_FROM and
MAILQUEUE_MESSAGE_ID_DOMAIN), and every name under them, are the system's alone: no user can add
them. The bootstrap key sends as the system and may use any From.

Domains are kept in their ASCII (IDNA) form, lower case: `bücher.de` is `xn--bcher-kva.de`, and a
homoglyph such as `pаypal.com` (a Cyrillic а) shows as the `xn--` name it really is.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass

import idna
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mailqueue.config import Settings
from mailqueue.contracts import SenderType
from mailqueue.message import bare_address
from mailqueue.models import DomainStatus, SenderDomain
from mailqueue.resolver import LookupFailed, lookup

log = logging.getLogger("mailqueue.domains")

RECORD_PREFIX = "_mailqueue"
TOKEN_PREFIX = "mailqueue-verification="
VERIFIED_BY_DNS = "dns"

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def normalize_domain(value: str) -> str:
    """A domain name as stored and compared: ASCII (IDNA), lower case, no trailing dot. ValueError says what is wrong."""
    text = value.strip().rstrip(".")
    if not text or len(text) > 253:
        raise ValueError("a domain name has 1 to 253 characters")
    if "@" in text:
        raise ValueError(f"{value!r} is an email address; give only its domain (after the @)")
    try:
        ascii_name = idna.encode(text, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise ValueError(f"{value!r} is not a valid domain name: {exc}") from None
    labels = ascii_name.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{value!r} is not a domain name like example.org (letters, digits and hyphens, with a dot)")
    if labels[-1].isdigit():
        raise ValueError(f"{value!r} is an IP address, not a domain name")
    if len(ascii_name) > 253:
        raise ValueError(f"{value!r} is longer than 253 characters in its ASCII form")
    return ascii_name


def shown(domain: str) -> str:
    """The domain as stored, with its Unicode spelling when it has one: a homoglyph shows what it is."""
    if "xn--" not in domain:
        return domain
    try:
        unicode_name = idna.decode(domain)
    except idna.IDNAError:
        return domain
    return f"{domain} (written {unicode_name})" if unicode_name != domain else domain


def address_domain(address: str) -> str:
    """The domain of an address ("Ann <ann@example.org>" -> "example.org"), normalized."""
    return normalize_domain(bare_address(address).rpartition("@")[2])


def system_domains(settings: Settings) -> set[str]:
    """The domains only the system sends from."""
    names = {address_domain(settings.default_from)}
    for extra in (settings.message_id_domain, *settings.system_domains):
        if extra:
            names.add(normalize_domain(extra))
    return names


def reserved_for_system(settings: Settings, domain: str) -> str | None:
    """The system domain that `domain` is, or lies under (None: not the system's)."""
    return next((d for d in sorted(system_domains(settings)) if domain == d or domain.endswith("." + d)), None)


def system_message_id_domain(settings: Settings) -> str:
    return normalize_domain(settings.message_id_domain) if settings.message_id_domain else address_domain(settings.default_from)


def new_token() -> str:
    return secrets.token_hex(16)


def record_name(domain: str) -> str:
    return f"{RECORD_PREFIX}.{domain}"


def record_value(token: str) -> str:
    return f"{TOKEN_PREFIX}{token}"


class NotVerified(Exception):
    """The verification record was not found: the message says what DNS answered instead."""

    def __init__(self, message: str, found: list[str]) -> None:
        super().__init__(message)
        self.found = found


async def check_record(settings: Settings, row: SenderDomain) -> None:
    """Look for the domain's verification record in DNS; NotVerified when it is not there."""
    name, expected = record_name(row.domain), record_value(row.token)
    try:
        found = await lookup(settings, name, "TXT")
    except LookupFailed as exc:
        raise NotVerified(f"{exc}: publish a TXT record {name} with the value {expected}", []) from None
    if expected in (v.strip() for v in found):
        return
    shown_values = [v[:200] for v in found[:5]]
    raise NotVerified(
        f"the TXT records of {name} do not include {expected} (found {len(found)}: {', '.join(map(repr, shown_values))})",
        shown_values,
    )


async def domain_row(session: AsyncSession, user_id: str, domain: str) -> SenderDomain | None:
    """A user's row for a (normalized) domain, verified or not."""
    query = select(SenderDomain).where(col(SenderDomain.user_id) == user_id, col(SenderDomain.domain) == domain)
    return (await session.exec(query)).first()


class FromRefused(Exception):
    """A user may not send from this address; the message says why and how to change that."""


_HOW = "add it with POST /v1/domains, publish the TXT record it answers, then POST /v1/domains/{domain}/verify"


async def from_refusal(session: AsyncSession, settings: Settings, user_id: str, address: str) -> tuple[str | None, str | None]:
    """(the address's domain if it is one of the user's verified domains, why the user may not send from it)."""
    try:
        domain = address_domain(address)
    except ValueError as exc:
        return None, str(exc)
    if system := reserved_for_system(settings, domain):
        return None, f"{shown(domain)} is the system's own domain ({system}); users cannot send from it"
    row = await domain_row(session, user_id, domain)
    if row is not None and row.status == DomainStatus.VERIFIED:
        return domain, None
    if row is not None:
        return None, f"{shown(domain)} is not verified yet: publish the TXT record {record_name(domain)} = {record_value(row.token)}, then POST /v1/domains/{domain}/verify"
    return None, f"{shown(domain)} is not one of your verified sender domains: " + _HOW.format(domain=domain)


@dataclass(frozen=True)
class SenderIdentity:
    from_address: str
    message_id_domain: str  # the From's domain once verified for the sender; else the system's


async def sender_identity(
    session: AsyncSession, settings: Settings, sender_type: SenderType, sender_id: str | None,
    address: str | None, source: str, system_from: str,
) -> SenderIdentity:
    """The From an email may carry and its Message-ID domain. `address` is the From chosen so far
    (None: nothing gave one), `source` names where it came from ("from", "your default_from", ...)
    and `system_from` is the system's own From, the fallback of the system and of `make dev`.

    The system (the bootstrap key) sends from any address, with the system's Message-ID domain. A
    user sends only from their verified domains; anything else is FromRefused, unless
    MAILQUEUE_REQUIRE_VERIFIED_FROM is off (`make dev`): then it is logged and allowed."""
    system_domain = system_message_id_domain(settings)
    if sender_type == SenderType.SYSTEM or sender_id is None:
        return SenderIdentity(address or system_from, system_domain)
    if address is None:
        domain, reason = None, (
            "give `from`, or set default_from in /v1/settings/mail to an address in a verified domain "
            f"(the system's address, {bare_address(system_from)}, is for the system only)"
        )
    else:
        domain, reason = await from_refusal(session, settings, sender_id, address)
        if reason is not None:
            reason = f"{source} {bare_address(address)!r}: {reason}"
    if reason is None:
        assert address is not None and domain is not None
        return SenderIdentity(address, domain)
    if settings.require_verified_from:
        raise FromRefused(reason)
    log.warning(
        "user %s sends from %s, which would be refused (MAILQUEUE_REQUIRE_VERIFIED_FROM is off)",
        sender_id, f"the domain {address.rpartition('@')[2].rstrip('>')}" if address else "the system's address",
    )
    return SenderIdentity(address or system_from, system_domain)
