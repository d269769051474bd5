"""Feature flags (admin only): read them as this process evaluates them, set one (with an audit row),
and the audit log. The flags, their defaults and their evaluation: mailqueue/flags.py.

Reads come from this process's cache (`Flags`), never the table: what an API process answers is
what it acts on. A change is written with its audit row in one transaction, this process's cache
is reloaded at once (the others follow within MAILQUEUE_FLAGS_REFRESH_SECONDS), and then the
`on_change` hooks run (the kill switch releases paused emails from one)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from api.schemas.flags import FlagIn
from api.services.context import Context
from api.services.errors import NotFound
from mailqueue.accounts import new_id
from mailqueue.flags import FLAGS, Evaluation, Flags, FlagSpec, FlagState, UnknownFlag, spec_of
from mailqueue.models import FeatureFlag, FlagAudit, utcnow

log = logging.getLogger("mailqueue.api.flags")

# Run after every successful PUT, in order, with the new state (as stored). A hook's error is logged,
# never raised: the change is made and answered whatever a hook does.
FlagHook = Callable[[Context, str, FlagState], Awaitable[None]]
on_change: list[FlagHook] = []


def known(key: str) -> FlagSpec:
    try:
        return spec_of(key)
    except UnknownFlag:
        raise NotFound(f"no feature flag {key!r}; known: {', '.join(sorted(FLAGS))}") from None


def current(flags: Flags, key: str, sender: str | None = None) -> tuple[FlagSpec, FlagState, Evaluation]:
    """(the flag, its state as this process holds it, its value for `sender` or as a whole)."""
    spec = known(key)
    return spec, flags.state(key), flags.evaluate(key, sender)


def every(flags: Flags) -> list[tuple[FlagSpec, FlagState, Evaluation]]:
    return [current(flags, key) for key in FLAGS]


async def put(ctx: Context, flags: Flags, key: str, body: FlagIn) -> FlagState:
    """Set the flag's whole state (percentage and senders: none unless given); the state as stored."""
    known(key)
    for attempt in (1, 2):
        try:
            state = await _write(ctx, key, body)
            break
        except IntegrityError:
            # Two first PUTs of the same flag at once: the other inserted its row first. Once more,
            # now as an update of that row (locked, so its state is the `old` of our audit row).
            await ctx.session.rollback()
            if attempt == 2:
                raise
    await flags.refresh()
    for hook in list(on_change):
        try:
            await hook(ctx, key, state)
        except Exception:  # a hook's failure is its own: logged with its traceback, the change stands
            log.exception("feature flag %s changed; an on_change hook (%s) failed", key, getattr(hook, "__qualname__", hook))
    return state


async def _write(ctx: Context, key: str, body: FlagIn) -> FlagState:
    session = ctx.session
    row = (await session.exec(select(FeatureFlag).where(col(FeatureFlag.key) == key).with_for_update())).first()
    old = FlagState.of(row) if row is not None else FlagState.default(key)
    now, actor = utcnow(), ctx.principal.author
    if row is None:
        row = FeatureFlag(key=key, enabled=body.enabled, updated_by=actor)
    row.enabled, row.percentage, row.senders = body.enabled, body.percentage, list(body.senders)
    row.updated_at, row.updated_by = now, actor
    session.add(row)
    new = FlagState.of(row)
    session.add(FlagAudit(id=new_id(), key=key, at=now, actor=actor, old=old.as_json(), new=new.as_json(), reason=body.reason))
    await session.commit()
    log.info("feature flag %s set by %s: %s -> %s (%s)", key, actor, old.as_json(), new.as_json(), body.reason)
    return new


async def audit(ctx: Context, key: str | None, page: int, page_size: int) -> tuple[int, Sequence[FlagAudit]]:
    """(how many, one page) of flag changes, newest first: of one flag, or of all."""
    filters = []
    if key is not None:
        known(key)
        filters.append(col(FlagAudit.key) == key)
    session = ctx.session
    total = (await session.exec(select(sa.func.count()).select_from(FlagAudit).where(*filters))).one()
    query = select(FlagAudit).where(*filters).order_by(col(FlagAudit.at).desc(), col(FlagAudit.id).desc())
    return total, (await session.exec(query.offset((page - 1) * page_size).limit(page_size))).all()
