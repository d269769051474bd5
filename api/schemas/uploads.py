"""Bodies of /v1/uploads: a stored file that emails attach by id."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from mailqueue.models import Blob


class UploadOut(BaseModel):
    upload_id: str = Field(description="Give it as an attachment's `upload_id` (POST /v1/emails)")
    filename: str = Field(description="As it will be sent: without path parts or control characters")
    content_type: str = Field(description="As declared and checked against the content, or as sniffed")
    size: int
    sha256: str = Field(description="Of the bytes, hex")
    created_at: datetime
    expires_at: datetime = Field(description="Emails may attach it until then (MAILQUEUE_UPLOAD_TTL_HOURS); it stays while an email sends it")

    @classmethod
    def of(cls, blob: Blob) -> UploadOut:
        assert blob.expires_at is not None
        return cls(upload_id=blob.id, filename=blob.filename, content_type=blob.content_type, size=blob.size, sha256=blob.sha256,
                   created_at=blob.created_at, expires_at=blob.expires_at)
