"""request rate-limit counters

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 06:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel
import mailqueue.models

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the rate-limit work


def downgrade() -> None:
    pass
