"""attachments by reference: blobs (their bytes in blob_chunks or S3), which emails send them, and the list on each email

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-29 17:30:00
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

import mailqueue.models

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


S = sqlmodel.sql.sqltypes.AutoString
TS = mailqueue.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        'blobs',
        sa.Column('id', S(length=36), primary_key=True),
        sa.Column('owner_type', S(length=16), nullable=False),
        sa.Column('owner_id', S(length=64), nullable=True),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('sha256', S(length=64), nullable=False),
        sa.Column('content_type', S(length=255), nullable=False),
        sa.Column('filename', S(length=255), nullable=False),
        sa.Column('storage', S(length=8), nullable=False),
        sa.Column('created_at', TS, nullable=False),
        sa.Column('expires_at', TS, nullable=True),
    )
    op.create_index('ix_blobs_owner', 'blobs', ['owner_type', 'owner_id'])
    op.create_table(
        'blob_chunks',
        sa.Column('blob_id', sa.String(36), sa.ForeignKey('blobs.id', ondelete='CASCADE'), primary_key=True),
        sa.Column('seq', sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column('data', sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        'email_attachments',
        sa.Column('email_id', sa.String(36), sa.ForeignKey('emails.id', ondelete='CASCADE'), primary_key=True),
        sa.Column('position', sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column('blob_id', sa.String(36), sa.ForeignKey('blobs.id'), nullable=False),
    )
    op.create_index('ix_email_attachments_blob_id', 'email_attachments', ['blob_id'])
    op.add_column('emails', sa.Column('attachments', mailqueue.models.JSONType, nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite 3.35+): copying the emails table would cascade to its events.
    op.drop_column('emails', 'attachments')
    op.drop_index('ix_email_attachments_blob_id', 'email_attachments')
    op.drop_table('email_attachments')
    op.drop_table('blob_chunks')
    op.drop_index('ix_blobs_owner', 'blobs')
    op.drop_table('blobs')
