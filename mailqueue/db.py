"""Database engines and sessions (async for the services, sync for Alembic)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# What a step raises when the database cannot be reached (or answers too slowly): steps that need
# the database wait for it and ask again; they never fail an email for it.
STORE_ERRORS: tuple[type[BaseException], ...] = (SQLAlchemyError, OSError, asyncio.TimeoutError)


def async_url(url: str) -> sa.URL:
    """The URL with an async driver: aiosqlite for SQLite, psycopg 3 for PostgreSQL."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    return parsed.set(drivername="postgresql+psycopg")


def sync_url(url: str) -> sa.URL:
    parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite")
    return parsed.set(drivername="postgresql+psycopg")


def _ensure_sqlite_dir(url: sa.URL) -> None:
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)


def _tune_sqlite(engine: sa.Engine) -> None:
    """WAL for concurrent readers; BEGIN IMMEDIATE so two processes never deadlock on upgrade."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    target = async_url(url)
    _ensure_sqlite_dir(target)
    if target.get_backend_name() == "sqlite":
        # One connection per process: SQLite has one writer at a time anyway, and a queue in
        # the pool is far cheaper than many connections spinning in SQLite's busy handler.
        engine = create_async_engine(target, connect_args={"timeout": 30}, pool_size=1, max_overflow=0, pool_timeout=120)
        _tune_sqlite(engine.sync_engine)
        return engine
    return create_async_engine(
        target, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, pool_recycle=1800,
        connect_args={"connect_timeout": 10},  # an unreachable server fails the step, never hangs it
    )


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


def alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", sync_url(url).render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database schema to `revision` (Alembic upgrade)."""
    from alembic import command

    _ensure_sqlite_dir(sync_url(url))
    command.upgrade(alembic_config(url), revision)
