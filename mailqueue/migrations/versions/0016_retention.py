"""retention: the purge's batches find final emails by status and last change; each run's counts are kept

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-01 11:00:00
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

import mailqueue.models

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


S = sqlmodel.sql.sqltypes.AutoString
TS = mailqueue.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_index('ix_emails_status_updated', 'emails', ['status', 'updated_at'])
    op.create_table(
        'maintenance_runs',
        sa.Column('id', S(length=36), primary_key=True),
        sa.Column('job', S(length=32), nullable=False),
        sa.Column('started_at', TS, nullable=False),
        sa.Column('finished_at', TS, nullable=False),
        sa.Column('cutoff', TS, nullable=True),
        sa.Column('emails', sa.Integer(), nullable=False),
        sa.Column('events', sa.Integer(), nullable=False),
        sa.Column('blobs', sa.Integer(), nullable=False),
        sa.Column('batches', sa.Integer(), nullable=False),
    )
    op.create_index('ix_maintenance_runs_job_finished', 'maintenance_runs', ['job', 'finished_at'])


def downgrade() -> None:
    op.drop_index('ix_maintenance_runs_job_finished', table_name='maintenance_runs')
    op.drop_table('maintenance_runs')
    op.drop_index('ix_emails_status_updated', table_name='emails')
