"""Settings for every mailqueue process, read once from MAILQUEUE_* variables (or .env)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from enum import Enum, StrEnum
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mailqueue.drivers.base import SYSTEM_DRIVERS, DriverName

DATA_DIR = Path(".mailqueue")
ENV_PREFIX = "MAILQUEUE_"

# How long the API keeps an idle HTTP connection open (uvicorn --timeout-keep-alive; the
# Dockerfile and compose pass it too). Above the idle time of common clients' connection pools
# (httpx and Node 5 s, aiohttp 15 s) and of load balancers (AWS ALB 60 s), so the client side
# closes an idle connection first: a server that closes first can race a request the client is
# just sending on it, and that request fails without an answer.
HTTP_KEEP_ALIVE_SECONDS = 75


class SmtpSecurity(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    TLS = "tls"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    database_url: str = Field(
        default=f"sqlite:///{DATA_DIR / 'mailqueue.db'}",
        description="sqlite:///path or postgresql://user@host/db",
    )
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = "mailqueue"
    temporal_grpc_gzip: bool = False
    # Emails carry search attributes (EmailStatus, EmailSender, …: mailqueue/search.py) for the
    # Temporal UI. Workers add them to the namespace at start when allowed, else stop and say how.
    search_attributes: bool = True

    driver: DriverName = Field(default=DriverName.SMTP, description="the system's driver: smtp or log")
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_security: SmtpSecurity = SmtpSecurity.NONE
    smtp_timeout_seconds: float = 30.0
    smtp_validate_certs: bool = True

    default_from: str = "mailqueue <noreply@example.com>"
    message_id_domain: str | None = Field(
        default=None, description="Domain of the system's Message-IDs (default: that of default_from); a user's mail uses their verified domain."
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
    # Send (and other) activities one worker process runs at once, per task queue. More than the process
    # can start promptly only moves the backlog from Temporal's queue, where waiting costs nothing, into
    # the worker, where each waiting send's start-to-close clock already runs: under a burst, attempts
    # then time out before they send, and their retries add to the burst. Raise it for remote servers
    # that take long to answer (sends mostly wait on the network then).
    worker_concurrency: int = Field(default=50, ge=1, le=1000)
    # Per driver (smtp, log, user_smtp, sendgrid, mailgun, ses), e.g. {"sendgrid": 10, "ses": 14}: each
    # rated driver's sends wait in their own task queue, limited across all workers. API and workers
    # must share this setting (a worker polls only the queues of the drivers it knows).
    send_rates: dict[str, float] = Field(default_factory=dict)

    @field_validator("driver")
    @classmethod
    def _system_driver(cls, value: DriverName) -> DriverName:
        if value not in SYSTEM_DRIVERS:
            raise ValueError(f"the system's driver is one of {[d.value for d in SYSTEM_DRIVERS]}, not {value.value!r}")
        return value

    @field_validator("send_rates")
    @classmethod
    def _positive_rates(cls, value: dict[str, float]) -> dict[str, float]:
        known = [d.value for d in DriverName]
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
    # Retention (README "Retention"): a daily Temporal Schedule (created by the workers) deletes final
    # emails unchanged for `retention_days`, with their events and recipients and the files no email
    # names any more, `purge_batch` emails per transaction, at `purge_hour_utc`. 0 days turns it off.
    retention_days: int = Field(default=90, ge=0)
    purge_batch: int = Field(default=500, ge=1, le=10_000)
    purge_hour_utc: int = Field(default=3, ge=0, le=23)

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

    # Attachments (README "Attachments"). Their bytes live outside Temporal: in the SQL database
    # (blob_chunks) by default, or in an S3-compatible bucket with blob_url=s3://bucket[/prefix]
    # (credentials from boto3's usual chain, never from here; s3_endpoint_url for MinIO and the like).
    blob_url: str | None = Field(default=None, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    attachment_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1)  # one file
    attachments_max_total_bytes: int = Field(default=25 * 1024 * 1024, ge=1)  # all of one email's files
    attachments_max_count: int = Field(default=20, ge=0)
    # Executables and scripts are refused (mailqueue/attachments.py); entries here (".js",
    # "application/javascript") lift exactly that rule.
    attachment_allowed_types: list[str] = Field(default_factory=list)
    # How long an upload (POST /v1/uploads) may be attached to new emails. It stays while any
    # email that sends it is kept.
    upload_ttl_hours: float = Field(default=168.0, gt=0)

    # --- Safe for many senders (issue 12); the README's "Security model" says what to set in production.

    # Sender identity: a user's From (and default_from) must be in one of their verified domains
    # (/v1/domains). Off only in `make dev`, which warns. The system's own domains (that of
    # MAILQUEUE_DEFAULT_FROM, MAILQUEUE_MESSAGE_ID_DOMAIN and these) are reserved for the system.
    require_verified_from: bool = True
    system_domains: list[str] = Field(default_factory=list)
    # DNS servers ("host" or "host:port") for domain verification and the egress policy's name
    # checks; empty: the system's resolver. Tests point this at a local stub.
    dns_servers: list[str] = Field(default_factory=list)

    # Egress: destinations a user can make us connect to (their SMTP host, provider base URLs,
    # later webhook URLs) must resolve to public addresses, and SMTP to ports 25/465/587/2525.
    # Entries here (CIDRs like 10.1.0.0/16, or exact host names like localhost) lift both checks:
    # for development and tests only.
    egress_allow: list[str] = Field(default_factory=list)
    # Hosts a user's SMTP settings may send AUTH to without TLS (never, unless the operator names them).
    smtp_plaintext_auth_hosts: list[str] = Field(default_factory=list)
    # How long a user's own SMTP server is waited for when it cannot be reached (the system's
    # waits unreachable_wait_seconds).
    user_unreachable_wait_seconds: float = Field(default=900.0, ge=0)
    # The ports a user's SMTP server may listen on (an egress_allow entry lifts this rule too).
    egress_smtp_ports: list[int] = Field(default_factory=lambda: [25, 465, 587, 2525])

    # Abuse limits. Per API key (the bootstrap key included) per minute, shared by every API
    # process: in Redis when redis_url is set, else in the database. 0: no limit.
    rate_limit_per_minute: int = Field(default=300, ge=0)
    redis_url: str | None = None
    # Recipients (to + cc + bcc) a user may queue per hour; admins can set it per user. 0: no cap.
    user_recipients_per_hour: int = Field(default=10_000, ge=0)
    # The highest priority a user may ask for unless an admin raises it for them: high, normal or low.
    user_max_priority: str = Field(default="normal", pattern="^(high|normal|low)$")
    # /docs, /redoc and /openapi.json without a key (off: they need an admin key).
    public_docs: bool = True
    # The ops console (/ops; README "The ops console"): a login lasts this long at most (revoking the key,
    # or deactivating its user, ends it at once), and each email links to its workflow in this Temporal UI.
    ops_session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    temporal_ui_url: str = Field(default="http://localhost:8233", pattern=r"^https?://[^\s?#]+$")
    # /graphql (issue 15; README "GraphQL"): GraphiQL in a browser, and introspection (the schema
    # for tools). Both on for development; turn them off in production (docker-compose.yml does).
    graphql_ide: bool = True
    graphql_introspection: bool = True
    # Refused before anything runs: a query nested deeper than this, or one whose estimated cost (a
    # field is 1, a list multiplies what it holds by `first`, or by 10 where there is none) is over this.
    graphql_max_depth: int = Field(default=10, ge=2)
    graphql_max_cost: int = Field(default=10_000, ge=10)

    # Template rendering runs in a pool of worker processes, each render bounded.
    render_processes: int = Field(default=2, ge=1)
    render_timeout_seconds: float = Field(default=1.5, gt=0)
    render_cpu_seconds: int = Field(default=1, ge=1)
    render_memory_mb: int = Field(default=512, ge=64)

    # Payloads in Temporal (workflow inputs, results, histories) are AES-256-GCM encrypted with
    # these keys, comma-separated, newest first (the first encrypts, all decrypt). Unset: the
    # embedded setup keeps a generated key in payload_key_file, as for secret_key.
    payload_keys: SecretStr | None = None
    payload_key_file: Path = DATA_DIR / "payload.key"
    # Origins allowed to call /codec/* from a browser (the Temporal Web UI).
    codec_cors_origins: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8233", "http://localhost:8233"])
    # The Temporal connection: TLS (server CA, client certificate for mTLS) and an API key (Temporal Cloud).
    temporal_tls: bool = False
    temporal_tls_ca_file: Path | None = None
    temporal_tls_cert_file: Path | None = None
    temporal_tls_key_file: Path | None = None
    temporal_tls_server_name: str | None = None
    temporal_api_key: SecretStr | None = None

    # Suppressions and one-click unsubscribe (issue 14; README "Suppressions and unsubscribe").
    # The API's public base URL: List-Unsubscribe links point at <public_url>/u/<token>. Unset: emails
    # asking for an unsubscribe link are refused (422), since no link could reach this API.
    public_url: str | None = Field(default=None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
    # Fernet keys (HMAC-signed, encrypted) for unsubscribe tokens, comma-separated, newest first (the
    # first makes tokens, all are accepted). Unset: a key generated once into unsubscribe_key_file.
    unsubscribe_keys: SecretStr | None = None
    unsubscribe_key_file: Path = DATA_DIR / "unsubscribe.key"

    # Provider events in (issue 14; README "Provider events in", mailqueue/inbound.py).
    # SES via SNS: the topics whose notifications /v1/inbound/ses accepts, comma-separated (any AWS
    # account can sign genuine SNS messages, so the topic is what makes one ours). Unset: it refuses all.
    sns_topic_arns: str = ""
    # Where SNS signing certificates and subscription confirmations may be fetched from: a regex the
    # URL must match from its start. For tests only; the default is AWS's own SNS endpoints.
    sns_cert_url_pattern: str = r"https://sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/"
    # SendGrid's Event Webhook verification key (base64 DER, as SendGrid's settings page shows it). Unset:
    # /v1/inbound/sendgrid refuses all.
    sendgrid_webhook_public_key: str | None = None
    # Mailgun's HTTP webhook signing key. Unset: /v1/inbound/mailgun refuses all.
    mailgun_webhook_signing_key: SecretStr | None = None
    # SendGrid's and Mailgun's signed timestamps older than this (or as far ahead) are refused; Mailgun
    # tokens are remembered this long to refuse a replay. (SNS messages: one hour, as AWS advises.)
    inbound_max_age_seconds: float = Field(default=600.0, gt=0, le=3600)

    @property
    def sns_topics(self) -> list[str]:
        return [arn.strip() for arn in self.sns_topic_arns.split(",") if arn.strip()]

    @field_validator("sendgrid_webhook_public_key")
    @classmethod
    def _sendgrid_key(cls, value: str | None) -> str | None:
        # Read (and a bad one refused, stopping the API's start) by mailqueue.inbound.sendgrid_public_key.
        return value.strip() if value and value.strip() else None

    @field_validator("sns_cert_url_pattern")
    @classmethod
    def _url_pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value

    log_level: str = "INFO"

    # The event feed's live streams (issue 14; README "Events: the feed and live streams").
    # A comment line this often keeps proxies from closing an idle stream (many cut at 30-60 s).
    events_heartbeat_seconds: float = Field(default=15.0, gt=0)
    # SQLite has no notifications: each API process polls the feed this often. Also how soon a
    # PostgreSQL stream reads again when events wait for an older transaction to end.
    events_poll_seconds: float = Field(default=0.5, gt=0)

    # Feature flags (issue 17; README "Feature flags", mailqueue/flags.py). Every API and worker process
    # reads the flags table this often into its cache; a change reaches them all within 5 s only while
    # this stays well below 5.
    flags_refresh_seconds: float = Field(default=2.0, gt=0, le=60)

    # Outbound webhooks (issue 14; README "Webhooks"). Each endpoint has a workflow of its own on
    # the task queue <task_queue>-webhooks (its own worker slots: a slow endpoint never delays sends).
    # Webhook URLs that resolve to loopback, private, link-local or metadata addresses are refused
    # unless this is on (tests and `make dev`); it lifts the HTTP port rule for them too.
    webhook_allow_private: bool = False
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)  # one POST, connect to answer
    # Retries of a failed POST: from the initial wait, doubling, up to the maximum wait; an endpoint
    # that fails for disable_after_seconds (no success in between) is disabled.
    webhook_retry_initial_seconds: float = Field(default=1.0, gt=0)
    webhook_retry_maximum_seconds: float = Field(default=600.0, gt=0)
    webhook_disable_after_seconds: float = Field(default=3 * 24 * 3600.0, gt=0)
    webhook_wait_seconds: float = Field(default=60.0, gt=0)  # one delivery step waits this long for new events
    webhook_batch: int = Field(default=100, ge=1, le=1000)  # events one delivery step sends at most
    webhook_loops_per_run: int = Field(default=100, ge=1)  # delivery steps before a workflow continues as new
    webhook_concurrency: int = Field(default=100, ge=1)  # deliveries in flight per worker process

    # Metrics (issue 13; README "Metrics"). The API serves /metrics on its own port. A worker serves
    # its own and the Temporal SDK's at http://<host>:<port>/metrics when the port is set (0: off).
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    worker_metrics_host: str = "0.0.0.0"

    # Bounces by mail for SMTP senders (issue 14; README "Bounces by mail (SMTP senders)"). With a
    # bounce domain, every SMTP send's envelope sender is bounce+<email id>@<bounce domain> (VERP) and
    # List-Unsubscribe gains a mailto:unsubscribe+<email id>@<bounce domain>; the domain's MX points at
    # the listener (`mailqueue bounces`) on bounce_host:bounce_port. Unset: no VERP, no listener.
    bounce_domain: str | None = None
    bounce_host: str = "127.0.0.1"
    bounce_port: int = Field(default=2525, ge=1, le=65535)
    bounce_max_bytes: int = Field(default=10_000_000, ge=10_000)  # one message to the listener (552 above)

    @field_validator("bounce_domain")
    @classmethod
    def _bounce_domain(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # empty (compose's unset variable): no bounce domain
        domain = value.strip().rstrip(".").lower()
        label = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
        if len(domain) > 200 or not re.fullmatch(rf"{label}(\.{label})*", domain):
            raise ValueError(f"{value!r} is not a domain name (the bounce domain: bounces.example.com)")
        return domain

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql", "postgres://")):
            raise ValueError("database_url must be a sqlite:/// or postgresql:// URL")
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_env(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process that must run with exactly these settings: `environ`
    (default: this process's) without its MAILQUEUE_* variables, plus one variable per setting.

    The dev stack, the tests and the benchmark start the worker and the API this way."""
    base = os.environ if environ is None else environ
    env = {k: v for k, v in base.items() if not k.startswith(ENV_PREFIX)}
    for name, value in settings.model_dump().items():
        if value is None:
            continue  # unset: the child's default (or its .env), as here
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, dict | list):
            value = json.dumps(value)  # pydantic-settings reads complex values as JSON
        elif isinstance(value, Enum):
            value = value.value
        env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    return env
