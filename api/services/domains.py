"""Sender domains: add one, prove it with a DNS TXT record (or an admin's word), list, remove; their DKIM keys.

A user sees and changes only their own; admins all (`user_id`). The rules: mailqueue/domains.py and
mailqueue/dkim_keys.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from api.schemas.domains import DomainIn
from api.services.context import Context
from api.services.errors import Conflict, NotFound, invalid
from mailqueue.accounts import new_id
from mailqueue.dkim_keys import check_published, keys_of, new_keys, next_generation, retire
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
from mailqueue.models import DkimKey, DomainStatus, SenderDomain, User, utcnow


@dataclass
class Domain:
    """A sender domain and its DKIM keys, newest first (the active pair, then the retired ones)."""

    row: SenderDomain
    keys: list[DkimKey]

    @property
    def active(self) -> list[DkimKey]:
        return [k for k in self.keys if k.retired_at is None]


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


async def get(ctx: Context, domain: str, user_id: str | None) -> Domain:
    row = await domain_or_404(ctx, domain, user_id)
    return Domain(row, (await keys_of(ctx.session, [row.id]))[row.id])


async def add(ctx: Context, body: DomainIn) -> Domain:
    """Add a domain, pending until its TXT record is seen, with its first DKIM key pair. The system's domains are refused."""
    user = await _owner(ctx, body.user_id, ("body", "user_id"))
    if system := reserved_for_system(ctx.settings, body.domain):
        raise invalid(("body", "domain"), f"{body.domain} is reserved for the system ({system}): users cannot send from it", value=body.domain)
    row = SenderDomain(id=new_id(), user_id=user.id, domain=body.domain, token=new_token())
    # RSA key generation is CPU work: off the event loop.
    keys = await asyncio.to_thread(new_keys, ctx.secrets, row.id, next_generation([], utcnow().date()))
    ctx.session.add(row)
    try:
        await ctx.session.flush()  # the domain's row before its keys' (they refer to it)
        ctx.session.add_all(keys)
        await ctx.session.commit()
    except IntegrityError:
        await ctx.session.rollback()
        raise Conflict(f"{body.domain} is already one of this user's domains: GET /v1/domains/{body.domain}") from None
    await ctx.session.refresh(row)
    return Domain(row, keys)


async def list_domains(ctx: Context, user_id: str | None) -> list[Domain]:
    """A user's own domains; an admin's: everyone's, or one user's with `user_id`."""
    query = select(SenderDomain)
    if user_id is not None or not ctx.principal.is_admin:
        user = await _owner(ctx, user_id, ("query", "user_id"))
        query = query.where(col(SenderDomain.user_id) == user.id)
    rows = list((await ctx.session.exec(query.order_by(col(SenderDomain.created_at), col(SenderDomain.id)))).all())
    keys = await keys_of(ctx.session, [r.id for r in rows])
    return [Domain(r, keys[r.id]) for r in rows]


async def rotate_dkim(ctx: Context, domain: str, user_id: str | None) -> Domain:
    """A new DKIM key pair under a new selector signs from now on; the active pair is retired, and
    stays listed: its records must stay published while mail signed with it can still be checked."""
    row = await domain_or_404(ctx, domain, user_id)
    # One rotation of a domain at a time (a row lock on PostgreSQL; SQLite writes one at a time).
    await ctx.session.exec(select(SenderDomain).where(col(SenderDomain.id) == row.id).with_for_update())
    existing = (await keys_of(ctx.session, [row.id]))[row.id]
    generation = next_generation([k.selector for k in existing], utcnow().date())
    fresh = await asyncio.to_thread(new_keys, ctx.secrets, row.id, generation)
    retire(existing, utcnow())
    ctx.session.add_all([*existing, *fresh])
    try:
        await ctx.session.commit()
    except IntegrityError:  # a rotation elsewhere took this selector first
        await ctx.session.rollback()
        raise Conflict(
            f"the DKIM keys of {row.domain} were rotated at the same time by another request: GET /v1/domains/{row.domain}"
        ) from None
    return Domain(row, [*fresh, *existing])


async def remove(ctx: Context, domain: str, user_id: str | None) -> None:
    """The user sends from it no more (mail already queued still goes)."""
    row = await domain_or_404(ctx, domain, user_id)
    await ctx.session.delete(row)
    await ctx.session.commit()


async def verify(ctx: Context, domain: str, user_id: str | None, force: bool) -> Domain:
    """Look for the domain's TXT record (or, for an admin with `force`, take their word) and mark it
    verified; and look up each active DKIM key's record, noting whether it is published.

    A verified domain stays verified: asking again only checks the DKIM records again. A DKIM record
    not (yet) published is reported (`published: false`), not refused: the domain still verifies,
    and its mail is signed; receivers fail such a signature until the record is there. `force`
    looks at no DNS at all."""
    if force and not ctx.principal.is_admin:
        raise invalid(("body", "force"), "only an admin can mark a domain verified without its DNS record", value=force)
    found = await get(ctx, domain, user_id)
    row = found.row
    if force:
        if row.status != DomainStatus.VERIFIED:
            row.status, row.verified_at, row.verified_by = DomainStatus.VERIFIED.value, utcnow(), f"admin:{ctx.principal.author}"
            ctx.session.add(row)
            await ctx.session.commit()
            await ctx.session.refresh(row)
        return found
    await ctx.session.commit()  # no transaction held open while DNS answers
    if row.status != DomainStatus.VERIFIED:
        try:
            await check_record(ctx.settings, row)
        except NotVerified as exc:
            raise invalid(
                ("path", "domain"), f"{row.domain} is not verified: {exc}", value=row.domain, type="not_verified",
                expected={"type": "TXT", "name": record_name(row.domain), "value": record_value(row.token)}, found=exc.found,
            ) from None
        row.status, row.verified_at, row.verified_by = DomainStatus.VERIFIED.value, utcnow(), VERIFIED_BY_DNS
    await check_published(ctx.settings, row.domain, found.active)
    ctx.session.add_all([row, *found.active])
    await ctx.session.commit()
    await ctx.session.refresh(row)
    return found
