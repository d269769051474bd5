"""Bodies of /v1/settings/mail: a user's sender settings (secrets write-only) and the test send."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.schemas.common import Text, normalize_address
from mailqueue.config import SmtpSecurity
from mailqueue.drivers.base import SenderDriver
from mailqueue.models import SenderSettings

# The write-only fields and the columns that keep them encrypted.
SECRETS = {"smtp_password": "smtp_password_enc", "api_key": "api_key_enc", "api_secret": "api_secret_enc"}


class MailSettingsIn(BaseModel):
    """Secrets (smtp_password, api_key, api_secret): omit or null to keep the stored one, "" to remove it.

    A secret stays bound to where it was given for: a PUT that changes smtp_host, smtp_port,
    smtp_username or smtp_security clears the stored smtp_password, and one that changes the
    driver clears api_key and api_secret, unless the same PUT gives them again (the answer
    then shows `smtp_password_set: false`)."""

    model_config = ConfigDict(extra="forbid")
    driver: SenderDriver = SenderDriver.SYSTEM_SMTP
    smtp_host: str | None = Field(
        default=None, max_length=255, pattern=r"^[A-Za-z0-9.:\[\]-]+$",
        description="A public host name or address (the egress policy refuses loopback, private, link-local and metadata ones)",
    )
    smtp_port: int | None = Field(default=None, ge=1, le=65535, description="25, 465, 587 (default) or 2525")
    smtp_username: Text | None = Field(default=None, max_length=255)
    smtp_password: str | None = Field(
        default=None, max_length=1000, description="Cleared by a change of host, port, username or security unless given again",
    )
    smtp_security: SmtpSecurity | None = Field(default=None, description="starttls (default), tls, or none (no AUTH then, unless the operator allows it for the host)")
    api_key: str | None = Field(
        default=None, max_length=1000, description="SendGrid or Mailgun API key; SES access key id. Cleared by a change of driver",
    )
    api_secret: str | None = Field(default=None, max_length=1000, description="SES secret access key. Cleared by a change of driver")
    mailgun_domain: str | None = Field(default=None, max_length=255, pattern=r"^[A-Za-z0-9.-]+$")
    mailgun_region: str | None = Field(default=None, pattern=r"^(us|eu)$")
    ses_region: str | None = Field(default=None, max_length=32, pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")
    default_from: str | None = Field(default=None, max_length=512)
    hourly_limit: int | None = Field(default=None, ge=1, le=10_000_000)
    daily_limit: int | None = Field(default=None, ge=1, le=100_000_000)

    @field_validator("default_from")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return normalize_address(value) if value else None


class MailSettingsOut(BaseModel):
    user_id: str
    driver: SenderDriver
    smtp_host: str | None = None
    smtp_port: int | None = None
    smtp_username: str | None = None
    smtp_security: str | None = None
    smtp_password_set: bool = False
    api_key_set: bool = False
    api_secret_set: bool = False
    mailgun_domain: str | None = None
    mailgun_region: str | None = None
    ses_region: str | None = None
    default_from: str | None = None
    hourly_limit: int | None = None
    daily_limit: int | None = None
    updated_at: datetime | None = None

    @classmethod
    def of(cls, user_id: str, row: SenderSettings | None) -> MailSettingsOut:
        """What may be shown of a user's settings: never a secret, only whether one is set."""
        if row is None:
            return cls(user_id=user_id, driver=SenderDriver.SYSTEM_SMTP)
        return cls(
            **{k: v for k, v in row.model_dump().items() if not k.endswith("_enc")},
            smtp_password_set=bool(row.smtp_password_enc), api_key_set=bool(row.api_key_enc), api_secret_set=bool(row.api_secret_enc),
        )


class TestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str | None = Field(default=None, max_length=512, description="Default: the user's email address")

    @field_validator("to")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return normalize_address(value) if value else None


class TestOut(BaseModel):
    email_id: str
    status: str
    provider: str | None
    provider_message_id: str | None
    error: str | None
