"""Attachments: uploads, and the files of an email checked at the door and stored by reference.

Every check runs before anything is written, so a refused email leaves nothing behind. The
bytes of files given inline are written with the email's record (commit_email), in the same
transaction when they go to the SQL database.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from collections.abc import Sequence
from typing import IO

from pydantic import ValidationError

from api.schemas.emails import AttachmentIn
from api.services.context import Context
from api.services.errors import NotFound, TooLarge, field_error, invalid
from mailqueue.attachments import SNIFF_BYTES, AttachmentRefused, checked_type
from mailqueue.blobs import chunks_of, digest_of, inline_blob_id, new_upload_id
from mailqueue.contracts import AttachmentRef
from mailqueue.models import Blob, BlobStorage

_MB = 1024 * 1024


def _size(n: int) -> str:
    return f"{n / _MB:.1f} MB ({n} bytes)" if n >= _MB else f"{n} bytes"


@dataclass
class PreparedFiles:
    """An email's files as its workflow will name them, and the bytes still to store (given inline)."""

    refs: list[AttachmentRef] = field(default_factory=list)
    new: list[tuple[Blob, bytes]] = field(default_factory=list)


def _too_large(loc: tuple[str | int, ...], msg: str) -> TooLarge:
    return TooLarge([field_error(loc, msg, type="too_large")])


def _type_of(ctx: Context, loc: tuple[str | int, ...], item: AttachmentIn, declared: str | None, head: bytes) -> str:
    try:
        return checked_type(item.filename, declared, head, allowed=ctx.settings.attachment_allowed_types)
    except AttachmentRefused as exc:
        raise invalid(loc, str(exc), type="attachment_refused") from None


async def _upload_of(ctx: Context, loc: tuple[str | int, ...], upload_id: str) -> Blob:
    blob = await ctx.session.get(Blob, upload_id)
    if blob is None or blob.expires_at is None or (blob.owner_type, blob.owner_id) != ctx.principal.sender:
        raise invalid(loc, f"no upload {upload_id!r} of yours (POST /v1/uploads)", value=upload_id, type="unknown_upload")
    if blob.expires_at < datetime.now(UTC):
        raise invalid(loc, f"upload {upload_id!r} expired at {blob.expires_at.isoformat(timespec='seconds')}; upload the file again",
                      value=upload_id, type="upload_expired")
    return blob


async def prepare_files(ctx: Context, items: list[AttachmentIn], email_id: str) -> PreparedFiles:
    """The email's files checked (count, sizes, types) and named: 422 or 413 naming the file, nothing written."""
    settings = ctx.settings
    if len(items) > settings.attachments_max_count:
        raise invalid(("body", "attachments"), f"{len(items)} attachments; at most {settings.attachments_max_count} are allowed per email")
    out, total = PreparedFiles(), 0
    for i, item in enumerate(items):
        loc: tuple[str | int, ...] = ("body", "attachments", i)
        if item.upload_id is not None:
            blob = await _upload_of(ctx, (*loc, "upload_id"), item.upload_id)
            size, sha256 = blob.size, blob.sha256
            head = await ctx.blobs.head(ctx.session, blob.id, SNIFF_BYTES)
            data = None
        else:
            data = item.data
            assert data is not None
            size, sha256, head = len(data), hashlib.sha256(data).hexdigest(), data[:SNIFF_BYTES]
        if size > settings.attachment_max_bytes:
            raise _too_large(loc, f"attachment {item.filename!r} is {_size(size)}; at most {_size(settings.attachment_max_bytes)} per file")
        total += size
        if total > settings.attachments_max_total_bytes:
            raise _too_large(loc, f"with attachment {item.filename!r} the email's files come to {_size(total)}; "
                                  f"at most {_size(settings.attachments_max_total_bytes)} per email")
        content_type = _type_of(ctx, (*loc, "content_type"), item, item.content_type, head)
        if data is not None:
            blob_id = inline_blob_id(email_id, i, sha256)
            owner_type, owner_id = ctx.principal.sender
            out.new.append((Blob(id=blob_id, owner_type=owner_type, owner_id=owner_id, size=size, sha256=sha256,
                                 content_type=content_type, filename=item.filename, storage=ctx.blobs.storage.value), data))
        else:
            blob_id = blob.id
        out.refs.append(AttachmentRef(blob_id=blob_id, filename=item.filename, content_type=content_type, size=size, sha256=sha256,
                                      disposition=item.disposition, content_id=item.content_id))
    return out


async def store_new(ctx: Context, files: PreparedFiles) -> None:
    """Add the inline files' blobs to the session's transaction (the caller commits it with the email)."""
    if not files.new:
        return
    await _store(ctx, files.new)


async def _store(ctx: Context, blobs: Sequence[tuple[Blob, bytes | IO[bytes]]]) -> None:
    """The blobs' rows and bytes, in the session's transaction. S3: the bytes before the rows, so a row
    never names missing bytes; SQL: the rows first, as their chunks (and email_attachments) name them."""
    session = ctx.session
    if ctx.blobs.storage == BlobStorage.S3:
        for blob, data in blobs:
            await ctx.blobs.put(session, blob.id, data)
    session.add_all(blob for blob, _ in blobs)
    await session.flush()
    if ctx.blobs.storage == BlobStorage.SQL:
        for blob, data in blobs:
            await ctx.blobs.put(session, blob.id, data)


async def forget_new(ctx: Context, files: PreparedFiles) -> None:
    """The inline files of an email that was not accepted after all (its record removed): removed too."""
    ids = [blob.id for blob, _ in files.new]
    if not ids:
        return
    connection = await ctx.session.connection()
    await connection.execute(Blob.__table__.delete().where(Blob.__table__.c.id.in_(ids)))  # type: ignore[attr-defined]
    await ctx.session.commit()
    if ctx.blobs.storage == BlobStorage.S3:
        await ctx.blobs.delete(ctx.session, ids)


# --- uploads -------------------------------------------------------------------------------


async def upload(ctx: Context, filename: str, declared: str | None, file: IO[bytes]) -> Blob:
    """Store one uploaded file (read from its spooled file in pieces, never whole) for the caller's
    emails to attach by id until it expires: 413 or 422 naming the file, nothing stored."""
    settings = ctx.settings
    try:  # the name's rules, as for a file given with an email
        item = AttachmentIn.model_validate({"filename": filename, "upload_id": "00000000-0000-0000-0000-000000000000"})
    except ValidationError as exc:
        raise invalid(("body", "file"), exc.errors()[0]["msg"].removeprefix("Value error, "), value=filename) from None
    file.seek(0)
    digest = digest_of(chunks_of(file))
    if digest.size > settings.attachment_max_bytes:
        raise _too_large(("body", "file"), f"file {item.filename!r} is {_size(digest.size)}; at most {_size(settings.attachment_max_bytes)} per file")
    file.seek(0)
    content_type = _type_of(ctx, ("body", "file"), item, declared, file.read(SNIFF_BYTES))
    owner_type, owner_id = ctx.principal.sender
    now = datetime.now(UTC)
    blob = Blob(
        id=new_upload_id(), owner_type=owner_type, owner_id=owner_id, size=digest.size, sha256=digest.sha256,
        content_type=content_type, filename=item.filename, storage=ctx.blobs.storage.value, created_at=now,
        expires_at=now + timedelta(hours=settings.upload_ttl_hours),
    )
    file.seek(0)
    await _store(ctx, [(blob, file)])
    await ctx.session.commit()
    return blob


async def upload_or_404(ctx: Context, upload_id: str) -> Blob:
    blob = await ctx.session.get(Blob, upload_id)
    if blob is None or blob.expires_at is None or (blob.owner_type, blob.owner_id) != ctx.principal.sender:
        raise NotFound(f"no upload with id {upload_id!r}")
    return blob

