"""SMTP driver on aiosmtplib, classifying every failure as transient or permanent."""

from __future__ import annotations

import re
from email.message import EmailMessage

import aiosmtplib

from mailqueue.config import Settings, SmtpSecurity
from mailqueue.drivers import Delivery
from mailqueue.errors import PermanentDeliveryError, TransientDeliveryError

_QUEUED_AS = re.compile(r"queued as\s+(\S+)", re.IGNORECASE)


def _classify(code: int, what: str) -> TransientDeliveryError | PermanentDeliveryError:
    cls = PermanentDeliveryError if 500 <= code < 600 else TransientDeliveryError
    return cls(what, code=code)


class SmtpDriver:
    name = "smtp"

    def __init__(
        self,
        host: str,
        port: int,
        *,
        security: SmtpSecurity = SmtpSecurity.NONE,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        validate_certs: bool = True,
    ) -> None:
        self.host, self.port, self.security = host, port, security
        self._username, self._password = username, password
        self.timeout, self.validate_certs = timeout, validate_certs

    @classmethod
    def from_settings(cls, s: Settings) -> SmtpDriver:
        return cls(
            s.smtp_host,
            s.smtp_port,
            security=s.smtp_security,
            username=s.smtp_username,
            password=s.smtp_password.get_secret_value() if s.smtp_password else None,
            timeout=s.smtp_timeout_seconds,
            validate_certs=s.smtp_validate_certs,
        )

    async def send(self, message: EmailMessage, sender: str, recipients: list[str]) -> Delivery:
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            use_tls=self.security is SmtpSecurity.TLS,
            start_tls=self.security is SmtpSecurity.STARTTLS,
            validate_certs=self.validate_certs,
            timeout=self.timeout,
        )
        server = f"{self.host}:{self.port}"
        try:
            async with client:
                if self._username:
                    await client.login(self._username, self._password or "")
                refused, reply = await client.send_message(message, sender=sender, recipients=recipients)
        except aiosmtplib.SMTPAuthenticationError as exc:
            # The server's words only: never the username or password.
            raise PermanentDeliveryError(
                f"SMTP authentication refused by {server}: {exc.code} {exc.message}", code=exc.code
            ) from None
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            worst = max(codes) if all(c >= 500 for c in codes) else min(codes)
            raise _classify(worst, f"all recipients refused by {server}: {detail}") from None
        except aiosmtplib.SMTPResponseException as exc:
            raise _classify(exc.code, f"{server} answered {exc.code} {exc.message}") from None
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            raise TransientDeliveryError(f"cannot talk to {server}: {type(exc).__name__}: {exc}") from None
        match = _QUEUED_AS.search(reply)
        return Delivery(
            provider_message_id=match.group(1) if match else str(message["Message-ID"]),
            refused_recipients={addr: f"{r.code} {r.message}" for addr, r in refused.items()},
        )
