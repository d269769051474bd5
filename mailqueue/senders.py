"""Who sends an email and how it leaves: the one answer to "which driver, which queue, which limits".

Acceptance (the API), the quota step and the send step each resolve the sender once, from its
settings row as it is at that moment, with `resolve_sender`. Secrets stay encrypted here: only
the send step's driver factory decrypts them.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from mailqueue.config import Settings
from mailqueue.contracts import SenderType, priority_key
from mailqueue.crypto import SecretBox
from mailqueue.drivers.base import DriverName, SenderDriver
from mailqueue.models import DkimKey, SenderSettings, User, WebhookEndpoint

# Fields each driver needs, so a PUT that lacks one is refused (422) instead of failing at send time.
REQUIRED: dict[SenderDriver, tuple[str, ...]] = {
    SenderDriver.SYSTEM_SMTP: (),
    SenderDriver.USER_SMTP: ("smtp_host", "smtp_port"),
    SenderDriver.SENDGRID: ("api_key_enc",),
    SenderDriver.MAILGUN: ("api_key_enc", "mailgun_domain"),
    SenderDriver.SES: ("api_key_enc", "api_secret_enc", "ses_region"),
}

# Every encrypted column (`mailqueue rotate-secrets` re-encrypts them all); the Mailgun webhook signing
# key verifies the user's provider events in the API (mailqueue/inbound.py), it is never sent anywhere.
SECRET_COLUMNS = ("smtp_password_enc", "api_key_enc", "api_secret_enc", "mailgun_webhook_signing_key_enc")


@dataclass(frozen=True)
class SenderRoute:
    """How one sender's emails leave, as its settings said when they were read."""

    sender_type: SenderType
    sender_id: str | None
    driver: DriverName  # the system's driver (smtp/log), or the user's own
    send_queue: str | None  # the driver whose rated send queue its sends wait in (MAILQUEUE_SEND_RATES); None: the main queue
    default_from: str | None = None  # the user's own From address, when they set one
    hourly_limit: int | None = None  # the lower of the user's own and their admin's ceiling; None: none
    daily_limit: int | None = None
    max_priority: str = "high"  # the highest priority the sender may ask for (admins are not held to it)
    settings: SenderSettings | None = None  # what the user's own driver is built from (None: the system's driver)

    @property
    def own_driver(self) -> bool:
        """True when the user's own driver sends (not the system's)."""
        return self.settings is not None


def route_of(
    settings: Settings, sender_type: SenderType, sender_id: str | None, row: SenderSettings | None, user: User | None = None
) -> SenderRoute:
    """The route a sender's settings row (None: none stored) and user row (their admin's limits) give."""
    own = row is not None and row.driver != SenderDriver.SYSTEM_SMTP
    is_user = sender_type == SenderType.USER
    driver = DriverName(row.driver) if own and row is not None else settings.driver
    return SenderRoute(
        sender_type=sender_type,
        sender_id=sender_id,
        driver=driver,
        send_queue=driver.value if driver.value in settings.send_rates else None,
        default_from=row.default_from if row else None,
        hourly_limit=lower_limit(row.hourly_limit if row else None, user.hourly_limit if user else None),
        daily_limit=lower_limit(row.daily_limit if row else None, user.daily_limit if user else None),
        max_priority=(user.max_priority if user and user.max_priority else settings.user_max_priority) if is_user else "high",
        settings=row if own else None,
    )


def recipients_cap(settings: Settings, user: User | None) -> int:
    """Recipients a user may queue per hour: their admin's figure, else the operator's default; 0: no cap."""
    return user.recipients_per_hour if user is not None and user.recipients_per_hour is not None else settings.user_recipients_per_hour


def over_ceilings(row: SenderSettings, user: User) -> list[tuple[str, int]]:
    """The user's own limits that are above the ceilings their admin set: (field, ceiling)."""
    over = []
    for name in ("hourly_limit", "daily_limit"):
        own, ceiling = getattr(row, name), getattr(user, name)
        if own and ceiling and own > ceiling:
            over.append((name, ceiling))
    return over


def lower_limit(own: int | None, ceiling: int | None) -> int | None:
    """The tighter of a user's own limit and their admin's ceiling (None: no limit)."""
    given = [limit for limit in (own, ceiling) if limit]
    return min(given) if given else None


# Priorities a ceiling allows, highest first: high/normal/low map onto Temporal's keys 1/3/5 and
# the numbers 1-10 onto keys 1-5 (mailqueue.contracts.priority_key), so a ceiling of "normal"
# allows normal, low and 5 to 10.
PRIORITY_CEILINGS = ("high", "normal", "low")


def priority_allowed(priority: str, ceiling: str) -> bool:
    """Whether `priority` (high/normal/low or "1".."10") is at or below `ceiling` (high/normal/low)."""
    return priority_key(priority) >= priority_key(ceiling)


def priorities_within(ceiling: str) -> str:
    """The priorities a ceiling allows, in words."""
    names = PRIORITY_CEILINGS[PRIORITY_CEILINGS.index(ceiling):]
    lowest_number = 2 * priority_key(ceiling) - 1
    return f"{', '.join(names)} or {lowest_number} to 10"


async def resolve_sender(session: AsyncSession, settings: Settings, sender_type: SenderType, sender_id: str | None) -> SenderRoute:
    """Which driver, which queue, which limits for this sender now: one read of its settings and of its
    user row (the admin's limits); none for the system."""
    if sender_type != SenderType.USER or not sender_id:
        return route_of(settings, sender_type, sender_id, None)
    row = await session.get(SenderSettings, sender_id)
    return route_of(settings, sender_type, sender_id, row, await session.get(User, sender_id))


def sender_key(sender_type: SenderType, sender_id: str | None) -> str:
    """The sender's name in the quota counters."""
    return f"{sender_type}:{sender_id or ''}"


async def rotate_secrets(sessions: async_sessionmaker[AsyncSession], box: SecretBox) -> int:
    """Re-encrypt every stored secret (sender settings', webhook endpoints' signing secrets, DKIM
    private keys) with the newest key, in one transaction (all or nothing). Answers how many rows changed."""
    async with sessions() as session:
        rows = (await session.exec(select(SenderSettings))).all()
        changed = 0
        for row in rows:
            tokens = {c: getattr(row, c) for c in SECRET_COLUMNS if getattr(row, c)}
            if tokens:
                for column, token in tokens.items():
                    setattr(row, column, box.rotate(token))
                session.add(row)
                changed += 1
        for endpoint in (await session.exec(select(WebhookEndpoint))).all():
            endpoint.secret_enc = box.rotate(endpoint.secret_enc)
            session.add(endpoint)
            changed += 1
        for key in (await session.exec(select(DkimKey))).all():
            key.private_key_enc = box.rotate(key.private_key_enc)
            session.add(key)
            changed += 1
        await session.commit()
        return changed
