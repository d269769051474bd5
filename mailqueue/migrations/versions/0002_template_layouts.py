"""templates: from-name and updated_at; emails: pinned template variant and dependencies

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 00:40:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel
import mailqueue.models
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('email_templates') as batch:
        batch.add_column(sa.Column('default_from_name', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True))
        batch.add_column(sa.Column('updated_at', mailqueue.models.UTCDateTime(timezone=True), nullable=True))
    op.execute("UPDATE email_templates SET updated_at = created_at")
    with op.batch_alter_table('email_templates') as batch:
        batch.alter_column('updated_at', existing_type=mailqueue.models.UTCDateTime(timezone=True), nullable=False)
    op.create_index(
        'uq_email_templates_current', 'email_templates', ['name', 'locale'], unique=True,
        postgresql_where=sa.text('is_current'), sqlite_where=sa.text('is_current'),
    )
    with op.batch_alter_table('emails') as batch:
        batch.add_column(sa.Column('template_locale', sqlmodel.sql.sqltypes.AutoString(length=35), nullable=True))
        batch.add_column(sa.Column('template_dependencies', JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('emails') as batch:
        batch.drop_column('template_dependencies')
        batch.drop_column('template_locale')
    op.drop_index('uq_email_templates_current', table_name='email_templates')
    with op.batch_alter_table('email_templates') as batch:
        batch.drop_column('updated_at')
        batch.drop_column('default_from_name')
