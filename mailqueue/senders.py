"""Who sends an email, and through what: sender settings -> a driver (inside the worker only).

Secrets are decrypted here, in the send activity's process, and nowhere else. Drivers are
kept per sender so that SMTP connections and HTTP clients are reused; a change of the
settings a driver is built from is a new driver on the next send (the old one is closed).
"""

from __future__ import annotations

import asyncio
import hashlib
from enum import StrEnum

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from mailqueue.config import Settings, SmtpSecurity
from mailqueue.crypto import SecretBox
from mailqueue.drivers import Driver
from mailqueue.models import SenderSettings


class SenderDriver(StrEnum):
    SYSTEM_SMTP = "system_smtp"
    USER_SMTP = "user_smtp"
    SENDGRID = "sendgrid"
    MAILGUN = "mailgun"
    SES = "ses"


# Fields each driver needs, so a PUT that lacks one is refused (422) instead of failing at send time.
REQUIRED: dict[SenderDriver, tuple[str, ...]] = {
    SenderDriver.SYSTEM_SMTP: (),
    SenderDriver.USER_SMTP: ("smtp_host", "smtp_port"),
    SenderDriver.SENDGRID: ("api_key_enc",),
    SenderDriver.MAILGUN: ("api_key_enc", "mailgun_domain"),
    SenderDriver.SES: ("api_key_enc", "api_secret_enc", "ses_region"),
}


def sender_key(sender_type: str, sender_id: str | None) -> str:
    return f"{sender_type}:{sender_id or ''}"


# What a driver is built from: a change to any of these is a new driver; limits, the default
# From and the like are read per email and need none.
_DRIVER_FIELDS = (
    "driver", "smtp_host", "smtp_port", "smtp_username", "smtp_security", "smtp_password_enc",
    "api_key_enc", "api_secret_enc", "mailgun_domain", "mailgun_region", "ses_region",
)


class DriverFactory:
    """One driver per sender, built on first use and kept (its SMTP connections and HTTP client
    are reused). When the sender's settings change, the next send builds a new one and the old
    one is closed once no send can still be using it."""

    RETIRE_MARGIN_SECONDS = 5.0

    def __init__(self, settings: Settings, system: Driver, secrets: SecretBox | None = None) -> None:
        self._settings = settings
        self.system = system
        self._secrets = secrets
        self._drivers: dict[str, tuple[str, Driver]] = {}  # user id -> (settings fingerprint, driver)
        self._retiring: dict[int, tuple[Driver, asyncio.TimerHandle]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _box(self) -> SecretBox:
        if self._secrets is None:
            self._secrets = SecretBox.from_settings(self._settings)
        return self._secrets

    def for_sender(self, row: SenderSettings | None) -> Driver:
        if row is None or row.driver == SenderDriver.SYSTEM_SMTP:
            return self.system
        fingerprint = hashlib.sha256(repr([(f, getattr(row, f)) for f in _DRIVER_FIELDS]).encode()).hexdigest()
        kept = self._drivers.get(row.user_id)
        if kept is not None and kept[0] == fingerprint:
            return kept[1]
        driver = self._build(row)
        self._drivers[row.user_id] = (fingerprint, driver)
        if kept is not None:
            self._retire(kept[1])
        return driver

    def _retire(self, driver: Driver) -> None:
        """Close a replaced driver after the longest a send that already took it can still run
        (its attempt's time limit): closing it earlier could cut a send off mid-way."""
        if getattr(driver, "aclose", None) is None:
            return
        loop = asyncio.get_running_loop()  # for_sender runs in the send activity
        handle = loop.call_later(self._settings.send_timeout_seconds + self.RETIRE_MARGIN_SECONDS, self._close_retired, id(driver))
        self._retiring[id(driver)] = (driver, handle)

    def _close_retired(self, key: int) -> None:
        driver, _ = self._retiring.pop(key)
        task = asyncio.get_running_loop().create_task(driver.aclose())  # type: ignore[attr-defined]
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @property
    def retiring(self) -> int:
        """Replaced drivers not closed yet (for tests)."""
        return len(self._retiring) + len(self._closing)

    def _secret(self, token: str | None) -> str:
        return self._box().decrypt(token) if token else ""

    def _build(self, row: SenderSettings) -> Driver:
        timeout = self._settings.smtp_timeout_seconds
        match SenderDriver(row.driver):
            case SenderDriver.USER_SMTP:
                from mailqueue.drivers.smtp import SmtpDriver

                return SmtpDriver(
                    row.smtp_host or "", row.smtp_port or 587,
                    security=SmtpSecurity(row.smtp_security or SmtpSecurity.STARTTLS),
                    username=row.smtp_username, password=self._secret(row.smtp_password_enc) or None,
                    timeout=timeout, validate_certs=self._settings.smtp_validate_certs,
                )
            case SenderDriver.SENDGRID:
                from mailqueue.drivers.sendgrid import SendGridDriver

                return SendGridDriver(self._secret(row.api_key_enc), timeout=timeout, **_base_url(self._settings.sendgrid_base_url))
            case SenderDriver.MAILGUN:
                from mailqueue.drivers.mailgun import MailgunDriver

                return MailgunDriver(
                    self._secret(row.api_key_enc), row.mailgun_domain or "", region=row.mailgun_region or "us",
                    timeout=timeout, **_base_url(self._settings.mailgun_base_url),
                )
            case SenderDriver.SES:
                from mailqueue.drivers.ses import SesDriver

                return SesDriver(
                    self._secret(row.api_key_enc), self._secret(row.api_secret_enc), row.ses_region or "",
                    endpoint_url=self._settings.ses_endpoint_url, timeout=timeout,
                )
        return self.system

    async def aclose(self) -> None:
        """On worker shutdown: every driver, the replaced ones too."""
        retiring, self._retiring = list(self._retiring.values()), {}
        for _, handle in retiring:
            handle.cancel()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        for driver in [self.system, *(d for _, d in self._drivers.values()), *(d for d, _ in retiring)]:
            close = getattr(driver, "aclose", None)
            if close is not None:
                await close()


def _base_url(url: str | None) -> dict[str, str]:
    return {"base_url": url} if url else {}


SECRET_COLUMNS = ("smtp_password_enc", "api_key_enc", "api_secret_enc")


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
