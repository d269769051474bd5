"""provider message ids are looked up: provider events (delivered, bounced, ...) find their email by it

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 11:30:00
"""
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_emails_provider_message_id', 'emails', ['provider_message_id'])


def downgrade() -> None:
    op.drop_index('ix_emails_provider_message_id', table_name='emails')
