"""abuse limits: admin-owned quotas, priority ceilings, recipients per hour

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 06:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

S = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    # All nullable: an existing user keeps no ceiling and the operator's defaults (MAILQUEUE_USER_*).
    op.add_column('users', sa.Column('hourly_limit', sa.Integer(), nullable=True))
    op.add_column('users', sa.Column('daily_limit', sa.Integer(), nullable=True))
    op.add_column('users', sa.Column('recipients_per_hour', sa.Integer(), nullable=True))
    op.add_column('users', sa.Column('max_priority', S(length=8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('users') as batch:  # SQLite drops columns by copying the table
        for column in ('max_priority', 'recipients_per_hour', 'daily_limit', 'hourly_limit'):
            batch.drop_column(column)
