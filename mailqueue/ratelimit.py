"""Request rate limits per API key, shared by every API process: a counter per key and minute,
in Redis when MAILQUEUE_REDIS_URL is set, else in the database (table rate_limit_counters).

Design, for reviewers:
- Fixed windows of one minute. One atomic increment per request answers "how many so far"
  in one round trip (INSERT ... ON CONFLICT DO UPDATE ... RETURNING, or MULTI INCR EXPIRE
  EXEC); a sliding log would store every request, and a sliding counter reads two windows.
  The price is a burst of up to twice the limit across a minute's edge, which a door that
  stops floods can afford.
- In PostgreSQL the table is UNLOGGED (migration 0006): a write per request without a WAL
  flush per request; a crash empties it, which costs at most a minute's counts.
- A counter is named by a hash of the key, never the key; the bootstrap key's is named
  "bootstrap" (it is the only one, and a weak one's hash could be guessed offline).
- The API processes' clocks name the window: processes on machines a few seconds apart
  split a window's count only around its edge.
- A counter store that cannot be reached lets requests through, with a warning (at most
  one a minute per process): the limit guards against floods, while refusing every request
  would stop all mail because of an auxiliary store. The database being down already
  answers 503 where a request needs it (the key lookup, every route's own work).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from mailqueue.accounts import Principal, PrincipalKind
from mailqueue.config import Settings
from mailqueue.db import STORE_ERRORS, async_url
from mailqueue.models import RateLimitCounter

log = logging.getLogger("mailqueue.ratelimit")

WINDOW_SECONDS = 60
BOOTSTRAP_SUBJECT = "bootstrap"


def rate_subject(principal: Principal, key: str) -> str:
    """What a key's counter is named by."""
    if principal.kind is PrincipalKind.BOOTSTRAP:
        return BOOTSTRAP_SUBJECT
    # Separate from api_keys.key_hash, so a counter cannot be matched to its key's row.
    return hashlib.sha256(b"mailqueue rate limit\x00" + key.encode()).hexdigest()


@dataclass(frozen=True)
class Allowance:
    """Where a key stands in the current window, this request counted."""

    limit: int
    count: int
    reset_after: int  # whole seconds until the window ends: the Retry-After of a refusal

    @property
    def allowed(self) -> bool:
        return self.count <= self.limit

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.count)


class Counter(Protocol):
    errors: tuple[type[BaseException], ...]  # what the store raises when it cannot answer

    async def incr(self, subject: str, window: int) -> int:
        """Count one request of `subject` in `window`; the count so far, this one included."""
        ...

    async def aclose(self) -> None: ...


class DatabaseCounter:
    """Counters in rate_limit_counters: one upsert per request, old windows deleted once a
    minute per process."""

    errors = STORE_ERRORS

    def __init__(self, engine: AsyncEngine, *, owned: bool) -> None:
        self._engine, self._owned = engine, owned
        table = RateLimitCounter.__table__  # type: ignore[attr-defined]
        insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        self._upsert = (
            insert(table)
            .values(minute=sa.bindparam("minute"), subject=sa.bindparam("subject"), count=1)
            .on_conflict_do_update(index_elements=["minute", "subject"], set_={"count": table.c["count"] + 1})
            .returning(table.c["count"])
        )
        self._expire = sa.delete(table).where(table.c["minute"] < sa.bindparam("minute"))
        self._swept: int | None = None

    @classmethod
    def for_url(cls, url: str, shared: AsyncEngine) -> DatabaseCounter:
        if shared.dialect.name != "postgresql":
            # SQLite: the process's one connection (a second would only wait for the writer lock).
            return cls(shared, owned=False)
        # PostgreSQL: a small pool of its own in autocommit, without the pre-ping the shared pool
        # does on every checkout: the upsert is the only round trip. A connection that died is
        # dropped by the error it raises, and the next request gets a new one.
        engine = create_async_engine(
            async_url(url), isolation_level="AUTOCOMMIT", pool_size=5, max_overflow=5, pool_recycle=1800,
            connect_args={"connect_timeout": 10},
        )
        return cls(engine, owned=True)

    async def incr(self, subject: str, window: int) -> int:
        async with self._engine.begin() as conn:
            count = (await conn.execute(self._upsert, {"minute": window, "subject": subject})).scalar_one()
            if self._swept != window:
                self._swept = window  # first request of this minute in this process: windows before it are over
                await conn.execute(self._expire, {"minute": window})
        return int(count)

    async def aclose(self) -> None:
        if self._owned:
            await self._engine.dispose()


class RedisCounter:
    """Counters in Redis: INCR and EXPIRE in one MULTI/EXEC, so every key expires on its own."""

    def __init__(self, url: str) -> None:
        import redis.asyncio
        import redis.exceptions

        self.errors = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)
        # Requests beyond the pool's connections wait for one (each is held for one round trip).
        # Short timeouts: a Redis that hangs must not hold every request for long (see fail-open above).
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=50, timeout=5, socket_timeout=1, socket_connect_timeout=1,
        )
        self._redis = redis.asyncio.Redis(connection_pool=pool)

    async def incr(self, subject: str, window: int) -> int:
        key = f"mailqueue:rate:{window}:{subject}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 2 * WINDOW_SECONDS)
            count, _ = await pipe.execute()
        return int(count)

    async def aclose(self) -> None:
        await self._redis.aclose(close_connection_pool=True)


class RateLimiter:
    """Counts each request of a key and says whether it is within `limit` a minute (0: no limit)."""

    def __init__(self, limit: int, counter: Counter | None, clock: Callable[[], float] = time.time) -> None:
        self.limit, self._counter, self._clock = limit, counter, clock
        self._warned: int | None = None

    @classmethod
    def for_settings(cls, settings: Settings, engine: AsyncEngine) -> RateLimiter:
        """Redis when settings.redis_url is set, else the database `engine` belongs to."""
        if not settings.rate_limit_per_minute:
            return cls(0, None)
        counter: Counter = (
            RedisCounter(settings.redis_url) if settings.redis_url else DatabaseCounter.for_url(settings.database_url, engine)
        )
        return cls(settings.rate_limit_per_minute, counter)

    async def hit(self, subject: str) -> Allowance | None:
        """This request counted; None when there is no limit, or the store cannot answer."""
        if not self.limit or self._counter is None:
            return None
        now = self._clock()
        window = int(now // WINDOW_SECONDS)
        try:
            count = await self._counter.incr(subject, window)
        except self._counter.errors as exc:
            if self._warned != window:
                self._warned = window
                log.warning("request rate limits are not enforced: the counter store is unavailable (%s)", type(exc).__name__)
            return None
        return Allowance(self.limit, count, max(1, math.ceil((window + 1) * WINDOW_SECONDS - now)))

    async def aclose(self) -> None:
        if self._counter is not None:
            await self._counter.aclose()
