"""A driver that only logs: for development without any mail server."""

from __future__ import annotations

import logging
from email.message import EmailMessage

from mailqueue.drivers.base import Delivery, DriverName

log = logging.getLogger("mailqueue.drivers.log")


class LogDriver:
    name = DriverName.LOG

    async def send(self, message: EmailMessage, sender: str, recipients: list[str]) -> Delivery:
        log.info(
            "log driver accepted message",
            extra={"message_id": message["Message-ID"], "recipients": len(recipients)},
        )
        return Delivery(provider_message_id=str(message["Message-ID"]))
