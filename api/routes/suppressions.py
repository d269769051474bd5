"""/v1/suppressions: the addresses a sender mails no more (bounced, complained, unsubscribed, or by hand)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from api.deps import ContextDep
from api.schemas.suppressions import SuppressionIn, SuppressionOut, SuppressionPage
from api.services import suppressions
from mailqueue.models import SuppressionReason

router = APIRouter(prefix="/v1/suppressions", tags=["suppressions"])
NOT_FOUND = {404: {"description": "No such address on the list (or no such user, or not yours)"}}
UserQuery = Annotated[str | None, Query(max_length=36, description="Admins: whose list (default: the caller's own)")]


@router.get("", response_model=SuppressionPage, responses=NOT_FOUND, summary="The caller's suppression list (admins: ?user_id=)")
async def list_suppressions(
    ctx: ContextDep,
    user_id: UserQuery = None,
    address: Annotated[str | None, Query(max_length=512, description="One address (its domain in any case)")] = None,
    reason: Annotated[SuppressionReason | None, Query(description="Only entries with this reason")] = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
) -> SuppressionPage:
    total, items = await suppressions.list_suppressions(ctx, user_id, address, reason, page, page_size)
    return SuppressionPage(items=[SuppressionOut.of(row) for row in items], page=page, page_size=page_size, total=total)


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=SuppressionOut,
    responses={**NOT_FOUND, 200: {"description": "Already on the list: the entry as it is (unchanged)"}},
    summary="Suppress an address by hand: mail to it is dropped from now on",
)
async def add_suppression(body: SuppressionIn, response: Response, ctx: ContextDep) -> SuppressionOut:
    row, created = await suppressions.add(ctx, body)
    if not created:
        response.status_code = status.HTTP_200_OK
    return SuppressionOut.of(row)


@router.delete("/{address}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND, summary="Mail an address again")
async def delete_suppression(
    address: Annotated[str, Path(min_length=1, max_length=512, description="The address, e.g. ann@example.com")],
    ctx: ContextDep,
    user_id: UserQuery = None,
) -> Response:
    await suppressions.remove(ctx, address, user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
