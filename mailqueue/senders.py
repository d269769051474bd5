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
from mailqueue.contracts import SenderType
from mailqueue.crypto import SecretBox
from mailqueue.drivers.base import DriverName, SenderDriver
from mailqueue.models import SenderSettings

# Fields each driver needs, so a PUT that lacks one is refused (422) instead of failing at send time.
REQUIRED: dict[SenderDriver, tuple[str, ...]] = {
    SenderDriver.SYSTEM_SMTP: (),
    SenderDriver.USER_SMTP: ("smtp_host", "smtp_port"),
    SenderDriver.SENDGRID: ("api_key_enc",),
    SenderDriver.MAILGUN: ("api_key_enc", "mailgun_domain"),
    SenderDriver.SES: ("api_key_enc", "api_secret_enc", "ses_region"),
}

SECRET_COLUMNS = ("smtp_password_enc", "api_key_enc", "api_secret_enc")


@dataclass(frozen=True)
class SenderRoute:
    """How one sender's emails leave, as its settings said when they were read."""

    sender_type: SenderType
    sender_id: str | None
    driver: DriverName  # the system's driver (smtp/log), or the user's own
    send_queue: str | None  # the driver whose rated send queue its sends wait in (MAILQUEUE_SEND_RATES); None: the main queue
    default_from: str | None = None  # the user's own From address, when they set one
    hourly_limit: int | None = None
    daily_limit: int | None = None
    settings: SenderSettings | None = None  # what the user's own driver is built from (None: the system's driver)

    @property
    def own_driver(self) -> bool:
        """True when the user's own driver sends (not the system's)."""
        return self.settings is not None


def route_of(settings: Settings, sender_type: SenderType, sender_id: str | None, row: SenderSettings | None) -> SenderRoute:
    """The route a sender's settings row (None: none stored) gives."""
    own = row is not None and row.driver != SenderDriver.SYSTEM_SMTP
    driver = DriverName(row.driver) if own and row is not None else settings.driver
    return SenderRoute(
        sender_type=sender_type,
        sender_id=sender_id,
        driver=driver,
        send_queue=driver.value if driver.value in settings.send_rates else None,
        default_from=row.default_from if row else None,
        hourly_limit=row.hourly_limit if row else None,
        daily_limit=row.daily_limit if row else None,
        settings=row if own else None,
    )


async def resolve_sender(session: AsyncSession, settings: Settings, sender_type: SenderType, sender_id: str | None) -> SenderRoute:
    """Which driver, which queue, which limits for this sender now: one read of its settings (none for the system)."""
    row = await session.get(SenderSettings, sender_id) if sender_type == SenderType.USER and sender_id else None
    return route_of(settings, sender_type, sender_id, row)


def sender_key(sender_type: SenderType, sender_id: str | None) -> str:
    """The sender's name in the quota counters."""
    return f"{sender_type}:{sender_id or ''}"


async def rotate_secrets(sessions: async_sessionmaker[AsyncSession], box: SecretBox) -> int:
    """Re-encrypt every stored secret with the newest key, in one transaction (all or nothing)."""
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
        await session.commit()
        return changed
