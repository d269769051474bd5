"""provider events in, per user: the keys a user's own provider account signs its events with

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-29 11:45:00
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # All nullable: an existing user takes no events on their own routes until they set a key.
    op.add_column('sender_settings', sa.Column(
        'sns_topic_arns', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True))
    op.add_column('sender_settings', sa.Column('sendgrid_webhook_public_key', sa.Text(), nullable=True))
    op.add_column('sender_settings', sa.Column('mailgun_webhook_signing_key_enc', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('sender_settings') as batch:  # SQLite drops columns by copying the table
        for column in ('mailgun_webhook_signing_key_enc', 'sendgrid_webhook_public_key', 'sns_topic_arns'):
            batch.drop_column(column)
