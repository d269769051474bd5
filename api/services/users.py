"""Users and their API keys (admins only; the routes check that). A key is shown once, when issued."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from api.schemas.users import UserIn
from api.services.context import Context
from api.services.errors import Conflict, NotFound
from mailqueue.accounts import IssuedKey, issue_key, new_id
from mailqueue.models import ApiKey, User, utcnow


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


async def create(ctx: Context, body: UserIn) -> User:
    user = User(id=new_id(), name=body.name, email=body.email, role=body.role)
    ctx.session.add(user)
    try:
        await ctx.session.commit()
    except IntegrityError:
        await ctx.session.rollback()
        raise Conflict(f"a user named {body.name!r} exists") from None
    return user


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
