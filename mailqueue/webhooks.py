"""Outbound webhooks (Standard Webhooks): what an endpoint gets, how it is signed, where it may point, its rows.

An endpoint gets exactly the events its owner's GET /v1/events shows (admins and the system: all),
filtered by its event types, in feed order, read with mailqueue/events.py's `read_feed` after the
endpoint's own cursor. One long-lived workflow per endpoint (workflows/webhooks.py) delivers them
on the task queue `<task_queue>-webhooks`, apart from the sends; its activities
(activities/webhooks.py) read the signing secret from the database by endpoint id, so the secret
never enters a workflow history.

Each delivery is a POST of one event, signed with the `standardwebhooks` library: `webhook-id` is
the email event's id (the same on every retry and redelivery, so receivers can drop duplicates),
`webhook-timestamp` the time of the attempt, `webhook-signature` the HMAC over both and the body.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from standardwebhooks import Webhook
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from mailqueue.config import Settings
from mailqueue.contracts import SenderType
from mailqueue.egress import Destination, Kind, check_destination
from mailqueue.events import FeedEvent, FeedFilter
from mailqueue.models import Role, User, WebhookDelivery, WebhookEndpoint, WebhookStatus

# --- names and typed inputs shared by the workflows, their activities and the API (no secrets here:
# every field ends up in workflow histories; new fields need defaults) -------------------------

ENDPOINT_WORKFLOW = "WebhookEndpointWorkflow"
REDELIVERY_WORKFLOW = "WebhookRedeliveryWorkflow"
DELIVERY_FAILED = "WebhookDeliveryFailed"  # a POST that got no 2xx: retried with backoff
SECRET_UNREADABLE = "WebhookSecretUnreadable"  # no configured key opens the stored secret: retrying cannot help


def webhook_queue(task_queue: str) -> str:
    """The task queue of webhook deliveries: their own worker slots, apart from the sends."""
    return f"{task_queue}-webhooks"


def endpoint_workflow_id(endpoint_id: str) -> str:
    return f"webhook-{endpoint_id}"


@dataclass
class DeliveryPolicy:
    """Timings of an endpoint's deliveries (from the MAILQUEUE_WEBHOOK_* settings when it was created)."""

    retry_initial_seconds: float = 1.0
    retry_maximum_seconds: float = 600.0
    disable_after_seconds: float = 3 * 24 * 3600.0
    call_timeout_seconds: float = 10.0
    wait_seconds: float = 60.0
    batch: int = 100
    loops_per_run: int = 100

    @classmethod
    def of(cls, settings: Settings) -> DeliveryPolicy:
        return cls(
            retry_initial_seconds=settings.webhook_retry_initial_seconds,
            retry_maximum_seconds=settings.webhook_retry_maximum_seconds,
            disable_after_seconds=settings.webhook_disable_after_seconds,
            call_timeout_seconds=settings.webhook_timeout_seconds,
            wait_seconds=settings.webhook_wait_seconds,
            batch=settings.webhook_batch,
            loops_per_run=settings.webhook_loops_per_run,
        )


@dataclass
class EndpointRun:
    """The input of an endpoint's workflow (and of each run it continues as)."""

    endpoint_id: str
    policy: DeliveryPolicy


@dataclass
class DeliverRequest:
    endpoint_id: str
    wait_seconds: float = 60.0
    batch: int = 100
    call_timeout_seconds: float = 10.0


@dataclass
class DeliverResult:
    delivered: int = 0
    gone: bool = False  # the endpoint was deleted or disabled: its workflow ends


@dataclass
class DisableRequest:
    endpoint_id: str
    reason: str


@dataclass
class RedeliverRequest:
    endpoint_id: str
    delivery_id: str
    policy: DeliveryPolicy


@dataclass
class RedeliverResult:
    delivered: bool = False
    gone: bool = False


@dataclass
class EndpointOutcome:
    disabled: bool = False
    gone: bool = False


# --- secrets --------------------------------------------------------------------------------

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A signing secret as Standard Webhooks writes them: whsec_ and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signature_headers(secret: str, msg_id: str, body: str, at: datetime) -> dict[str, str]:
    """webhook-id, webhook-timestamp and webhook-signature for one POST of `body`."""
    whole = at.replace(microsecond=0)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(whole.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, whole, body),
    }


# --- the URL policy ---------------------------------------------------------------------------

MAX_URL = 2048


class BadUrl(ValueError):
    """Not a URL a webhook can go to (the message says why; it never holds resolved addresses)."""


def parse_url(url: str) -> tuple[str, int]:
    """(host, port) of a webhook URL: http or https, a host, no credentials in it."""
    if len(url) > MAX_URL:
        raise BadUrl(f"is longer than {MAX_URL} characters")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise BadUrl("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise BadUrl("is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise BadUrl("must be an http:// or https:// URL")
    if not parts.hostname:
        raise BadUrl("has no host")
    if parts.username is not None or parts.password is not None:
        raise BadUrl("must not carry credentials (user:password@); authenticate with the signature")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def destination(settings: Settings) -> Destination:
    """The egress check for webhook URLs, for the HTTP client to call at each connect: public
    addresses on ports 80/443 only, unless MAILQUEUE_WEBHOOK_ALLOW_PRIVATE lifts both rules."""

    async def check(host: str, port: int) -> list[Any]:
        if settings.webhook_allow_private:
            # The host named as allowed: resolved (hosts file too), any address, any port.
            lifted = settings.model_copy(update={"egress_allow": [*settings.egress_allow, host]})
            return await check_destination(lifted, host, port, kind=Kind.HTTP)
        return await check_destination(settings, host, port, kind=Kind.HTTP)

    return check


async def check_url(settings: Settings, url: str) -> None:
    """BadUrl or DestinationRefused when a webhook may not go to `url` (checked again at each delivery)."""
    host, port = parse_url(url)
    await destination(settings)(host, port)


# --- payloads ---------------------------------------------------------------------------------


def event_type(event: str) -> str:
    return f"email.{event}"


def payload(event: FeedEvent) -> str:
    """The JSON body of one event: the fields GET /v1/events shows, never the email's content."""
    return json.dumps(
        {
            "type": event_type(event.event),
            "timestamp": event.created_at.astimezone(UTC).isoformat(),
            "data": {
                "id": event.event_id,
                "email_id": event.email_id,
                "event": event.event,
                "status": event.status,
                "attempt": event.attempt,
                "detail": event.detail,
                "cursor": str(event.cursor),
                "created_at": event.created_at.astimezone(UTC).isoformat(),
            },
        },
        separators=(",", ":"),
    )


# --- the store --------------------------------------------------------------------------------


async def owner_filter(session: AsyncSession, endpoint: WebhookEndpoint) -> FeedFilter:
    """The events the endpoint's owner sees in GET /v1/events (an admin: all), of its types."""
    kind, _, owner_id = endpoint.owner.partition(":")
    types = tuple(endpoint.event_types or ())
    if kind != SenderType.USER.value:
        return FeedFilter(everyone=True, types=types)
    user = await session.get(User, owner_id)
    return FeedFilter(sender_id=owner_id, everyone=user is not None and user.role == Role.ADMIN.value, types=types)


async def attempts_before(session: AsyncSession, endpoint_id: str, event_id: str, *, redelivery: bool) -> int:
    """Attempts already made to deliver (or redeliver) this event to this endpoint."""
    query = select(sa.func.count()).select_from(WebhookDelivery).where(
        col(WebhookDelivery.endpoint_id) == endpoint_id, col(WebhookDelivery.event_id) == event_id,
        col(WebhookDelivery.redelivery) == redelivery,
    )
    return int((await session.exec(query)).one())


# --- starting the endpoints' workflows ----------------------------------------------------------


async def start_endpoint(temporal: Client, settings: Settings, endpoint_id: str) -> None:
    """Start the endpoint's workflow; one already running is left as it is. RPCError/RuntimeError
    when Temporal does not answer."""
    await temporal.start_workflow(
        ENDPOINT_WORKFLOW,
        EndpointRun(endpoint_id, DeliveryPolicy.of(settings)),
        id=endpoint_workflow_id(endpoint_id),
        task_queue=webhook_queue(settings.task_queue),
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        rpc_timeout=timedelta(seconds=10),
        static_summary=f"webhook endpoint {endpoint_id}",
    )


async def start_active_endpoints(temporal: Client, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> int:
    """Every active endpoint's workflow running (a worker does this at start, so no endpoint depends
    on the API's one start having worked); how many were asked for."""
    async with sessions() as session:
        ids = (await session.exec(select(WebhookEndpoint.id).where(col(WebhookEndpoint.status) == WebhookStatus.ACTIVE.value))).all()
    for endpoint_id in ids:
        await start_endpoint(temporal, settings, endpoint_id)
    return len(ids)
