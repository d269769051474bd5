"""abuse limits: admin-owned quotas, priority ceilings, recipients per hour

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 06:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel
import mailqueue.models

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the abuse-limits work


def downgrade() -> None:
    pass
