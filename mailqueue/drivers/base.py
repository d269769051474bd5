"""What every driver shares: the names of the ways mail leaves, the interface, the answer."""

from __future__ import annotations

import re
from collections.abc import Iterable
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


# Control characters (C0, C1) and the Unicode line and direction marks: a remote text keeps
# none of them, so it cannot forge a log line, a header or the reading order of a reason.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]+")
REMOTE_TEXT_LIMIT = 200


def remote_text(text: str, secrets: Iterable[str] = (), limit: int = REMOTE_TEXT_LIMIT) -> str:
    """A remote server's own words made safe to log or record: every secret out (before the cut,
    so that no prefix of one survives), no control characters, at most `limit` characters."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _UNSAFE.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"
