"""verified sender domains

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 06:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel
import mailqueue.models

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


TS = mailqueue.models.UTCDateTime(timezone=True)
S = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        'sender_domains',
        sa.Column('id', S(length=36), primary_key=True),
        sa.Column('user_id', S(length=36), sa.ForeignKey('users.id'), nullable=False),
        sa.Column('domain', S(length=253), nullable=False),
        sa.Column('token', S(length=64), nullable=False),
        sa.Column('status', S(length=16), nullable=False),
        sa.Column('verified_at', TS, nullable=True),
        sa.Column('verified_by', S(length=80), nullable=True),
        sa.Column('created_at', TS, nullable=False),
        sa.UniqueConstraint('user_id', 'domain', name='uq_sender_domains_user_domain'),
    )
    op.create_index('ix_sender_domains_user_id', 'sender_domains', ['user_id'])
    op.create_index('ix_sender_domains_domain', 'sender_domains', ['domain'])


def downgrade() -> None:
    op.drop_index('ix_sender_domains_domain', table_name='sender_domains')
    op.drop_index('ix_sender_domains_user_id', table_name='sender_domains')
    op.drop_table('sender_domains')
