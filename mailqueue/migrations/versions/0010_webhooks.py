"""outbound webhooks: endpoints and their deliveries

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29 11:31:00
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

import mailqueue.models

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


S = sqlmodel.sql.sqltypes.AutoString
TS = mailqueue.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        'webhook_endpoints',
        sa.Column('id', S(length=36), primary_key=True),
        sa.Column('owner', S(length=80), nullable=False),
        sa.Column('url', S(length=2048), nullable=False),
        sa.Column('event_types', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
        sa.Column('secret_enc', sa.Text(), nullable=False),
        sa.Column('status', S(length=16), nullable=False),
        sa.Column('disabled_reason', sa.Text(), nullable=True),
        sa.Column('disabled_at', TS, nullable=True),
        sa.Column('failing_since', TS, nullable=True),
        sa.Column('cursor', S(length=40), nullable=False),
        sa.Column('created_at', TS, nullable=False),
        sa.Column('updated_at', TS, nullable=False),
    )
    op.create_index('ix_webhook_endpoints_owner_created', 'webhook_endpoints', ['owner', 'created_at'])
    op.create_table(
        'webhook_deliveries',
        sa.Column('id', S(length=36), primary_key=True),
        sa.Column('endpoint_id', S(length=36), sa.ForeignKey('webhook_endpoints.id', ondelete='CASCADE'), nullable=False),
        sa.Column('event_id', S(length=36), nullable=False),
        sa.Column('event_type', S(length=32), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('status_code', sa.Integer(), nullable=True),
        sa.Column('latency_ms', sa.Integer(), nullable=True),
        sa.Column('error', S(length=300), nullable=True),
        sa.Column('redelivery', sa.Boolean(), nullable=False),
        sa.Column('created_at', TS, nullable=False),
    )
    op.create_index('ix_webhook_deliveries_endpoint_created', 'webhook_deliveries', ['endpoint_id', 'created_at'])


def downgrade() -> None:
    op.drop_index('ix_webhook_deliveries_endpoint_created', table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
    op.drop_index('ix_webhook_endpoints_owner_created', table_name='webhook_endpoints')
    op.drop_table('webhook_endpoints')
