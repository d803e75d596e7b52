"""`GET /v1/metrics`: Prometheus' text format, or OpenMetrics when the scraper asks for it.

Scraping needs a key with `metrics:read` (Prometheus: `authorization: {credentials:
<key>}`), or none with `DIFY_MIRROR_METRICS_PUBLIC=true` on a cluster-internal port.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from dify_serving.gateway import metrics
from dify_serving.gateway.policy import needs
from dify_serving.security.grants import METRICS_READ

router = APIRouter(tags=["operations"])


@router.get(
    metrics.METRICS_PATH,
    summary="Prometheus metrics of this gateway (text, or OpenMetrics on Accept)",
    response_class=Response,
    openapi_extra=needs(METRICS_READ),
)
async def scrape(request: Request) -> Response:
    # off the loop: the task counts are a query of the task rows
    body, content_type = await asyncio.to_thread(metrics.exposition, request.headers.get("accept"))
    return Response(content=body, headers={"Content-Type": content_type})
