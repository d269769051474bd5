"""/v1/stats: what the queue holds, what it did lately, and what looks stuck."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import ContextDep
from api.schemas.stats import StatsOut
from api.services import stats as queue_stats

router = APIRouter(prefix="/v1/stats", tags=["stats"])


@router.get("", response_model=StatsOut, summary="Counts by status, queue depth, recent throughput, stuck emails")
async def stats(
    ctx: ContextDep,
    stuck_after_seconds: Annotated[int, Query(ge=1, le=7 * 86400, description="Default: 5 minutes")] = queue_stats.STUCK_AFTER_SECONDS,
) -> StatsOut:
    return await queue_stats.stats(ctx, stuck_after_seconds)
