"""feature flags: their state (feature_flags) and every change to it (flag_audit)

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01 10:00:00
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

import mailqueue.models

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


S = sqlmodel.sql.sqltypes.AutoString
TS = mailqueue.models.UTCDateTime(timezone=True)
JSON = mailqueue.models.JSONType


def upgrade() -> None:
    op.create_table(
        'feature_flags',
        sa.Column('key', S(length=100), primary_key=True),
        sa.Column('enabled', sa.Boolean(), nullable=False),
        sa.Column('percentage', sa.Integer(), nullable=True),
        sa.Column('senders', JSON, nullable=False),
        sa.Column('updated_at', TS, nullable=False),
        sa.Column('updated_by', S(length=80), nullable=False),
        sa.CheckConstraint('percentage BETWEEN 0 AND 100', name='ck_feature_flags_percentage'),
    )
    op.create_table(
        'flag_audit',
        sa.Column('id', S(length=36), primary_key=True),
        sa.Column('key', S(length=100), nullable=False),
        sa.Column('at', TS, nullable=False),
        sa.Column('actor', S(length=80), nullable=False),
        sa.Column('old', JSON, nullable=True),
        sa.Column('new', JSON, nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
    )
    op.create_index('ix_flag_audit_key_at', 'flag_audit', ['key', 'at'])
    op.create_index('ix_flag_audit_at', 'flag_audit', ['at'])


def downgrade() -> None:
    op.drop_index('ix_flag_audit_at', table_name='flag_audit')
    op.drop_index('ix_flag_audit_key_at', table_name='flag_audit')
    op.drop_table('flag_audit')
    op.drop_table('feature_flags')
