"""Suppressions: list, add by hand and remove a sender's entries, and the one-click unsubscribe
that adds one for a recipient (no key: the signed token says whose list and which address).

A user manages their own list; admins any user's (`user_id`); the bootstrap key the system's.
The rules (matching, tokens): mailqueue/suppressions.py."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.schemas.suppressions import SuppressionIn
from api.services.context import Context
from api.services.errors import NotFound, invalid
from mailqueue import suppressions
from mailqueue.config import Settings
from mailqueue.contracts import SenderType
from mailqueue.models import Suppression, SuppressionReason, User
from mailqueue.senders import sender_key
from mailqueue.suppressions import BadToken, Unsubscribe, UnsubscribeTokens


async def _sender(ctx: Context, user_id: str | None) -> str:
    """Whose list: the caller's own (what their emails are sent as); an admin may name a user.
    Someone else's, for a user: NotFound, as if there were no such user."""
    principal = ctx.principal
    if user_id is None:
        return sender_key(*principal.sender)
    user = await ctx.session.get(User, user_id) if (principal.is_admin or user_id == principal.id) else None
    if user is None:
        raise NotFound(f"no user with id {user_id!r}")
    return sender_key(SenderType.USER, user.id)


def _key(address: str, loc: tuple[str, ...]) -> str:
    try:
        return suppressions.match_key(address)
    except ValueError as exc:
        raise invalid(loc, str(exc), value=address) from None


async def list_suppressions(
    ctx: Context, user_id: str | None, address: str | None, reason: SuppressionReason | None, page: int, page_size: int,
) -> tuple[int, Sequence[Suppression]]:
    """(how many match, one page of them), newest first."""
    filters = [col(Suppression.sender) == await _sender(ctx, user_id)]
    if address is not None:
        filters.append(col(Suppression.match_key) == _key(address, ("query", "address")))
    if reason is not None:
        filters.append(col(Suppression.reason) == reason.value)
    session = ctx.session
    total = (await session.exec(select(sa.func.count()).select_from(Suppression).where(*filters))).one()
    query = select(Suppression).where(*filters).order_by(col(Suppression.created_at).desc(), col(Suppression.id).desc())
    return total, (await session.exec(query.offset((page - 1) * page_size).limit(page_size))).all()


async def add(ctx: Context, body: SuppressionIn) -> tuple[Suppression, bool]:
    """(the entry, True if new). An address already on the list keeps its entry."""
    sender = await _sender(ctx, body.user_id)
    _key(body.address, ("body", "address"))
    return await suppressions.add(ctx.session, sender, body.address, body.reason, suppressions.SOURCE_API)


async def remove(ctx: Context, address: str, user_id: str | None) -> None:
    """The address may be mailed again (emails already ended `suppressed` stay so)."""
    sender = await _sender(ctx, user_id)
    row = await suppressions.find(ctx.session, sender, _key(address, ("path", "address")))
    if row is None:
        raise NotFound(f"{address!r} is not on this suppression list")
    await ctx.session.delete(row)
    await ctx.session.commit()


# --- one-click unsubscribe: no API key, the token is the credential ---------------------------


def unsubscribe_target(settings: Settings, token: str) -> Unsubscribe:
    """What a token names; NotFound for any token this server did not make."""
    try:
        return UnsubscribeTokens.from_settings(settings).read(token)
    except BadToken:
        raise NotFound("this unsubscribe link is not valid (mistyped, cut short, or too old)") from None


async def unsubscribe(session: AsyncSession, settings: Settings, token: str) -> Unsubscribe:
    """Add the token's recipient to its sender's list (reason unsubscribe). Idempotent: the second
    time finds the entry there and changes nothing."""
    target = unsubscribe_target(settings, token)
    try:
        await suppressions.add(
            session, target.sender, target.address, SuppressionReason.UNSUBSCRIBE, suppressions.SOURCE_UNSUBSCRIBE_LINK
        )
    except ValueError:  # a token this server made names an address it accepted: only a changed rule gets here
        raise NotFound("this unsubscribe link is not valid") from None
    return target
