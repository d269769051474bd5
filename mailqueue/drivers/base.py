"""What every driver shares: the names of the ways mail leaves, the interface, the answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from email.message import EmailMessage
from enum import StrEnum
from typing import Protocol


class DriverName(StrEnum):
    """Every way an email can leave: the one list of driver names.

    The system sends through `smtp` or `log` (MAILQUEUE_DRIVER); a user's sender settings pick the
    system's driver or one of their own. These names key MAILQUEUE_SEND_RATES and the rated send
    queues (`<task queue>.<name>`).
    """

    SMTP = "smtp"  # the system's SMTP server (MAILQUEUE_SMTP_*)
    LOG = "log"  # the system's log-only driver: nothing leaves
    USER_SMTP = "user_smtp"  # a user's own SMTP server
    SENDGRID = "sendgrid"
    MAILGUN = "mailgun"
    SES = "ses"


# The drivers MAILQUEUE_DRIVER may name: the system's own.
SYSTEM_DRIVERS = (DriverName.SMTP, DriverName.LOG)
# A user's sender settings: the system's driver (whichever it is), or one of the user's own.
SenderDriver = StrEnum(  # type: ignore[misc]
    "SenderDriver",
    {"SYSTEM_SMTP": "system_smtp", **{d.name: d.value for d in DriverName if d not in SYSTEM_DRIVERS}},
)


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
