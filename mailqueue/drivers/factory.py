"""Building the driver a sender uses (inside the worker only), and keeping it for the next send.

Secrets are decrypted here, in the send activity's process, and nowhere else. Drivers are
kept per sender so that SMTP connections and HTTP clients are reused; a change of the
settings a driver is built from is a new driver on the next send (the old one is closed).
"""

from __future__ import annotations

import asyncio
import hashlib

from mailqueue.config import Settings, SmtpSecurity
from mailqueue.crypto import SecretBox
from mailqueue.drivers.base import Driver, DriverName, SenderDriver
from mailqueue.drivers.log import LogDriver
from mailqueue.drivers.mailgun import MailgunDriver
from mailqueue.drivers.sendgrid import SendGridDriver
from mailqueue.drivers.ses import SesDriver
from mailqueue.drivers.smtp import SmtpDriver
from mailqueue.egress import Kind, destination, plaintext_auth_allowed
from mailqueue.models import SenderSettings
from mailqueue.senders import SenderRoute


def driver_from_settings(settings: Settings) -> Driver:
    """The system's driver (MAILQUEUE_DRIVER)."""
    if settings.driver is DriverName.LOG:
        return LogDriver()
    return SmtpDriver.from_settings(settings)


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

    def for_route(self, route: SenderRoute) -> Driver:
        """The driver that sends a sender's emails: the system's, or the user's own (see senders.resolve_sender)."""
        return self.for_sender(route.settings) if route.own_driver else self.system

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
        match DriverName(row.driver):
            case DriverName.USER_SMTP:
                # Anyone's server: reached through the egress policy, told nothing in clear, quoted never.
                host = row.smtp_host or ""
                return SmtpDriver(
                    host, row.smtp_port or 587,
                    security=SmtpSecurity(row.smtp_security or SmtpSecurity.STARTTLS),
                    username=row.smtp_username, password=self._secret(row.smtp_password_enc) or None,
                    timeout=timeout, validate_certs=self._settings.smtp_validate_certs,
                    destination=destination(self._settings, Kind.SMTP),
                    plaintext_auth=plaintext_auth_allowed(self._settings, host),
                    server_words=False,
                )
            case DriverName.SENDGRID:
                return SendGridDriver(
                    self._secret(row.api_key_enc), timeout=timeout, destination=destination(self._settings, Kind.HTTP),
                    **_base_url(self._settings.sendgrid_base_url),
                )
            case DriverName.MAILGUN:
                return MailgunDriver(
                    self._secret(row.api_key_enc), row.mailgun_domain or "", region=row.mailgun_region or "us",
                    timeout=timeout, destination=destination(self._settings, Kind.HTTP), **_base_url(self._settings.mailgun_base_url),
                )
            case DriverName.SES:
                return SesDriver(
                    self._secret(row.api_key_enc), self._secret(row.api_secret_enc), row.ses_region or "",
                    endpoint_url=self._settings.ses_endpoint_url, timeout=timeout, destination=destination(self._settings, Kind.HTTP),
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
