"""Bodies of /v1/settings/mail: a user's sender settings (secrets write-only) and the test send."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.schemas.common import Text, normalize_address
from mailqueue.config import SmtpSecurity
from mailqueue.drivers.base import SenderDriver
from mailqueue.inbound import sendgrid_public_key
from mailqueue.models import SenderSettings

# The write-only fields and the columns that keep them encrypted.
SECRETS = {"smtp_password": "smtp_password_enc", "api_key": "api_key_enc", "api_secret": "api_secret_enc",
           "mailgun_webhook_signing_key": "mailgun_webhook_signing_key_enc"}
# An SNS topic's ARN (aws, aws-cn, aws-us-gov partitions).
SNS_TOPIC_ARN = r"^arn:aws(-cn|-us-gov)?:sns:[a-z0-9-]{1,32}:\d{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?$"
MAX_SNS_TOPICS = 20


class MailSettingsIn(BaseModel):
    """Secrets (smtp_password, api_key, api_secret, mailgun_webhook_signing_key): omit or null to keep
    the stored one, "" to remove it.

    A secret stays bound to where it was given for: a PUT that changes smtp_host, smtp_port,
    smtp_username or smtp_security clears the stored smtp_password, and one that changes the
    driver clears api_key and api_secret, unless the same PUT gives them again (the answer
    then shows `smtp_password_set: false`). mailgun_webhook_signing_key is never sent anywhere (it checks
    the events the user's Mailgun sends us), so only "" clears it.

    sns_topic_arns, sendgrid_webhook_public_key and mailgun_webhook_signing_key let
    /v1/inbound/{ses,sendgrid,mailgun}/{user_id} take the events of the user's own provider account."""

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
    # Provider events in on /v1/inbound/<provider>/<user id>: the keys the user's own account signs with.
    sns_topic_arns: list[Annotated[str, Field(max_length=400, pattern=SNS_TOPIC_ARN)]] = Field(
        default_factory=list, max_length=MAX_SNS_TOPICS,
        description="SES: the SNS topics (subscribed to /v1/inbound/ses/{user_id}) whose SES events are this user's",
    )
    sendgrid_webhook_public_key: str | None = Field(
        default=None, max_length=1000,
        description="SendGrid: the signed Event Webhook's verification key (base64, as SendGrid shows it; ECDSA P-256)",
    )
    mailgun_webhook_signing_key: str | None = Field(
        default=None, max_length=200, description="Mailgun: the HTTP webhook signing key (a secret: write-only, stored encrypted)",
    )

    @field_validator("default_from")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return normalize_address(value) if value else None

    @field_validator("sns_topic_arns")
    @classmethod
    def _topics(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))  # each once, in the order given

    @field_validator("sendgrid_webhook_public_key")
    @classmethod
    def _sendgrid_key(cls, value: str | None) -> str | None:
        if not value or not value.strip():
            return None
        value = "".join(value.split())
        sendgrid_public_key(value, "sendgrid_webhook_public_key")  # one that cannot verify anything: 422 now, not at the first event
        return value


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
    sns_topic_arns: list[str] = Field(default_factory=list)
    sendgrid_webhook_public_key: str | None = None
    mailgun_webhook_signing_key_set: bool = False

    @classmethod
    def of(cls, user_id: str, row: SenderSettings | None) -> MailSettingsOut:
        """What may be shown of a user's settings: never a secret, only whether one is set."""
        if row is None:
            return cls(user_id=user_id, driver=SenderDriver.SYSTEM_SMTP)
        shown = {k: v for k, v in row.model_dump().items() if not k.endswith("_enc")}
        return cls(
            **shown | {"sns_topic_arns": row.sns_topic_arns or []},
            smtp_password_set=bool(row.smtp_password_enc), api_key_set=bool(row.api_key_enc), api_secret_set=bool(row.api_secret_enc),
            mailgun_webhook_signing_key_set=bool(row.mailgun_webhook_signing_key_enc),
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
