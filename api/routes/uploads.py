"""/v1/uploads: a file stored once, then attached by id to any number of the caller's emails."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Path, UploadFile, status

from api.deps import ContextDep
from api.schemas.emails import UPLOAD_ID_PATTERN
from api.schemas.uploads import UploadOut
from api.services import attachments

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=UploadOut,
    responses={413: {"description": "The file is over MAILQUEUE_ATTACHMENT_MAX_BYTES"},
               422: {"description": "No file, a name with nothing usable left, a type its content contradicts, or a refused type"}},
    summary="Upload a file (multipart/form-data, field `file`); attach it to emails by its upload_id",
)
async def create_upload(
    ctx: ContextDep,
    file: Annotated[UploadFile, File(description="The file; its part's Content-Type is checked against the content")],
) -> UploadOut:
    # The form is parsed into a spooled temporary file (on disk past 1 MB): never held whole in memory.
    declared = file.content_type if file.headers.get("content-type") else None
    return UploadOut.of(await attachments.upload(ctx, file.filename or "", declared, file.file))


@router.get("/{upload_id}", response_model=UploadOut, responses={404: {"description": "No such upload of yours"}},
            summary="An upload's name, type, size, hash and expiry")
async def get_upload(ctx: ContextDep, upload_id: Annotated[str, Path(pattern=UPLOAD_ID_PATTERN)]) -> UploadOut:
    return UploadOut.of(await attachments.upload_or_404(ctx, upload_id))
