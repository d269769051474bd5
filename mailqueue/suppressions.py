"""Suppressions: the addresses a sender mails no more (how they match, the lookup every send makes),
and the one-click unsubscribe tokens (RFC 8058) that add them."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mailqueue.accounts import new_id
from mailqueue.config import Settings
from mailqueue.contracts import EmailSpec
from mailqueue.crypto import key_file, new_key, split_keys
from mailqueue.domains import normalize_domain
from mailqueue.message import bare_address
from mailqueue.models import Suppression, SuppressionReason
from mailqueue.senders import sender_key

# Where an entry came from (`source`): by hand through the API, or the recipient's unsubscribe link.
SOURCE_API = "api"
SOURCE_UNSUBSCRIBE_LINK = "unsubscribe link"


def match_key(address: str) -> str:
    """What an address is matched on: the local part as written (RFC 5321 lets it be case-sensitive),
    the domain in lower-case ASCII (IDNA). "Ann <Ann@Example.ORG>" -> "Ann@example.org"."""
    if not address.strip():
        raise ValueError("an empty address")
    bare = bare_address(address) or address
    local, at, domain = bare.rpartition("@")
    if not at or not local:
        raise ValueError(f"{address!r} is not an email address")
    return f"{local}@{normalize_domain(domain)}"


def _keys_of(addresses: Iterable[str]) -> dict[str, str]:
    """{address: match key} of the addresses that have one (a recipient that passed the door always has)."""
    keys = {}
    for address in addresses:
        try:
            keys[address] = match_key(address)
        except ValueError:
            continue
    return keys


def recipients_of(spec: EmailSpec) -> list[str]:
    return [*spec.to, *spec.cc, *spec.bcc]


async def suppressed_among(session: AsyncSession, sender: str, addresses: Iterable[str]) -> dict[str, str]:
    """{match key: reason} of those of `addresses` the sender has suppressed: one indexed query
    (the unique index on sender and match key)."""
    keys = set(_keys_of(addresses).values())
    if not keys:
        return {}
    query = select(Suppression.match_key, Suppression.reason).where(
        col(Suppression.sender) == sender, col(Suppression.match_key).in_(sorted(keys))
    )
    return {key: reason for key, reason in (await session.exec(query)).all()}


async def suppressed_for(session: AsyncSession, spec: EmailSpec) -> dict[str, str]:
    """{match key: reason} of the email's recipients (to, cc, bcc) its sender has suppressed."""
    return await suppressed_among(session, sender_key(spec.sender_type, spec.sender_id), recipients_of(spec))


def without_suppressed(spec: EmailSpec, found: dict[str, str]) -> tuple[EmailSpec, Counter[str]]:
    """The spec with its suppressed recipients (to, cc and bcc) left out, and how many were, by reason."""
    dropped: Counter[str] = Counter()

    def kept(addresses: list[str]) -> list[str]:
        keys = _keys_of(addresses)
        out = []
        for address in addresses:
            reason = found.get(keys.get(address, ""))
            if reason is None:
                out.append(address)
            else:
                dropped[reason] += 1
        return out

    return replace(spec, to=kept(spec.to), cc=kept(spec.cc), bcc=kept(spec.bcc)), dropped


def has_recipients(spec: EmailSpec) -> bool:
    return bool(spec.to or spec.cc or spec.bcc)


def dropped_detail(dropped: Counter[str]) -> str:
    """The event's words: counts and reasons only, never an address (events reach the sender's
    webhooks and streams; the record itself lists the recipients)."""
    n = sum(dropped.values())
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(dropped.items()))
    if len(dropped) == 1:
        reasons = next(iter(dropped))
    return f"{n} recipient{'s' if n != 1 else ''} suppressed ({reasons})"


async def find(session: AsyncSession, sender: str, key: str) -> Suppression | None:
    query = select(Suppression).where(col(Suppression.sender) == sender, col(Suppression.match_key) == key)
    return (await session.exec(query)).first()


async def add(session: AsyncSession, sender: str, address: str, reason: SuppressionReason, source: str) -> tuple[Suppression, bool]:
    """Suppress `address` for `sender` and commit: (the entry, True if new). An address already
    suppressed keeps its first entry (reason and source): adding it again changes nothing."""
    key = match_key(address)
    row = await find(session, sender, key)
    if row is not None:
        return row, False
    row = Suppression(id=new_id(), sender=sender, address=bare_address(address) or address, match_key=key,
                      reason=reason.value, source=source)
    session.add(row)
    try:
        await session.commit()
    except IntegrityError:  # the same address at the same moment (a mail client's POST, twice)
        await session.rollback()
        row = await find(session, sender, key)
        if row is None:
            raise
        return row, False
    await session.refresh(row)
    return row, True


# --- one-click unsubscribe tokens ------------------------------------------------------------


@dataclass(frozen=True)
class Unsubscribe:
    """What an unsubscribe token names: the sender, the recipient and (optionally) the email's category."""

    sender: str
    address: str
    topic: str | None = None


class BadToken(ValueError):
    """Not a token this server made (tampered, truncated, made with a key no longer configured)."""


class UnsubscribeTokens:
    """Tokens for List-Unsubscribe links: Fernet (AES encrypted, HMAC-SHA256 signed), so no
    database row is needed to trust one, and the link shows no address to whoever logs URLs."""

    def __init__(self, keys: list[str]) -> None:
        self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])

    @classmethod
    def from_settings(cls, settings: Settings) -> UnsubscribeTokens:
        given = settings.unsubscribe_keys.get_secret_value() if settings.unsubscribe_keys else None
        return _tokens(given, str(settings.unsubscribe_key_file))

    def make(self, target: Unsubscribe) -> str:
        body = json.dumps({"s": target.sender, "a": target.address, "t": target.topic}, separators=(",", ":"))
        return self._fernet.encrypt(body.encode()).decode().rstrip("=")  # padding: restored when read

    def read(self, token: str) -> Unsubscribe:
        try:
            raw = token.encode("ascii")
            body = json.loads(self._fernet.decrypt(raw + b"=" * (-len(raw) % 4)))
            target = Unsubscribe(sender=body["s"], address=body["a"], topic=body.get("t"))
        except (InvalidToken, UnicodeError, ValueError, TypeError, KeyError):
            raise BadToken("not a valid unsubscribe token") from None
        if not all(isinstance(v, str) for v in (target.sender, target.address)):
            raise BadToken("not a valid unsubscribe token")
        return target


@lru_cache(maxsize=8)
def _tokens(given: str | None, path: str) -> UnsubscribeTokens:
    """One token maker per key setting: the key file is read once, not at every email."""
    return UnsubscribeTokens(split_keys(given) if given else key_file(Path(path), new_key))


def unsubscribe_headers(public_url: str, token: str, mailto: str | None = None) -> dict[str, str]:
    """RFC 8058 one-click: a mail client POSTs `List-Unsubscribe=One-Click` to the https link.
    `mailto` ("<mailto:...>", RFC 2369) comes second: clients take the https link for one-click."""
    links = [f"<{public_url.rstrip('/')}/u/{token}>", *([mailto] if mailto else [])]
    return {
        "List-Unsubscribe": ", ".join(links),
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
