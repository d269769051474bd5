"""The Alembic migrations are the schema: they match the models, and they go down and up."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import mailqueue.models  # noqa: F401  (registers the tables)
from mailqueue.db import alembic_config, migrate, sync_url


def test_models_match_the_migrated_schema(database_url: str) -> None:
    engine = sa.create_engine(sync_url(database_url))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations disagree; add a migration: {diff}"


def test_downgrade_to_nothing_and_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'roundtrip.db'}"
    migrate(url)
    command.downgrade(alembic_config(url), "base")
    engine = sa.create_engine(sync_url(url))
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate(url)
    assert {"emails", "email_events", "email_recipients", "email_templates"} <= set(sa.inspect(engine).get_table_names())
    engine.dispose()
