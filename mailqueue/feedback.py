"""What the receiving side says after "sent": delivered, bounced (hard or soft), complained,
unsubscribed. One home for recording it, whatever brought it (a provider's signed event, a DSN
that came back to the VERP address, an unsubscribe by mail):

- the sender's suppression list gains the address for a hard bounce, a complaint or an unsubscribe
  (first, and on its own: a provider that sends the event again still gets it suppressed);
- the email's trail gains one event (so the feed, the streams and the webhooks see it), with an id
  derived from the event's own key: the same event recorded twice is one event;
- the record's status moves up sent < delivered < bounced < complained, never back, and only once
  it went out (a provider's word that arrives before our "sent" is recorded as an event only).

Callers verify the event's origin before they call: nothing here checks a signature.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mailqueue import suppressions
from mailqueue.contracts import EmailStatus, EventType, SenderType
from mailqueue.models import Email, EmailEvent, SuppressionReason, utcnow
from mailqueue.senders import sender_key

_EVENT_IDS = uuid.UUID("6f1c0f7e-3b1a-4e0b-9a43-6d2a3f0e5b11")  # the namespace of feedback event ids
DIAGNOSTIC_MAX = 500  # characters of the server's words kept in the event's detail


class FeedbackKind(StrEnum):
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    COMPLAINED = "complained"
    UNSUBSCRIBED = "unsubscribed"


_EVENT = {
    FeedbackKind.DELIVERED: EventType.DELIVERED,
    FeedbackKind.BOUNCED: EventType.BOUNCED,
    FeedbackKind.COMPLAINED: EventType.COMPLAINED,
    FeedbackKind.UNSUBSCRIBED: EventType.UNSUBSCRIBED,
}
# The order a record moves up in; a status not listed is not out yet and does not move.
_RANK = {EmailStatus.SENT: 0, EmailStatus.DELIVERED: 1, EmailStatus.BOUNCED: 2, EmailStatus.COMPLAINED: 3}


@dataclass(frozen=True)
class Feedback:
    """One event from the receiving side, verified by the caller.

    The email is named by `email_id` (known directly: a VERP bounce address) or found by the
    provider's message id (`provider_message_id`, as the send step recorded it; angle brackets
    either way). `event_key` is the event's own id at its source (SNS MessageId, sg_event_id,
    Mailgun's event id, the DSN's Message-ID...): recording the same key twice changes nothing."""

    kind: FeedbackKind
    source: str  # "ses", "sendgrid", "mailgun", "smtp-dsn", "unsubscribe mail"
    event_key: str
    recipient: str | None = None  # the address concerned (None: the email as a whole)
    email_id: str | None = None
    provider_message_id: str | None = None
    # The driver that sent it (Email.provider), when the email is found by the provider's message id:
    # message ids are unique per provider only (an SMTP server's "queued as" ids are not even that).
    provider: str | None = None
    hard: bool = True  # bounces only: permanent (suppress, status bounced) or temporary (event only)
    diagnostic: str = ""  # the server's words: status code and text
    at: datetime | None = None  # when it happened, by the source's clock (default: now)

    @property
    def suppresses(self) -> SuppressionReason | None:
        if self.kind == FeedbackKind.BOUNCED:
            return SuppressionReason.HARD_BOUNCE if self.hard else None
        if self.kind == FeedbackKind.COMPLAINED:
            return SuppressionReason.COMPLAINT
        if self.kind == FeedbackKind.UNSUBSCRIBED:
            return SuppressionReason.UNSUBSCRIBE
        return None

    @property
    def moves_to(self) -> EmailStatus | None:
        if self.kind == FeedbackKind.DELIVERED:
            return EmailStatus.DELIVERED
        if self.kind == FeedbackKind.BOUNCED:
            return EmailStatus.BOUNCED if self.hard else None
        if self.kind == FeedbackKind.COMPLAINED:
            return EmailStatus.COMPLAINED
        return None  # an unsubscribe says nothing about this email's delivery

    def detail(self) -> str:
        what = f"{'hard' if self.hard else 'soft'} bounce" if self.kind == FeedbackKind.BOUNCED else self.kind.value
        parts = [what, f"from {self.source}"]
        if self.recipient:
            parts.append(f"for {self.recipient}")
        text = " ".join(parts)
        if self.diagnostic:
            text += f": {' '.join(self.diagnostic.split())[:DIAGNOSTIC_MAX]}"
        return text


@dataclass(frozen=True)
class Recorded:
    email_id: str
    sender: str  # sender_key of the email's sender
    status: EmailStatus  # the record's status afterwards
    duplicate: bool  # this event was recorded before: nothing changed
    suppressed: bool  # the address was added to the sender's list now


def _message_id_forms(value: str) -> list[str]:
    bare = value.strip().strip("<>").strip()
    return [bare, f"<{bare}>"] if bare else []


async def find_email(
    session: AsyncSession, *, email_id: str | None = None, provider_message_id: str | None = None,
    provider: str | None = None, sender: str | None = None,
) -> Email | None:
    """The email an event is about: by id, else by the provider's message id (sent by `provider`,
    when given). `sender` (a sender_key) limits the match to that sender's emails (an inbound route
    scoped to one user)."""
    if email_id:
        query = select(Email).where(col(Email.id) == email_id)
    elif provider_message_id and (forms := _message_id_forms(provider_message_id)):
        query = select(Email).where(col(Email.provider_message_id).in_(forms)).order_by(col(Email.created_at)).limit(1)
        if provider is not None:
            query = query.where(col(Email.provider) == provider)
    else:
        return None
    if sender is not None:  # in the query: another sender's email with the same message id must not hide this one's
        kind, _, who = sender.partition(":")
        query = query.where(col(Email.sender_type) == kind, col(Email.sender_id) == (who or None))
    return (await session.exec(query)).first()


async def record_feedback(
    session: AsyncSession, feedback: Feedback, *, sender: str | None = None, email: Email | None = None,
) -> Recorded | None:
    """Record one verified event (see the module's docstring). None: no email matches it (an
    unknown message id, or another sender's email when `sender` is given). Commits.

    `email`: the event's email as the caller already found it (find_email), so a report about many
    recipients of one email looks it up once."""
    if email is None:
        email = await find_email(
            session, email_id=feedback.email_id, provider_message_id=feedback.provider_message_id,
            provider=feedback.provider, sender=sender,
        )
    if email is None:
        return None
    owner = sender_key(SenderType(email.sender_type), email.sender_id)
    email_id, status = email.id, EmailStatus(email.status)
    newly_suppressed = False
    reason = feedback.suppresses
    if reason is not None and feedback.recipient:
        try:
            _, newly_suppressed = await suppressions.add(session, owner, feedback.recipient, reason, feedback.source)
        except ValueError:  # not an address: nothing to suppress, the event still counts
            pass
    event_id = str(uuid.uuid5(_EVENT_IDS, f"{feedback.source}\n{feedback.event_key}\n{email_id}"))
    conn = await session.connection()
    target = feedback.moves_to
    if target is not None and status in _RANK and _RANK[target] > _RANK[status]:
        emails = Email.__table__  # type: ignore[attr-defined]
        lower = [s.value for s, rank in _RANK.items() if rank < _RANK[target]]
        moved = await conn.execute(
            sa.update(emails).where(emails.c.id == email_id, emails.c.status.in_(lower)).values(status=target.value, updated_at=utcnow())
        )
        if moved.rowcount:  # type: ignore[attr-defined]
            status = target
            set_committed_value(email, "status", target.value)  # a caller's row stays true for its next event
    try:
        await conn.execute(
            sa.insert(EmailEvent.__table__).values(  # type: ignore[attr-defined]
                id=event_id, email_id=email_id, event=_EVENT[feedback.kind].value,
                status=status.value if status == target else None, attempt=None,
                detail=feedback.detail(), created_at=feedback.at or utcnow(),
            )
        )
        await session.commit()
    except IntegrityError:
        await session.rollback()  # recorded before: the status change goes with it
        if await session.get(EmailEvent, event_id) is None:
            raise
        current = (await session.exec(select(Email.status).where(col(Email.id) == email_id))).first()
        return Recorded(email_id, owner, EmailStatus(current or status), True, newly_suppressed)
    return Recorded(email_id, owner, status, False, newly_suppressed)
