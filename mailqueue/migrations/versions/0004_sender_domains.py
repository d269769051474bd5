"""verified sender domains

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 06:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel
import mailqueue.models

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the sender-identity work


def downgrade() -> None:
    pass
