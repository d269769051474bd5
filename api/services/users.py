"""Users, their API keys and limits (admins only, but a user's own record; the routes check that).
A key is shown once, when issued."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from api.schemas.users import LimitsIn, UserIn, UserPatch
from api.services.context import Context
from api.services.errors import Conflict, NotFound
from mailqueue.accounts import IssuedKey, issue_key, new_id
from mailqueue.models import ApiKey, Role, User, utcnow

LIMITS = tuple(LimitsIn.model_fields)


async def with_keys(ctx: Context, users: list[User]) -> list[tuple[User, list[ApiKey]]]:
    """The users with their keys (oldest first), in one query for all the keys."""
    keys = (
        await ctx.session.exec(
            select(ApiKey).where(col(ApiKey.user_id).in_([u.id for u in users])).order_by(col(ApiKey.created_at))
        )
    ).all()
    return [(u, [k for k in keys if k.user_id == u.id]) for u in users]


async def user_or_404(ctx: Context, user_id: str) -> User:
    user = await ctx.session.get(User, user_id)
    if user is None:
        raise NotFound(f"no user with id {user_id!r}")
    return user


async def me(ctx: Context) -> User:
    """The caller's own user (their limits shown read-only); the bootstrap key is nobody's."""
    if not ctx.principal.is_user or ctx.principal.id is None:
        raise NotFound("the bootstrap key belongs to no user: it is the system's admin key")
    return await user_or_404(ctx, ctx.principal.id)


async def create(ctx: Context, body: UserIn) -> User:
    user = User(id=new_id(), name=body.name, email=body.email, role=body.role, **body.model_dump(include=set(LIMITS)))
    ctx.session.add(user)
    try:
        await ctx.session.commit()
    except IntegrityError:
        await ctx.session.rollback()
        raise Conflict(f"a user named {body.name!r} exists") from None
    return user


async def update(ctx: Context, user_id: str, body: UserPatch) -> User:
    """Change a user's limits or deactivate (reactivate) them: a deactivated user's every key is
    refused from the next request on. Nobody can deactivate themselves, nor the last active admin:
    someone must always be able to undo it (the bootstrap key may be unset)."""
    given = body.model_fields_set
    user = await user_or_404(ctx, user_id)
    if "is_active" in given and body.is_active is False and user.is_active:
        await _may_deactivate(ctx, user)
    for name in given:
        setattr(user, name, getattr(body, name))
    ctx.session.add(user)
    await ctx.session.commit()
    await ctx.session.refresh(user)
    return user


async def _may_deactivate(ctx: Context, user: User) -> None:
    if ctx.principal.is_user and ctx.principal.id == user.id:
        raise Conflict("you cannot deactivate yourself; another admin can")
    if user.role != Role.ADMIN.value:
        return
    # The active admins, locked until this transaction ends (SQLite: its one writer), so that two
    # admins deactivating each other at once cannot both pass this check.
    admins = (
        await ctx.session.exec(
            select(User.id).where(col(User.role) == Role.ADMIN.value, col(User.is_active)).with_for_update()
        )
    ).all()
    if not set(admins) - {user.id}:
        raise Conflict("this is the last active admin: create another admin (POST /v1/users with role admin) or reactivate one first")


async def list_users(ctx: Context) -> list[User]:
    return list((await ctx.session.exec(select(User).order_by(col(User.created_at)))).all())


async def issue(ctx: Context, user_id: str, name: str | None) -> IssuedKey:
    return await issue_key(ctx.session, await user_or_404(ctx, user_id), name)


async def revoke(ctx: Context, user_id: str, key_id: str) -> None:
    """Revoke a key at once: its next request is refused. Revoking a revoked key changes nothing."""
    key = await ctx.session.get(ApiKey, key_id)
    if key is None or key.user_id != user_id:
        raise NotFound(f"user {user_id!r} has no key {key_id!r}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        ctx.session.add(key)
        await ctx.session.commit()
