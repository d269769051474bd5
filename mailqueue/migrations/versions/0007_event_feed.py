"""the event feed: a cursor for every email event, filled by the database

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 09:30:00
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


S = sqlmodel.sql.sqltypes.AutoString

# Every API process LISTENs on this channel (mailqueue/events.py says the same).
CHANNEL = 'mailqueue_events'

# PostgreSQL: the row's transaction id, so readers can wait for transactions that took a lower
# seq but have not committed yet; one NOTIFY per transaction (PostgreSQL folds repeats) wakes
# the streams of every API process at commit.
PG_FUNCTION = f"""
CREATE FUNCTION email_event_feed_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO email_event_feed (xid, event_id, email_id)
    VALUES (pg_current_xact_id()::text::bigint, NEW.id, NEW.email_id);
    PERFORM pg_notify('{CHANNEL}', '');
    RETURN NULL;
END
$$
"""
PG_TRIGGER = """
CREATE TRIGGER email_event_feed_add AFTER INSERT ON email_events
FOR EACH ROW EXECUTE FUNCTION email_event_feed_add()
"""
# SQLite has one writer at a time: seq order is commit order, xid stays 0.
SQLITE_TRIGGER = """
CREATE TRIGGER email_event_feed_add AFTER INSERT ON email_events
BEGIN
    INSERT INTO email_event_feed (xid, event_id, email_id) VALUES (0, NEW.id, NEW.email_id);
END
"""


def upgrade() -> None:
    postgres = op.get_context().dialect.name == 'postgresql'
    op.create_table(
        'email_event_feed',
        sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), primary_key=True, autoincrement=True),
        sa.Column('xid', sa.BigInteger(), nullable=False),
        sa.Column('event_id', S(length=36), nullable=False),
        sa.Column('email_id', S(length=36), nullable=False),
        sa.ForeignKeyConstraint(['event_id'], ['email_events.id'], ondelete='CASCADE'),
        sa.UniqueConstraint('event_id'),
        sqlite_autoincrement=True,
    )
    op.create_index('ix_email_event_feed_order', 'email_event_feed', ['xid', 'seq'])
    op.create_index('ix_email_event_feed_email', 'email_event_feed', ['email_id', 'xid', 'seq'])
    # Existing events get cursors in the order they happened (this transaction's id on PostgreSQL:
    # older than any transaction that commits after it).
    xid = 'pg_current_xact_id()::text::bigint' if postgres else '0'
    op.execute(
        f'INSERT INTO email_event_feed (xid, event_id, email_id) '
        f'SELECT {xid}, id, email_id FROM email_events ORDER BY created_at, id'
    )
    if postgres:
        op.execute(PG_FUNCTION)
        op.execute(PG_TRIGGER)
    else:
        op.execute(SQLITE_TRIGGER)


def downgrade() -> None:
    op.execute('DROP TRIGGER IF EXISTS email_event_feed_add' + (' ON email_events' if op.get_context().dialect.name == 'postgresql' else ''))
    if op.get_context().dialect.name == 'postgresql':
        op.execute('DROP FUNCTION IF EXISTS email_event_feed_add()')
    op.drop_index('ix_email_event_feed_email', table_name='email_event_feed')
    op.drop_index('ix_email_event_feed_order', table_name='email_event_feed')
    op.drop_table('email_event_feed')
