"""/v1/flags: feature flags as this API process evaluates them, and setting one (admin only);
/v1/audit: every change to a flag, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from api.deps import AdminContextDep
from api.schemas.flags import AuditOut, AuditPage, FlagIn, FlagOut, SenderKey
from api.services import flags as flag_service
from mailqueue.flags import Flags

router = APIRouter(tags=["flags"])
NOT_FOUND = {404: {"description": "No such feature flag (the known ones: GET /v1/flags)"}}
FlagKey = Annotated[str, Path(min_length=1, max_length=100, description="The flag's key, e.g. sending.paused")]
Page = Annotated[int, Query(ge=1, le=100_000)]
PageSize = Annotated[int, Query(ge=1, le=100)]


def get_flags(request: Request) -> Flags:
    return request.app.state.flags


FlagsDep = Annotated[Flags, Depends(get_flags)]


def _out(flags: Flags, key: str, sender: str | None = None) -> FlagOut:
    spec, state, value = flag_service.current(flags, key, sender)
    return FlagOut.of(spec, state, value, flags.loaded_at, flags.stale)


@router.get("/v1/flags", response_model=list[FlagOut], summary="Every feature flag: its default, its state and its value in this API process")
async def list_flags(ctx: AdminContextDep, flags: FlagsDep) -> list[FlagOut]:
    return [FlagOut.of(spec, state, value, flags.loaded_at, flags.stale) for spec, state, value in flag_service.every(flags)]


@router.get(
    "/v1/flags/{key}", response_model=FlagOut, responses=NOT_FOUND,
    summary="One feature flag as this API process holds it (its cache, not the table), evaluated for a sender if asked",
)
async def get_flag(
    key: FlagKey, ctx: AdminContextDep, flags: FlagsDep,
    sender: Annotated[SenderKey | None, Query(description="Evaluate for this sender key (system: or user:<id>)")] = None,
) -> FlagOut:
    return _out(flags, key, sender)


@router.put(
    "/v1/flags/{key}", response_model=FlagOut,
    responses={**NOT_FOUND, 422: {"description": "No reason, a percentage outside 0-100, or not a sender key"}},
    summary="Set a feature flag (its whole state, with a reason): audited, here at once, in every process within seconds",
)
async def put_flag(key: FlagKey, body: FlagIn, ctx: AdminContextDep, flags: FlagsDep) -> FlagOut:
    await flag_service.put(ctx, flags, key, body)
    return _out(flags, key)


@router.get("/v1/flags/{key}/audit", response_model=AuditPage, responses=NOT_FOUND, summary="The flag's changes, newest first")
async def flag_audit(key: FlagKey, ctx: AdminContextDep, page: Page = 1, page_size: PageSize = 20) -> AuditPage:
    total, rows = await flag_service.audit(ctx, key, page, page_size)
    return AuditPage(items=[AuditOut.of(r) for r in rows], page=page, page_size=page_size, total=total)


@router.get("/v1/audit", response_model=AuditPage, summary="Every change to a feature flag (who, when, old and new, why), newest first")
async def audit_log(ctx: AdminContextDep, page: Page = 1, page_size: PageSize = 20) -> AuditPage:
    total, rows = await flag_service.audit(ctx, None, page, page_size)
    return AuditPage(items=[AuditOut.of(r) for r in rows], page=page, page_size=page_size, total=total)
