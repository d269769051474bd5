"""/v1/settings/mail: a user's sender settings (how their emails leave; secrets write-only) and a test send."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import ContextDep
from api.schemas.settings import MailSettingsIn, MailSettingsOut, TestIn, TestOut
from api.services import settings as mail_settings

router = APIRouter(prefix="/v1/settings", tags=["settings"])
NOT_FOUND = {404: {"description": "No such user (or not yours)"}}
UserQuery = Annotated[str | None, Query(max_length=36, description="Admins: whose settings")]


@router.get("/mail", response_model=MailSettingsOut, responses=NOT_FOUND, summary="The caller's sender settings (secrets never shown)")
async def get_mail_settings(ctx: ContextDep, user_id: UserQuery = None) -> MailSettingsOut:
    user, row = await mail_settings.get_mail_settings(ctx, user_id)
    return MailSettingsOut.of(user.id, row)


@router.put("/mail", response_model=MailSettingsOut, responses=NOT_FOUND, summary="Replace the caller's sender settings")
async def put_mail_settings(body: MailSettingsIn, ctx: ContextDep, user_id: UserQuery = None) -> MailSettingsOut:
    user, row = await mail_settings.put_mail_settings(ctx, body, user_id)
    return MailSettingsOut.of(user.id, row)


@router.post(
    "/mail/test",
    response_model=TestOut,
    responses={**NOT_FOUND, 503: {"description": "Temporal unavailable; retry"}},
    summary="Send a test email now through these settings and report the answer",
)
async def test_mail_settings(ctx: ContextDep, body: TestIn | None = None, user_id: UserQuery = None) -> TestOut:
    return await mail_settings.send_test(ctx, body, user_id)
