"""Per-sender counters in fixed time windows (the `sender_usage` table): the sends the quota step
counts per hour and per day, and the recipients the API queues per hour.

A window is named by its kind and its index (`h<n>`, `d<n>`, `r<n>`: n = seconds since the epoch
// the window's length), so every process counting at the same moment counts in the same row.
Taking is one conditional UPDATE (`count + n <= limit`): PostgreSQL re-checks the condition on
the locked row, SQLite has one writer, so racing requests from any number of processes never
pass a limit together. The caller owns the transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from mailqueue.models import SenderUsage

_usage = SenderUsage.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Window:
    key: str  # the counter's name in sender_usage.window
    ends: float  # when it ends, in the clock's seconds

    @classmethod
    def at(cls, kind: str, now: float, seconds: int) -> Window:
        index = int(now // seconds)
        return cls(f"{kind}{index}", (index + 1) * seconds)


async def ensure_row(connection: AsyncConnection, sender: str, window: str) -> None:
    """Create the window's counter if it is not there (two at once: one insert wins, quietly)."""
    insert = pg_insert if connection.dialect.name == "postgresql" else sqlite_insert
    await connection.execute(insert(_usage).values(sender=sender, window=window, count=0).on_conflict_do_nothing())


async def take(connection: AsyncConnection, sender: str, window: str, n: int, limit: int) -> bool:
    """Count `n` more in the window if the count stays within `limit`; False (nothing counted) if not."""
    await ensure_row(connection, sender, window)
    taken = await connection.execute(
        sa.update(_usage)
        .where(_usage.c.sender == sender, _usage.c.window == window, _usage.c.count + n <= limit)
        .values(count=_usage.c.count + n)
    )
    return taken.rowcount == 1


async def give_back(connection: AsyncConnection, sender: str, window: str, n: int) -> None:
    """Uncount `n` taken earlier (what was counted was not used after all)."""
    await connection.execute(
        sa.update(_usage)
        .where(_usage.c.sender == sender, _usage.c.window == window)
        .values(count=sa.func.max(_usage.c.count - n, 0) if connection.dialect.name == "sqlite" else sa.func.greatest(_usage.c.count - n, 0))
    )


async def used(connection: AsyncConnection, sender: str, window: str) -> int:
    """How many the window has counted so far."""
    count = (await connection.execute(sa.select(_usage.c.count).where(_usage.c.sender == sender, _usage.c.window == window))).scalar()
    return int(count or 0)
