"""DKIM keys of sender domains: RSA and Ed25519, their private keys encrypted, retired keys kept

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-29 15:00:00
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

import mailqueue.models

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


S = sqlmodel.sql.sqltypes.AutoString
TS = mailqueue.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    # Existing domains get no keys: their mail goes unsigned, as before, until a rotation makes some.
    op.create_table(
        'dkim_keys',
        sa.Column('id', S(length=36), primary_key=True),
        sa.Column('domain_id', S(length=36), sa.ForeignKey('sender_domains.id', ondelete='CASCADE'), nullable=False),
        sa.Column('selector', S(length=63), nullable=False),
        sa.Column('algorithm', S(length=16), nullable=False),
        sa.Column('private_key_enc', sa.Text(), nullable=False),
        sa.Column('public_key', sa.Text(), nullable=False),
        sa.Column('published', sa.Boolean(), nullable=True),
        sa.Column('checked_at', TS, nullable=True),
        sa.Column('created_at', TS, nullable=False),
        sa.Column('retired_at', TS, nullable=True),
        sa.UniqueConstraint('domain_id', 'selector', name='uq_dkim_keys_domain_selector'),
    )


def downgrade() -> None:
    op.drop_table('dkim_keys')
