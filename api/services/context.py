"""What every service call works with: who is calling, and the parts of the running API."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client

from mailqueue.accounts import Principal
from mailqueue.blobs import BlobStore, SqlBlobs
from mailqueue.config import Settings
from mailqueue.crypto import SecretBox
from mailqueue.flags import Flags
from mailqueue.templating import TemplateEngine


@dataclass
class Context:
    principal: Principal
    session: AsyncSession  # one per request; services commit what they change
    settings: Settings
    temporal: Client
    templates: TemplateEngine
    secrets: SecretBox  # encrypts sender secrets (only workers decrypt)
    blobs: BlobStore = field(default_factory=SqlBlobs)
    flags: Flags | None = None  # feature flags, as this process sees them (None: every feature on)  # where attachment bytes go (the API's, from MAILQUEUE_BLOB_URL)
    replays: int = 0  # Idempotency-Key replays this request answered (commit_email counts them, for the metrics)
