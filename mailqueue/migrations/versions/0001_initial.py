"""emails, events, recipients, templates

Revision ID: 0001
Revises: 
Create Date: 2026-11-24 20:20:39.734245
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel
import mailqueue.models
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('email_templates',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('locale', sqlmodel.sql.sqltypes.AutoString(length=35), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('html', sa.Text(), nullable=True),
    sa.Column('text', sa.Text(), nullable=True),
    sa.Column('default_from', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('sample_data', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('is_active', sa.Boolean(), nullable=False),
    sa.Column('is_current', sa.Boolean(), nullable=False),
    sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('created_at', mailqueue.models.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name', 'locale', 'version', name='uq_email_templates_version')
    )
    with op.batch_alter_table('email_templates', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_email_templates_name'), ['name'], unique=False)

    op.create_table('emails',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('workflow_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('sender_type', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('sender_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('from_address', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('reply_to', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('to', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('cc', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('bcc', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('subject', sa.Text(), nullable=True),
    sa.Column('html', sa.Text(), nullable=True),
    sa.Column('text', sa.Text(), nullable=True),
    sa.Column('template_name', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
    sa.Column('template_version', sa.Integer(), nullable=True),
    sa.Column('template_data', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('locale', sqlmodel.sql.sqltypes.AutoString(length=35), nullable=True),
    sa.Column('headers', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('priority', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', mailqueue.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('scheduled_for', mailqueue.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('sent_at', mailqueue.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('provider', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('provider_message_id', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('message_id', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('related_entity_type', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
    sa.Column('related_entity_id', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
    sa.Column('tags', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('metadata', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('idempotency_key', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('request_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('created_at', mailqueue.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', mailqueue.models.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('emails', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_emails_created_at'), ['created_at'], unique=False)
        batch_op.create_index('ix_emails_related_entity', ['related_entity_type', 'related_entity_id'], unique=False)
        batch_op.create_index('ix_emails_sender_idempotency', ['sender_type', 'sender_id', 'idempotency_key'], unique=False)
        batch_op.create_index('ix_emails_status_created', ['status', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_emails_template_name'), ['template_name'], unique=False)

    op.create_table('email_events',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('email_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('event', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('attempt', sa.Integer(), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('created_at', mailqueue.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['email_id'], ['emails.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('email_events', schema=None) as batch_op:
        batch_op.create_index('ix_email_events_email_time', ['email_id', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_email_events_event'), ['event'], unique=False)

    op.create_table('email_recipients',
    sa.Column('email_id', sa.String(length=36), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=3), nullable=False),
    sa.Column('address', sqlmodel.sql.sqltypes.AutoString(length=320), nullable=False),
    sa.ForeignKeyConstraint(['email_id'], ['emails.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('email_id', 'kind', 'address')
    )
    with op.batch_alter_table('email_recipients', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_email_recipients_address'), ['address'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('email_recipients', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_email_recipients_address'))

    op.drop_table('email_recipients')
    with op.batch_alter_table('email_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_email_events_event'))
        batch_op.drop_index('ix_email_events_email_time')

    op.drop_table('email_events')
    with op.batch_alter_table('emails', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_emails_template_name'))
        batch_op.drop_index('ix_emails_status_created')
        batch_op.drop_index('ix_emails_sender_idempotency')
        batch_op.drop_index('ix_emails_related_entity')
        batch_op.drop_index(batch_op.f('ix_emails_created_at'))

    op.drop_table('emails')
    with op.batch_alter_table('email_templates', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_email_templates_name'))

    op.drop_table('email_templates')
