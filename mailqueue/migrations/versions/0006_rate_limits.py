"""request rate-limit counters

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 06:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


S = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    # One write per request: PostgreSQL keeps these counters out of its WAL (no flush per request).
    # A crash empties the table, which costs at most one minute's counts.
    unlogged = ['UNLOGGED'] if op.get_context().dialect.name == 'postgresql' else []
    op.create_table(
        'rate_limit_counters',
        sa.Column('minute', sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column('subject', S(length=64), primary_key=True),
        sa.Column('count', sa.Integer(), nullable=False),
        prefixes=unlogged,
    )


def downgrade() -> None:
    op.drop_table('rate_limit_counters')
