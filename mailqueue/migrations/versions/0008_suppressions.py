"""suppressions: addresses a sender does not mail any more, and why

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 09:40:00
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

import mailqueue.models

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


S = sqlmodel.sql.sqltypes.AutoString
TS = mailqueue.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        'suppressions',
        sa.Column('id', S(length=36), primary_key=True),
        sa.Column('sender', S(length=80), nullable=False),
        sa.Column('address', S(length=320), nullable=False),
        sa.Column('match_key', S(length=320), nullable=False),
        sa.Column('reason', S(length=16), nullable=False),
        sa.Column('source', S(length=32), nullable=False),
        sa.Column('created_at', TS, nullable=False),
        sa.UniqueConstraint('sender', 'match_key', name='uq_suppressions_sender_match_key'),
    )
    op.create_index('ix_suppressions_sender_created', 'suppressions', ['sender', 'created_at'])


def downgrade() -> None:
    op.drop_index('ix_suppressions_sender_created', table_name='suppressions')
    op.drop_table('suppressions')
