"""Webhook endpoints: make, list, show, delete, rotate their secret; their delivery attempts; redeliver one.

A user manages their own endpoints (they get the events of their own emails); admins see every
endpoint (`user_id` narrows the list); an endpoint made with the bootstrap key gets every event.
Someone else's endpoint is as unknown as one that does not exist (404). The rules (URL policy,
signing, the store): mailqueue/webhooks.py."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import timedelta

import sqlalchemy as sa
from sqlmodel import col, select
from temporalio.service import RPCError, RPCStatusCode

from api.schemas.webhooks import WebhookIn
from api.services.context import Context
from api.services.errors import Conflict, NotFound, invalid
from mailqueue import webhooks
from mailqueue.events import feed_end
from mailqueue.accounts import new_id
from mailqueue.contracts import SenderType
from mailqueue.delivery import TemporalUnavailable
from mailqueue.egress import DestinationRefused
from mailqueue.models import User, WebhookDelivery, WebhookEndpoint, WebhookStatus, utcnow
from mailqueue.senders import sender_key
from mailqueue.webhooks import (
    REDELIVERY_WORKFLOW,
    BadUrl,
    DeliveryPolicy,
    RedeliverRequest,
    endpoint_workflow_id,
    webhook_queue,
)

log = logging.getLogger("mailqueue.api.webhooks")
RPC_TIMEOUT = timedelta(seconds=10)


def _owner(ctx: Context) -> str:
    return sender_key(*ctx.principal.sender)


async def _check_url(ctx: Context, url: str) -> None:
    try:
        await webhooks.check_url(ctx.settings, url)
    except BadUrl as exc:
        raise invalid(("body", "url"), f"the URL {exc}", value=url) from None
    except DestinationRefused as exc:
        # The rule only: never the addresses the name resolved to.
        what = exc.reason if exc.part == "port" else f"the URL's host {exc.reason}"
        raise invalid(("body", "url"), f"{what} (MAILQUEUE_WEBHOOK_ALLOW_PRIVATE lifts this for development)", value=url) from None


async def create(ctx: Context, body: WebhookIn) -> tuple[WebhookEndpoint, str]:
    """(the endpoint, its secret in clear: shown this once). Its workflow is running when this returns."""
    await _check_url(ctx, body.url)
    secret = webhooks.new_secret()
    session = ctx.session
    row = WebhookEndpoint(
        id=new_id(), owner=_owner(ctx), url=body.url, event_types=sorted({t.value for t in body.event_types}),
        secret_enc=ctx.secrets.encrypt(secret), cursor=str(await feed_end(session)),
    )
    session.add(row)
    await session.commit()
    try:
        await webhooks.start_endpoint(ctx.temporal, ctx.settings, row.id)
    except (RPCError, RuntimeError) as exc:
        # Nothing half-made: without its workflow the endpoint would get nothing until a worker restarts.
        await session.delete(row)
        await session.commit()
        raise TemporalUnavailable(str(exc)) from exc
    return row, secret


async def _visible(ctx: Context, endpoint_id: str) -> WebhookEndpoint:
    row = await ctx.session.get(WebhookEndpoint, endpoint_id)
    if row is None or not (ctx.principal.is_admin or row.owner == _owner(ctx)):
        raise NotFound(f"no webhook endpoint with id {endpoint_id!r}")
    return row


async def get(ctx: Context, endpoint_id: str) -> WebhookEndpoint:
    return await _visible(ctx, endpoint_id)


async def list_endpoints(ctx: Context, user_id: str | None, page: int, page_size: int) -> tuple[int, Sequence[WebhookEndpoint]]:
    """(how many, one page), newest first: the caller's own; an admin's: all, or one user's."""
    principal = ctx.principal
    filters = []
    if user_id is not None:
        user = await ctx.session.get(User, user_id) if (principal.is_admin or user_id == principal.id) else None
        if user is None:
            raise NotFound(f"no user with id {user_id!r}")
        filters.append(col(WebhookEndpoint.owner) == sender_key(SenderType.USER, user.id))
    elif not principal.is_admin:
        filters.append(col(WebhookEndpoint.owner) == _owner(ctx))
    session = ctx.session
    total = (await session.exec(select(sa.func.count()).select_from(WebhookEndpoint).where(*filters))).one()
    query = select(WebhookEndpoint).where(*filters).order_by(col(WebhookEndpoint.created_at).desc(), col(WebhookEndpoint.id).desc())
    return total, (await session.exec(query.offset((page - 1) * page_size).limit(page_size))).all()


async def delete(ctx: Context, endpoint_id: str) -> None:
    """Gone with its deliveries; its workflow is cancelled (and would end by itself on finding the row gone)."""
    row = await _visible(ctx, endpoint_id)
    await ctx.session.delete(row)
    await ctx.session.commit()
    try:
        await ctx.temporal.get_workflow_handle(endpoint_workflow_id(endpoint_id)).cancel(rpc_timeout=RPC_TIMEOUT)
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            log.warning("webhook endpoint %s deleted; its workflow was not cancelled (%s): it ends at its next step", endpoint_id, exc.status)
    except RuntimeError as exc:
        log.warning("webhook endpoint %s deleted; Temporal unavailable (%s): its workflow ends at its next step", endpoint_id, exc)


async def rotate_secret(ctx: Context, endpoint_id: str) -> tuple[WebhookEndpoint, str]:
    """A new secret signs every delivery from now on (retries of a failed one included)."""
    row = await _visible(ctx, endpoint_id)
    secret = webhooks.new_secret()
    row.secret_enc, row.updated_at = ctx.secrets.encrypt(secret), utcnow()
    ctx.session.add(row)
    await ctx.session.commit()
    return row, secret


async def enable(ctx: Context, endpoint_id: str) -> WebhookEndpoint:
    """A disabled endpoint active again: its workflow starts over at its cursor, so the events it
    missed while disabled arrive first, in order. An active endpoint is left as it is."""
    row = await _visible(ctx, endpoint_id)
    if row.status == WebhookStatus.ACTIVE.value:
        return row
    before = (row.status, row.disabled_reason, row.disabled_at, row.failing_since)
    row.status, row.disabled_reason, row.disabled_at, row.failing_since = WebhookStatus.ACTIVE.value, None, None, None
    row.updated_at = utcnow()
    ctx.session.add(row)
    await ctx.session.commit()
    try:
        await webhooks.start_endpoint(ctx.temporal, ctx.settings, row.id)
    except (RPCError, RuntimeError) as exc:
        row.status, row.disabled_reason, row.disabled_at, row.failing_since = before  # as it was: nothing half-done
        ctx.session.add(row)
        await ctx.session.commit()
        raise TemporalUnavailable(str(exc)) from exc
    return row


async def deliveries(ctx: Context, endpoint_id: str, page: int, page_size: int) -> tuple[int, Sequence[WebhookDelivery]]:
    """Every attempt, newest first."""
    await _visible(ctx, endpoint_id)
    session = ctx.session
    mine = col(WebhookDelivery.endpoint_id) == endpoint_id
    total = (await session.exec(select(sa.func.count()).select_from(WebhookDelivery).where(mine))).one()
    query = select(WebhookDelivery).where(mine).order_by(col(WebhookDelivery.created_at).desc(), col(WebhookDelivery.id).desc())
    return total, (await session.exec(query.offset((page - 1) * page_size).limit(page_size))).all()


async def redeliver(ctx: Context, endpoint_id: str, delivery_id: str) -> tuple[WebhookDelivery, str]:
    """Send that delivery's event once more, durably (a workflow on the webhook queue); (the delivery, its workflow id)."""
    row = await _visible(ctx, endpoint_id)
    delivery = await ctx.session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.endpoint_id != endpoint_id:
        raise NotFound(f"no delivery with id {delivery_id!r} for this endpoint")
    if row.status != WebhookStatus.ACTIVE.value:
        raise Conflict("this endpoint is disabled: nothing is sent to it")
    workflow_id = f"webhook-redeliver-{uuid.uuid4()}"
    try:
        await ctx.temporal.start_workflow(
            REDELIVERY_WORKFLOW, RedeliverRequest(endpoint_id, delivery_id, DeliveryPolicy.of(ctx.settings)),
            id=workflow_id, task_queue=webhook_queue(ctx.settings.task_queue), rpc_timeout=RPC_TIMEOUT,
            static_summary=f"redeliver {delivery.event_id} to webhook endpoint {endpoint_id}",
        )
    except (RPCError, RuntimeError) as exc:
        raise TemporalUnavailable(str(exc)) from exc
    return delivery, workflow_id
