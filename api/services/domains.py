"""Sender domains: add one, prove it with a DNS TXT record (or an admin's word), list, remove.

A user sees and changes only their own; admins all (`user_id`). The rules: mailqueue/domains.py."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from api.schemas.domains import DomainIn
from api.services.context import Context
from api.services.errors import Conflict, NotFound, invalid
from mailqueue.accounts import new_id
from mailqueue.domains import (
    VERIFIED_BY_DNS,
    NotVerified,
    check_record,
    domain_row,
    new_token,
    normalize_domain,
    record_name,
    record_value,
    reserved_for_system,
)
from mailqueue.models import DomainStatus, SenderDomain, User, utcnow


async def _owner(ctx: Context, user_id: str | None, loc: tuple[str, ...]) -> User:
    """The user whose domains these are: the caller; an admin may name anyone. Someone else's: NotFound."""
    principal = ctx.principal
    if user_id is None:
        if not principal.is_user:
            raise invalid(loc, "the bootstrap key sends as the system (its domains are MAILQUEUE_SYSTEM_DOMAINS); name a user with user_id")
        user_id = principal.id
    user = await ctx.session.get(User, user_id) if (principal.is_admin or user_id == principal.id) else None
    if user is None:
        raise NotFound(f"no user with id {user_id!r}")
    return user


def _domain(value: str) -> str:
    try:
        return normalize_domain(value)
    except ValueError as exc:
        raise invalid(("path", "domain"), str(exc), value=value) from None


async def domain_or_404(ctx: Context, domain: str, user_id: str | None) -> SenderDomain:
    user = await _owner(ctx, user_id, ("query", "user_id"))
    name = _domain(domain)
    row = await domain_row(ctx.session, user.id, name)
    if row is None:
        raise NotFound(f"no domain {name!r} among the sender domains of user {user.id!r}")
    return row


async def add(ctx: Context, body: DomainIn) -> SenderDomain:
    """Add a domain, pending until its TXT record is seen. The system's domains are refused."""
    user = await _owner(ctx, body.user_id, ("body", "user_id"))
    if system := reserved_for_system(ctx.settings, body.domain):
        raise invalid(("body", "domain"), f"{body.domain} is reserved for the system ({system}): users cannot send from it", value=body.domain)
    row = SenderDomain(id=new_id(), user_id=user.id, domain=body.domain, token=new_token())
    ctx.session.add(row)
    try:
        await ctx.session.commit()
    except IntegrityError:
        await ctx.session.rollback()
        raise Conflict(f"{body.domain} is already one of this user's domains: GET /v1/domains/{body.domain}") from None
    await ctx.session.refresh(row)
    return row


async def list_domains(ctx: Context, user_id: str | None) -> list[SenderDomain]:
    """A user's own domains; an admin's: everyone's, or one user's with `user_id`."""
    query = select(SenderDomain)
    if user_id is not None or not ctx.principal.is_admin:
        user = await _owner(ctx, user_id, ("query", "user_id"))
        query = query.where(col(SenderDomain.user_id) == user.id)
    return list((await ctx.session.exec(query.order_by(col(SenderDomain.created_at), col(SenderDomain.id)))).all())


async def remove(ctx: Context, domain: str, user_id: str | None) -> None:
    """The user sends from it no more (mail already queued still goes)."""
    row = await domain_or_404(ctx, domain, user_id)
    await ctx.session.delete(row)
    await ctx.session.commit()


async def verify(ctx: Context, domain: str, user_id: str | None, force: bool) -> SenderDomain:
    """Look for the domain's TXT record (or, for an admin with `force`, take their word) and mark it verified.

    A verified domain stays verified: asking again changes nothing."""
    if force and not ctx.principal.is_admin:
        raise invalid(("body", "force"), "only an admin can mark a domain verified without its DNS record", value=force)
    row = await domain_or_404(ctx, domain, user_id)
    if row.status == DomainStatus.VERIFIED:
        return row
    if force:
        verified_by = f"admin:{ctx.principal.author}"
    else:
        await ctx.session.commit()  # no transaction held open while DNS answers
        try:
            await check_record(ctx.settings, row)
        except NotVerified as exc:
            raise invalid(
                ("path", "domain"), f"{row.domain} is not verified: {exc}", value=row.domain, type="not_verified",
                expected={"type": "TXT", "name": record_name(row.domain), "value": record_value(row.token)}, found=exc.found,
            ) from None
        verified_by = VERIFIED_BY_DNS
    row.status, row.verified_at, row.verified_by = DomainStatus.VERIFIED.value, utcnow(), verified_by
    ctx.session.add(row)
    await ctx.session.commit()
    await ctx.session.refresh(row)
    return row
