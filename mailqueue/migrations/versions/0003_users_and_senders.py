"""users, API keys, sender settings and quota counters

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 05:30:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel
import mailqueue.models

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

TS = mailqueue.models.UTCDateTime(timezone=True)
S = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        'users',
        sa.Column('id', S(length=36), primary_key=True),
        sa.Column('name', S(length=200), nullable=False, unique=True),
        sa.Column('email', S(length=512), nullable=True),
        sa.Column('role', S(length=16), nullable=False),
        sa.Column('is_active', sa.Boolean(), nullable=False),
        sa.Column('created_at', TS, nullable=False),
    )
    op.create_table(
        'api_keys',
        sa.Column('id', S(length=36), primary_key=True),
        sa.Column('user_id', S(length=36), sa.ForeignKey('users.id'), nullable=False),
        sa.Column('name', S(length=200), nullable=True),
        sa.Column('prefix', S(length=16), nullable=False),
        sa.Column('key_hash', S(length=64), nullable=False, unique=True),
        sa.Column('created_at', TS, nullable=False),
        sa.Column('last_used_at', TS, nullable=True),
        sa.Column('revoked_at', TS, nullable=True),
    )
    op.create_index('ix_api_keys_user_id', 'api_keys', ['user_id'])
    op.create_table(
        'sender_settings',
        sa.Column('user_id', S(length=36), sa.ForeignKey('users.id'), primary_key=True),
        sa.Column('driver', S(length=16), nullable=False),
        sa.Column('smtp_host', S(length=255), nullable=True),
        sa.Column('smtp_port', sa.Integer(), nullable=True),
        sa.Column('smtp_username', S(length=255), nullable=True),
        sa.Column('smtp_security', S(length=16), nullable=True),
        sa.Column('smtp_password_enc', sa.Text(), nullable=True),
        sa.Column('api_key_enc', sa.Text(), nullable=True),
        sa.Column('api_secret_enc', sa.Text(), nullable=True),
        sa.Column('mailgun_domain', S(length=255), nullable=True),
        sa.Column('mailgun_region', S(length=8), nullable=True),
        sa.Column('ses_region', S(length=32), nullable=True),
        sa.Column('default_from', S(length=512), nullable=True),
        sa.Column('hourly_limit', sa.Integer(), nullable=True),
        sa.Column('daily_limit', sa.Integer(), nullable=True),
        sa.Column('updated_at', TS, nullable=False),
    )
    op.create_table(
        'sender_usage',
        sa.Column('sender', S(length=80), primary_key=True),
        sa.Column('window', S(length=16), primary_key=True),
        sa.Column('count', sa.Integer(), nullable=False),
    )
    op.create_index('ix_emails_sender_created', 'emails', ['sender_type', 'sender_id', 'created_at'])


def downgrade() -> None:
    op.drop_index('ix_emails_sender_created', table_name='emails')
    op.drop_table('sender_usage')
    op.drop_table('sender_settings')
    op.drop_index('ix_api_keys_user_id', table_name='api_keys')
    op.drop_table('api_keys')
    op.drop_table('users')
