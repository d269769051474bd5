"""Connecting to Temporal, the same way from the API, the worker and the tools."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.service import GrpcCompression

from mailqueue.config import Settings


async def connect(settings: Settings, *, lazy: bool = False) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        lazy=lazy,
        # gzip costs CPU on both ends and saves nothing on a local network (about 5 % of
        # throughput in bench/bench.py); turn it on for a Temporal reached over a WAN.
        grpc_compression=GrpcCompression.GZIP if settings.temporal_grpc_gzip else GrpcCompression.NONE,
    )
