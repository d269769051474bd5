"""Releasing paused emails: when a flag that pauses sending changes, every paused email's workflow
is told to look again at once (the `resume` signal), instead of at its next scheduled look.

Paused emails are found in the records (status `paused`), which every deployment has, rather than
by the `EmailStatus` search attribute, which may be turned off. A workflow that the signal misses
(an API process that stopped halfway) still looks again within PAUSE_MAX_LOOK (5 minutes)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlmodel import col, select
from temporalio.service import RPCError

from api.services.context import Context
from mailqueue.contracts import RESUME_SIGNAL, EmailStatus
from mailqueue.models import Email

log = logging.getLogger("mailqueue.api.pause")

# The flags whose change can release paused emails (turning them the other way pauses more: nothing to do).
PAUSING = ("sending.paused", "user_smtp.enabled")
SIGNALS_AT_ONCE = 50


def releases(key: str) -> bool:
    return key in PAUSING or (key.startswith("driver.") and key.endswith(".enabled"))


async def release_paused(ctx: Context, key: str, state: Any = None) -> int:
    """Signal every paused email's workflow to look again; returns how many were told. The emails
    still paused by another flag simply go on waiting."""
    if not releases(key):
        return 0
    ids = (await ctx.session.exec(select(Email.workflow_id).where(col(Email.status) == EmailStatus.PAUSED.value))).all()
    await ctx.session.commit()
    gate = asyncio.Semaphore(SIGNALS_AT_ONCE)

    async def tell(workflow_id: str) -> bool:
        async with gate:
            try:
                await ctx.temporal.get_workflow_handle(workflow_id).signal(RESUME_SIGNAL)
                return True
            except RPCError as exc:  # closed meanwhile (cancelled, sent): nothing to release
                log.info("resume %s: %s", workflow_id, exc.message)
                return False

    told = sum(await asyncio.gather(*(tell(w) for w in ids)))
    log.info("flag %s changed: %s paused emails told to look again", key, told)
    return told
