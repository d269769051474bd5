"""Mail drivers: one small interface, one module per way of sending."""

from __future__ import annotations

from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Protocol

from mailqueue.config import DriverName, Settings


@dataclass
class Delivery:
    """What a driver reports for a message the provider accepted."""

    provider_message_id: str
    refused_recipients: dict[str, str] = field(default_factory=dict)


class Driver(Protocol):
    name: str

    async def send(self, message: EmailMessage, sender: str, recipients: list[str]) -> Delivery:
        """Hand the message over, or raise TransientDeliveryError / PermanentDeliveryError."""
        ...


def driver_from_settings(settings: Settings) -> Driver:
    if settings.driver is DriverName.LOG:
        from mailqueue.drivers.log import LogDriver

        return LogDriver()
    from mailqueue.drivers.smtp import SmtpDriver

    return SmtpDriver.from_settings(settings)
