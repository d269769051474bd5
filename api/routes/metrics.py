"""/metrics: the API's Prometheus metrics, with the queue counted as /v1/stats counts it.

Served without a key, as Prometheus expects (like /healthz): it holds totals only, and no label
names a sender, an address or a key. An API facing the internet keeps /metrics for its own
network at the proxy.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import SessionDep, context_for
from api.metrics import ApiMetrics
from api.services import stats as queue_stats
from mailqueue.accounts import Principal

router = APIRouter()

@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, session: SessionDep) -> Response:
    everyone = context_for(request, Principal.bootstrap(), session)  # every sender's emails, as an admin sees them
    app_metrics: ApiMetrics = request.app.state.metrics
    queue = await app_metrics.queue(lambda: queue_stats.stats(everyone, queue_stats.STUCK_AFTER_SECONDS))
    return Response(app_metrics.exposition(queue), media_type=CONTENT_TYPE_LATEST)
