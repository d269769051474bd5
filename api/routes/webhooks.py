"""/v1/webhooks: endpoints that get email events as signed POSTs (Standard Webhooks), and their deliveries."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from api.deps import ContextDep
from api.schemas.webhooks import (
    DeliveryOut,
    DeliveryPage,
    RedeliveryAccepted,
    WebhookCreated,
    WebhookIn,
    WebhookOut,
    WebhookPage,
    WebhookSecret,
)
from api.services import webhooks

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
NOT_FOUND = {404: {"description": "No such endpoint (or not yours)"}}
UNAVAILABLE = {503: {"description": "Temporal is unavailable: nothing was changed, try again"}}
EndpointId = Annotated[str, Path(min_length=1, max_length=36, description="The endpoint's id")]
Page = Annotated[int, Query(ge=1, le=100_000)]
PageSize = Annotated[int, Query(ge=1, le=100)]


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=WebhookCreated,
    responses={422: {"description": "Not an http(s) URL, a host the URL policy refuses, or an unknown event type"}, **UNAVAILABLE},
    summary="Add an endpoint: every new event of your emails (of these types) is POSTed to it, signed; the secret is shown once",
)
async def create_webhook(body: WebhookIn, ctx: ContextDep) -> WebhookCreated:
    row, secret = await webhooks.create(ctx, body)
    return WebhookCreated(**WebhookOut.of(row).model_dump(), secret=secret)


@router.get(
    "", response_model=WebhookPage, responses={404: {"description": "No such user (or not yours)"}},
    summary="Your webhook endpoints, newest first (admins: all, or ?user_id=)",
)
async def list_webhooks(
    ctx: ContextDep,
    user_id: Annotated[str | None, Query(max_length=36, description="Admins: only this user's endpoints")] = None,
    page: Page = 1,
    page_size: PageSize = 20,
) -> WebhookPage:
    total, rows = await webhooks.list_endpoints(ctx, user_id, page, page_size)
    return WebhookPage(items=[WebhookOut.of(r) for r in rows], page=page, page_size=page_size, total=total)


@router.get("/{endpoint_id}", response_model=WebhookOut, responses=NOT_FOUND, summary="One endpoint: its status (disabled, and why) and cursor")
async def get_webhook(endpoint_id: EndpointId, ctx: ContextDep) -> WebhookOut:
    return WebhookOut.of(await webhooks.get(ctx, endpoint_id))


@router.delete(
    "/{endpoint_id}", status_code=status.HTTP_204_NO_CONTENT, responses={**NOT_FOUND, 204: {"description": "Deleted: nothing more is sent to it"}},
    summary="Delete an endpoint: its delivery workflow stops",
)
async def delete_webhook(endpoint_id: EndpointId, ctx: ContextDep) -> Response:
    await webhooks.delete(ctx, endpoint_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{endpoint_id}/rotate-secret", response_model=WebhookSecret, responses=NOT_FOUND,
    summary="A new signing secret, shown once; deliveries from now on are signed with it",
)
async def rotate_webhook_secret(endpoint_id: EndpointId, ctx: ContextDep) -> WebhookSecret:
    row, secret = await webhooks.rotate_secret(ctx, endpoint_id)
    return WebhookSecret(id=row.id, secret=secret)


@router.post(
    "/{endpoint_id}/enable", response_model=WebhookOut, responses={**NOT_FOUND, **UNAVAILABLE},
    summary="Enable a disabled endpoint again: what it missed arrives first, in order (an active one is unchanged)",
)
async def enable_webhook(endpoint_id: EndpointId, ctx: ContextDep) -> WebhookOut:
    return WebhookOut.of(await webhooks.enable(ctx, endpoint_id))


@router.get(
    "/{endpoint_id}/deliveries", response_model=DeliveryPage, responses=NOT_FOUND,
    summary="Every delivery attempt, newest first: status code, latency, error",
)
async def list_deliveries(endpoint_id: EndpointId, ctx: ContextDep, page: Page = 1, page_size: PageSize = 20) -> DeliveryPage:
    total, rows = await webhooks.deliveries(ctx, endpoint_id, page, page_size)
    return DeliveryPage(items=[DeliveryOut.of(r) for r in rows], page=page, page_size=page_size, total=total)


@router.post(
    "/{endpoint_id}/deliveries/{delivery_id}/redeliver", status_code=status.HTTP_202_ACCEPTED, response_model=RedeliveryAccepted,
    responses={
        404: {"description": "No such endpoint or delivery (or not yours)"},
        409: {"description": "The endpoint is disabled"},
        **UNAVAILABLE,
    },
    summary="Send a delivery's event once more (same webhook-id), with retries; its attempts appear in the deliveries",
)
async def redeliver(
    endpoint_id: EndpointId,
    delivery_id: Annotated[str, Path(min_length=1, max_length=36, description="A delivery's id (from the deliveries list)")],
    ctx: ContextDep,
) -> RedeliveryAccepted:
    delivery, workflow_id = await webhooks.redeliver(ctx, endpoint_id, delivery_id)
    return RedeliveryAccepted(delivery_id=delivery.id, event_id=delivery.event_id, workflow_id=workflow_id)
