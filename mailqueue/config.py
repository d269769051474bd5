"""Settings for every mailqueue process, read once from MAILQUEUE_* variables (or .env)."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DATA_DIR = Path(".mailqueue")


class SmtpSecurity(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    TLS = "tls"


class DriverName(StrEnum):
    SMTP = "smtp"
    LOG = "log"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAILQUEUE_", env_file=".env", extra="ignore")

    database_url: str = Field(
        default=f"sqlite:///{DATA_DIR / 'mailqueue.db'}",
        description="sqlite:///path or postgresql://user@host/db",
    )
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = "mailqueue"
    temporal_grpc_gzip: bool = False

    driver: DriverName = DriverName.SMTP
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_security: SmtpSecurity = SmtpSecurity.NONE
    smtp_timeout_seconds: float = 30.0
    smtp_validate_certs: bool = True

    default_from: str = "mailqueue <noreply@example.com>"
    message_id_domain: str | None = Field(
        default=None, description="Domain of generated Message-IDs; defaults to the sender's domain."
    )
    bootstrap_api_key: SecretStr | None = None
    # Fernet keys for sender secrets at rest, comma-separated, newest first (see mailqueue/crypto.py).
    secret_key: SecretStr | None = None
    secret_key_file: Path = DATA_DIR / "secret.key"

    # Provider endpoints: unset means the provider's own; tests and proxies point them elsewhere.
    sendgrid_base_url: str | None = None
    mailgun_base_url: str | None = None
    ses_endpoint_url: str | None = None

    # Test mode: every email goes to this address instead (original recipients kept in X-Original-* headers).
    test_redirect_to: str | None = None
    # Sends per second across all workers of the task queue (Temporal task-queue rate limit); unset: no limit.
    send_rate_per_second: float | None = Field(default=None, gt=0)
    # Per driver (smtp, log, user_smtp, sendgrid, mailgun, ses), e.g. {"sendgrid": 10, "ses": 14}: each
    # rated driver's sends wait in their own task queue, limited across all workers. API and workers
    # must share this setting (a worker polls only the queues of the drivers it knows).
    send_rates: dict[str, float] = Field(default_factory=dict)

    @field_validator("send_rates")
    @classmethod
    def _positive_rates(cls, value: dict[str, float]) -> dict[str, float]:
        known = {"smtp", "log", "user_smtp", "sendgrid", "mailgun", "ses"}
        for name, rate in value.items():
            if name not in known:
                raise ValueError(f"unknown driver {name!r} in send_rates; known: {sorted(known)}")
            if rate <= 0:
                raise ValueError(f"send rate for {name} must be above 0")
        return value
    # Quota windows (seconds); shorter only in tests.
    quota_hour_seconds: int = Field(default=3600, ge=1)
    quota_day_seconds: int = Field(default=86400, ge=1)

    # Recovery: a Temporal Schedule (created by the workers) runs the reconciler this often; it
    # sets right records left unfinished and unchanged for `reconcile_after_seconds` whose
    # workflow is closed or missing. 0 turns the schedule off.
    reconcile_interval_seconds: float = Field(default=60.0, ge=0)
    reconcile_after_seconds: float = Field(default=300.0, gt=0)

    # Templates: the folder `POST /v1/templates/reload` and `mailqueue dev` load, and the
    # locale dates, numbers and money are formatted in when an email names none.
    templates_dir: Path = Path("templates")
    default_locale: str = "en"

    # Retry policy for the send step (Temporal retry policy).
    default_max_attempts: int = Field(default=3, ge=1, le=20)
    retry_initial_interval_seconds: float = Field(default=2.0, gt=0)
    retry_backoff_coefficient: float = Field(default=2.0, ge=1)
    retry_maximum_interval_seconds: float = Field(default=600.0, gt=0)
    send_timeout_seconds: float = Field(default=60.0, gt=0)
    # A mail server or provider that cannot be reached at all (refused, connect timeout, SMTP 421
    # greeting) is waited for this long, asking again at most a minute apart, without using up
    # attempts: an outage delays mail instead of failing it. 0: count it as a failed attempt.
    unreachable_wait_seconds: float = Field(default=21600.0, ge=0)

    # Limits at the door.
    max_recipients: int = 50
    max_body_bytes: int = 1_000_000
    max_template_data_bytes: int = 1_000_000
    max_request_bytes: int = 4_000_000
    send_at_grace_seconds: float = 60.0
    send_at_max_days: int = 366

    log_level: str = "INFO"

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql", "postgres://")):
            raise ValueError("database_url must be a sqlite:/// or postgresql:// URL")
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()
