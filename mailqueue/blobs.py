"""Where attachment bytes live: outside Temporal, so that workflow inputs and histories carry only
a blob's id, size and hash (AttachmentRef).

Two stores, chosen by MAILQUEUE_BLOB_URL:
- the SQL database (the default): a blob's bytes in `blob_chunks`, in pieces of CHUNK_BYTES,
  written in the same transaction as the email that sends them, so an email is never recorded
  without its files, nor files kept for an email that was not;
- an S3-compatible bucket (`s3://bucket[/prefix]`): one object per blob, written before the
  transaction that records it. An object whose transaction then fails is left over (named by an
  id no row holds); nothing ever reads it.

Either way the `blobs` row says what the bytes are, and `email_attachments` says which emails
send a blob: a blob goes only once no email names it (`purge_blobs`, for retention), never while
an email that is not final could still send it.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, Protocol

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mailqueue.config import Settings
from mailqueue.contracts import AttachmentRef
from mailqueue.models import Blob, BlobChunk, BlobStorage, EmailAttachment

CHUNK_BYTES = 1024 * 1024
_INLINE_BLOBS = uuid.UUID("6f0b7c1e-2d1a-4f43-9a51-3c8e0d6b1a27")


class BlobMissing(Exception):
    """The bytes of an attachment are gone, or are not what the email was accepted with."""


def inline_blob_id(email_id: str, position: int, sha256: str) -> str:
    """The id of a file given inline with an email: the same for the same request (an Idempotency-Key
    replay names the blob the first request stored), another for other bytes (a conflicting
    request never overwrites the first one's object)."""
    return str(uuid.uuid5(_INLINE_BLOBS, f"{email_id}/{position}/{sha256}"))


def new_upload_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class Digest:
    size: int
    sha256: str


def digest_of(chunks: Iterator[bytes]) -> Digest:
    h, size = hashlib.sha256(), 0
    for chunk in chunks:
        h.update(chunk)
        size += len(chunk)
    return Digest(size, h.hexdigest())


def chunks_of(file: IO[bytes], size: int = CHUNK_BYTES) -> Iterator[bytes]:
    while chunk := file.read(size):
        yield chunk


class BlobStore(Protocol):
    storage: BlobStorage

    async def put(self, session: AsyncSession, blob_id: str, data: bytes | IO[bytes]) -> None:
        """Store the bytes (a file is read from where it stands). SQL: in the session's transaction."""

    async def get(self, session: AsyncSession, blob_id: str) -> bytes | None:
        """The bytes, or None if there are none."""

    async def head(self, session: AsyncSession, blob_id: str, n: int) -> bytes:
        """The first `n` bytes (fewer for a shorter blob; none for a missing one): to sniff its type."""

    async def delete(self, session: AsyncSession, blob_ids: Sequence[str]) -> None:
        """Remove the bytes (the rows are the caller's)."""


class SqlBlobs:
    """Bytes in blob_chunks: nothing more to run, backed up with the records."""

    storage = BlobStorage.SQL

    async def put(self, session: AsyncSession, blob_id: str, data: bytes | IO[bytes]) -> None:
        pieces = (data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)) if isinstance(data, bytes) else chunks_of(data)
        connection = await session.connection()
        table = BlobChunk.__table__  # type: ignore[attr-defined]
        for seq, piece in enumerate(pieces):  # one piece in memory at a time (an upload is read from its file)
            await connection.execute(sa.insert(table), {"blob_id": blob_id, "seq": seq, "data": piece})

    async def get(self, session: AsyncSession, blob_id: str) -> bytes | None:
        rows = (await session.exec(select(BlobChunk.data).where(col(BlobChunk.blob_id) == blob_id).order_by(col(BlobChunk.seq)))).all()
        return b"".join(rows) if rows else None

    async def head(self, session: AsyncSession, blob_id: str, n: int) -> bytes:
        assert n <= CHUNK_BYTES
        query = select(sa.func.substr(col(BlobChunk.data), 1, n)).where(col(BlobChunk.blob_id) == blob_id, col(BlobChunk.seq) == 0)
        return bytes((await session.exec(query)).first() or b"")

    async def delete(self, session: AsyncSession, blob_ids: Sequence[str]) -> None:
        pass  # the chunks go with their blobs rows (ON DELETE CASCADE)


class S3Blobs:
    """Bytes as objects in an S3-compatible bucket (boto3 in a thread: its client is blocking)."""

    storage = BlobStorage.S3

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket, self.prefix, self._client = bucket, prefix, client

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Blobs:
        import boto3  # only when S3 is configured
        from botocore.config import Config

        assert settings.blob_url is not None
        bucket, _, prefix = settings.blob_url.removeprefix("s3://").partition("/")
        client = boto3.session.Session().client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
            config=Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=60),
        )
        return cls(bucket, prefix.strip("/"), client)

    def key(self, blob_id: str) -> str:
        return f"{self.prefix}/{blob_id}" if self.prefix else blob_id

    async def put(self, session: AsyncSession, blob_id: str, data: bytes | IO[bytes]) -> None:
        if isinstance(data, bytes):
            await asyncio.to_thread(self._client.put_object, Bucket=self.bucket, Key=self.key(blob_id), Body=data)
        else:  # streamed from the file, in parts for large ones
            await asyncio.to_thread(self._client.upload_fileobj, data, self.bucket, self.key(blob_id))

    async def get(self, session: AsyncSession, blob_id: str) -> bytes | None:
        def read() -> bytes | None:
            try:
                return self._client.get_object(Bucket=self.bucket, Key=self.key(blob_id))["Body"].read()
            except self._client.exceptions.NoSuchKey:
                return None

        return await asyncio.to_thread(read)

    async def head(self, session: AsyncSession, blob_id: str, n: int) -> bytes:
        def read() -> bytes:
            try:
                return self._client.get_object(Bucket=self.bucket, Key=self.key(blob_id), Range=f"bytes=0-{n - 1}")["Body"].read()
            except self._client.exceptions.NoSuchKey:
                return b""

        return await asyncio.to_thread(read)

    async def delete(self, session: AsyncSession, blob_ids: Sequence[str]) -> None:
        for i in range(0, len(blob_ids), 1000):  # S3's most per request
            objects = [{"Key": self.key(b)} for b in blob_ids[i : i + 1000]]
            await asyncio.to_thread(self._client.delete_objects, Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})


def blob_store(settings: Settings) -> BlobStore:
    return S3Blobs.from_settings(settings) if settings.blob_url else SqlBlobs()


async def read_attachment(session: AsyncSession, store: BlobStore, ref: AttachmentRef) -> bytes:
    """An attachment's bytes, exactly as accepted: BlobMissing if they are gone or differ."""
    data = await store.get(session, ref.blob_id)
    if data is None:
        raise BlobMissing(f"attachment {ref.filename!r} ({ref.blob_id}) is no longer stored")
    if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise BlobMissing(f"attachment {ref.filename!r} ({ref.blob_id}) is not the file that was accepted (size or SHA-256 differs)")
    return data


def attachment_rows(email_id: str, attachments: Sequence[dict[str, Any]] | None) -> list[EmailAttachment]:
    return [EmailAttachment(email_id=email_id, position=i, blob_id=a["blob_id"]) for i, a in enumerate(attachments or ())]


async def purge_blobs(session: AsyncSession, store: BlobStore, now: datetime, limit: int = 500) -> int:
    """Delete up to `limit` blobs no email names any more and that may not be attached anew (uploads
    past their time; files given inline, once their emails are gone). Retention removes final
    emails first; an email that is not final keeps its blobs. Returns how many went."""
    unused = ~sa.exists().where(col(EmailAttachment.blob_id) == col(Blob.id))
    expired = sa.or_(col(Blob.expires_at).is_(None), col(Blob.expires_at) < now)
    rows = (await session.exec(select(Blob.id, Blob.storage).where(unused, expired).limit(limit))).all()
    if not rows:
        return 0
    ids = [r[0] for r in rows]
    # The rows first: a blob an email names meanwhile makes this fail (its foreign key) and stay whole.
    # Counted by what this delete removed: a purge running at the same time may have taken some.
    table = Blob.__table__  # type: ignore[attr-defined]
    deleted = await (await session.connection()).execute(sa.delete(table).where(table.c.id.in_(ids), unused, expired))
    await session.commit()
    elsewhere = [blob_id for blob_id, storage in rows if storage == BlobStorage.S3.value]
    if elsewhere and store.storage == BlobStorage.S3:
        await store.delete(session, elsewhere)
    return deleted.rowcount  # type: ignore[attr-defined]
