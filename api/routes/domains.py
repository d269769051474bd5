"""/v1/domains: the domains a user sends from, each proved with a DNS TXT record before use, and their DKIM keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from api.deps import ContextDep
from api.schemas.domains import DomainIn, DomainOut, VerifyIn
from api.services import domains

router = APIRouter(prefix="/v1/domains", tags=["domains"])
NOT_FOUND = {404: {"description": "No such domain among the user's (or not yours)"}}
DomainPath = Annotated[str, Path(min_length=1, max_length=253, description="The domain, e.g. example.org")]
UserQuery = Annotated[str | None, Query(max_length=36, description="Admins: whose domain (default: the caller's own)")]


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=DomainOut,
    responses={**NOT_FOUND, 409: {"description": "The user has this domain already"}},
    summary="Add a sender domain; publish the TXT record it answers, then verify",
)
async def add_domain(body: DomainIn, response: Response, ctx: ContextDep) -> DomainOut:
    added = await domains.add(ctx, body)
    response.headers["Location"] = f"/v1/domains/{added.row.domain}"
    return DomainOut.of(added.row, added.keys, ctx.settings)


@router.get("", response_model=list[DomainOut], responses=NOT_FOUND, summary="The caller's sender domains (admins: everyone's, or ?user_id=)")
async def list_domains(ctx: ContextDep, user_id: UserQuery = None) -> list[DomainOut]:
    return [DomainOut.of(d.row, d.keys, ctx.settings) for d in await domains.list_domains(ctx, user_id)]


@router.get("/{domain}", response_model=DomainOut, responses=NOT_FOUND, summary="A sender domain and the records to publish")
async def get_domain(domain: DomainPath, ctx: ContextDep, user_id: UserQuery = None) -> DomainOut:
    found = await domains.get(ctx, domain, user_id)
    return DomainOut.of(found.row, found.keys, ctx.settings)


@router.delete("/{domain}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND, summary="Remove a sender domain")
async def delete_domain(domain: DomainPath, ctx: ContextDep, user_id: UserQuery = None) -> Response:
    await domains.remove(ctx, domain, user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{domain}/verify", response_model=DomainOut,
    responses=NOT_FOUND,
    summary="Look for the domain's TXT record and mark it verified (admins: `force` without DNS); check its DKIM records",
    description=(
        "422 when the record is missing or wrong: its `expected` and `found` say what DNS should answer and what it does. "
        "Each active DKIM key's record is looked up too and reported in `dkim[].published`; a missing one does not stop "
        "the verification (asking again checks again)."
    ),
)
async def verify_domain(domain: DomainPath, ctx: ContextDep, body: VerifyIn | None = None, user_id: UserQuery = None) -> DomainOut:
    found = await domains.verify(ctx, domain, user_id, body.force if body else False)
    return DomainOut.of(found.row, found.keys, ctx.settings)


@router.post(
    "/{domain}/dkim/rotate", response_model=DomainOut,
    responses={**NOT_FOUND, 409: {"description": "Another rotation of the domain's keys happened at the same time"}},
    summary="New DKIM keys under a new selector sign from now on; the old ones are retired",
    description=(
        "Publish the new `dkim` records at once (mail is signed with the new keys from now on), and keep the retired "
        "ones published while mail they signed can still be checked: at least the retry window, a few days to be safe."
    ),
)
async def rotate_dkim(domain: DomainPath, ctx: ContextDep, user_id: UserQuery = None) -> DomainOut:
    rotated = await domains.rotate_dkim(ctx, domain, user_id)
    return DomainOut.of(rotated.row, rotated.keys, ctx.settings)
