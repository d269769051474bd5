"""provider events in: the signed webhook tokens already accepted (Mailgun replays are refused)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29 11:32:00
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

import mailqueue.models

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


S = sqlmodel.sql.sqltypes.AutoString
TS = mailqueue.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        'inbound_tokens',
        sa.Column('digest', S(length=64), primary_key=True),
        sa.Column('seen_at', TS, nullable=False),
    )
    op.create_index('ix_inbound_tokens_seen_at', 'inbound_tokens', ['seen_at'])


def downgrade() -> None:
    op.drop_index('ix_inbound_tokens_seen_at', table_name='inbound_tokens')
    op.drop_table('inbound_tokens')
