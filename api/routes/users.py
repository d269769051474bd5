"""/v1/users: users, their API keys and limits (admin only, but /me). A key is shown once, when it is issued."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from api.deps import AdminContextDep, ContextDep
from api.schemas.users import IssuedKeyOut, KeyIn, KeyOut, UserIn, UserOut, UserPatch
from api.services import users

router = APIRouter(prefix="/v1/users", tags=["users"])
NOT_FOUND = {404: {"description": "No such user (or key)"}}
UserId = Annotated[str, Path(max_length=36, pattern=r"^[0-9a-f-]{36}$")]
KeyId = UserId  # keys get their ids as users do (new_id)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=UserOut, responses={409: {"description": "The name is taken"}}, summary="Create a user")
async def create_user(body: UserIn, response: Response, ctx: AdminContextDep) -> UserOut:
    user = await users.create(ctx, body)
    response.headers["Location"] = f"/v1/users/{user.id}"
    [(user, keys)] = await users.with_keys(ctx, [user])
    return UserOut.of(user, keys, ctx.settings)


@router.get("", response_model=list[UserOut], summary="List users with their keys (never the keys themselves)")
async def list_users(ctx: AdminContextDep) -> list[UserOut]:
    return [UserOut.of(u, keys, ctx.settings) for u, keys in await users.with_keys(ctx, await users.list_users(ctx))]


@router.get("/me", response_model=UserOut, responses={404: {"description": "The bootstrap key is no user"}},
            summary="The caller's own user: their keys and the limits an admin set (read-only)")
async def get_me(ctx: ContextDep) -> UserOut:
    [(user, keys)] = await users.with_keys(ctx, [await users.me(ctx)])
    return UserOut.of(user, keys, ctx.settings)


@router.get("/{user_id}", response_model=UserOut, responses=NOT_FOUND, summary="A user with their keys")
async def get_user(user_id: UserId, ctx: AdminContextDep) -> UserOut:
    [(user, keys)] = await users.with_keys(ctx, [await users.user_or_404(ctx, user_id)])
    return UserOut.of(user, keys, ctx.settings)


@router.patch("/{user_id}", response_model=UserOut, responses={**NOT_FOUND, 409: {"description": "Yourself, or the last active admin"}},
              summary="Change a user's limits, or deactivate (reactivate) them: every key refused at once")
async def update_user(user_id: UserId, body: UserPatch, ctx: AdminContextDep) -> UserOut:
    [(user, keys)] = await users.with_keys(ctx, [await users.update(ctx, user_id, body)])
    return UserOut.of(user, keys, ctx.settings)


@router.post("/{user_id}/api-keys", status_code=status.HTTP_201_CREATED, response_model=IssuedKeyOut, responses=NOT_FOUND,
             summary="Issue an API key (shown once)")
async def create_key(user_id: UserId, ctx: AdminContextDep, body: KeyIn | None = None) -> IssuedKeyOut:
    issued = await users.issue(ctx, user_id, body.name if body else None)
    return IssuedKeyOut(**KeyOut.of(issued.row).model_dump(), key=issued.key)


@router.delete("/{user_id}/api-keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND,
               summary="Revoke an API key (at once: its next request gets 401)")
async def revoke_key(user_id: UserId, key_id: KeyId, ctx: AdminContextDep) -> Response:
    await users.revoke(ctx, user_id, key_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
