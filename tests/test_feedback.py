"""mailqueue/feedback.py: the one home for what the receiving side says after "sent", against the
real database: events deduplicated by their key, the status only moving up, suppressions with their
reason and source on the email's own sender's list, and events that arrive before "sent"."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlmodel import col, select

from mailqueue.accounts import new_id
from mailqueue.contracts import EmailStatus, SenderType, workflow_id_for
from mailqueue.feedback import Feedback, FeedbackKind, record_feedback
from mailqueue.ids import new_email_id
from mailqueue.models import Email, EmailEvent, Suppression, User


@pytest.fixture
async def user_id(sessions: Any) -> str:
    user = new_id()
    async with sessions() as s:
        s.add(User(id=user, name=f"feedback-{user}"))
        await s.commit()
    return user


async def _email(sessions: Any, user_id: str | None, status: EmailStatus = EmailStatus.SENT, to: str = "ann@example.com") -> tuple[str, str]:
    """An email record as the send step leaves it; (its id, its provider message id)."""
    email_id, provider_id = new_email_id(), f"prov-{uuid.uuid4().hex}"
    async with sessions() as s:
        s.add(Email(
            id=email_id, workflow_id=workflow_id_for(email_id), from_address="sender@example.com", to=[to],
            sender_type=(SenderType.USER if user_id else SenderType.SYSTEM).value, sender_id=user_id,
            status=status.value, provider="sendgrid", provider_message_id=provider_id, message_id=f"<{email_id}@example.com>",
        ))
        await s.commit()
    return email_id, provider_id


def _feedback(kind: FeedbackKind, provider_id: str, key: str | None = None, **kw: Any) -> Feedback:
    return Feedback(kind=kind, source="sendgrid", event_key=key or uuid.uuid4().hex, provider_message_id=provider_id,
                    recipient=kw.pop("recipient", "ann@example.com"), **kw)


async def _state(sessions: Any, email_id: str) -> tuple[str, list[tuple[str, str | None]]]:
    async with sessions() as s:
        status = (await s.exec(select(Email.status).where(col(Email.id) == email_id))).one()
        events = (await s.exec(select(EmailEvent).where(col(EmailEvent.email_id) == email_id).order_by(col(EmailEvent.created_at)))).all()
        return status, [(e.event, e.detail) for e in events]


async def _suppressions(sessions: Any, sender: str) -> list[tuple[str, str, str]]:
    async with sessions() as s:
        rows = (await s.exec(select(Suppression).where(col(Suppression.sender) == sender).order_by(col(Suppression.created_at)))).all()
        return [(r.address, r.reason, r.source) for r in rows]


async def test_the_same_event_twice_is_recorded_once(sessions: Any, user_id: str) -> None:
    email_id, provider_id = await _email(sessions, user_id)
    bounce = _feedback(FeedbackKind.BOUNCED, provider_id, key="sg-event-1", diagnostic="550 5.1.1 no such user")
    async with sessions() as s:
        first = await record_feedback(s, bounce)
    async with sessions() as s:
        again = await record_feedback(s, bounce)
    assert first is not None and again is not None
    assert (first.duplicate, first.status, first.suppressed) == (False, EmailStatus.BOUNCED, True)
    assert (again.duplicate, again.status, again.suppressed) == (True, EmailStatus.BOUNCED, False)
    status, events = await _state(sessions, email_id)
    assert status == "bounced"
    assert events == [("bounced", "hard bounce from sendgrid for ann@example.com: 550 5.1.1 no such user")]
    assert await _suppressions(sessions, f"user:{user_id}") == [("ann@example.com", "hard_bounce", "sendgrid")]


async def test_the_status_only_moves_up(sessions: Any, user_id: str) -> None:
    email_id, provider_id = await _email(sessions, user_id)
    steps = [
        (FeedbackKind.DELIVERED, {}, EmailStatus.DELIVERED),
        (FeedbackKind.COMPLAINED, {}, EmailStatus.COMPLAINED),
        (FeedbackKind.BOUNCED, {}, EmailStatus.COMPLAINED),  # a bounce after a complaint: recorded, status kept
        (FeedbackKind.DELIVERED, {}, EmailStatus.COMPLAINED),
    ]
    for kind, extra, expected in steps:
        async with sessions() as s:
            recorded = await record_feedback(s, _feedback(kind, provider_id, **extra))
        assert recorded is not None and recorded.status == expected, (kind, recorded)
    status, events = await _state(sessions, email_id)
    assert status == "complained"
    assert [e for e, _ in events] == ["delivered", "complained", "bounced", "delivered"]


async def test_a_soft_bounce_is_an_event_only(sessions: Any, user_id: str) -> None:
    email_id, provider_id = await _email(sessions, user_id, to="soft@example.com")
    async with sessions() as s:
        recorded = await record_feedback(s, _feedback(FeedbackKind.BOUNCED, provider_id, hard=False, recipient="soft@example.com",
                                                      diagnostic="421 try later"))
    assert recorded is not None and (recorded.status, recorded.suppressed) == (EmailStatus.SENT, False)
    status, events = await _state(sessions, email_id)
    assert status == "sent" and events == [("bounced", "soft bounce from sendgrid for soft@example.com: 421 try later")]
    assert await _suppressions(sessions, f"user:{user_id}") == []


async def test_each_kind_suppresses_with_its_reason_and_source(sessions: Any, user_id: str) -> None:
    cases = [
        (FeedbackKind.BOUNCED, "hard@example.com", "hard_bounce", EmailStatus.BOUNCED),
        (FeedbackKind.COMPLAINED, "spam@example.com", "complaint", EmailStatus.COMPLAINED),
        (FeedbackKind.UNSUBSCRIBED, "bye@example.com", "unsubscribe", EmailStatus.SENT),  # says nothing of delivery
        (FeedbackKind.DELIVERED, "fine@example.com", None, EmailStatus.DELIVERED),
    ]
    for kind, address, _, expected in cases:
        _, provider_id = await _email(sessions, user_id, to=address)
        async with sessions() as s:
            recorded = await record_feedback(s, Feedback(kind=kind, source="mailgun", event_key=uuid.uuid4().hex,
                                                         provider_message_id=f"<{provider_id}>", recipient=address))
        assert recorded is not None and recorded.status == expected, kind  # found in either form of the message id
    assert await _suppressions(sessions, f"user:{user_id}") == [
        (address, reason, "mailgun") for _, address, reason, _ in cases if reason
    ]


async def test_events_land_on_the_emails_own_sender_and_a_scoped_caller_sees_only_its_own(sessions: Any, user_id: str) -> None:
    email_id, provider_id = await _email(sessions, user_id, to="scoped@example.com")
    complaint = _feedback(FeedbackKind.COMPLAINED, provider_id, recipient="scoped@example.com")
    async with sessions() as s:
        assert await record_feedback(s, complaint, sender="user:someone-else") is None
    assert await _state(sessions, email_id) == ("sent", [])
    async with sessions() as s:
        recorded = await record_feedback(s, complaint, sender=f"user:{user_id}")
    assert recorded is not None and recorded.sender == f"user:{user_id}"
    assert await _suppressions(sessions, f"user:{user_id}") == [("scoped@example.com", "complaint", "sendgrid")]
    assert ("scoped@example.com", "complaint", "sendgrid") not in await _suppressions(sessions, "system:")


async def test_an_event_before_sent_is_recorded_without_moving_the_status(sessions: Any, user_id: str) -> None:
    email_id, provider_id = await _email(sessions, user_id, status=EmailStatus.SENDING, to="early@example.com")
    async with sessions() as s:
        recorded = await record_feedback(s, _feedback(FeedbackKind.BOUNCED, provider_id, recipient="early@example.com"))
    assert recorded is not None and (recorded.status, recorded.suppressed) == (EmailStatus.SENDING, True)
    status, events = await _state(sessions, email_id)
    assert status == "sending" and [e for e, _ in events] == ["bounced"]
    assert ("early@example.com", "hard_bounce", "sendgrid") in await _suppressions(sessions, f"user:{user_id}")


async def test_an_unknown_message_id_records_nothing(sessions: Any) -> None:
    async with sessions() as s:
        assert await record_feedback(s, _feedback(FeedbackKind.BOUNCED, "never-sent", recipient="nobody@example.com")) is None
    async with sessions() as s:
        assert (await s.exec(select(Suppression).where(col(Suppression.address) == "nobody@example.com"))).first() is None


async def test_a_message_id_matches_only_the_provider_that_sent_it(sessions: Any, user_id: str) -> None:
    """Message ids are unique per provider only: Mailgun's event for an id SendGrid also gave out
    is not the SendGrid email's."""
    email_id, provider_id = await _email(sessions, user_id)
    async with sessions() as s:
        other = await record_feedback(s, _feedback(FeedbackKind.BOUNCED, provider_id, provider="mailgun"))
    async with sessions() as s:
        own = await record_feedback(s, _feedback(FeedbackKind.DELIVERED, provider_id, provider="sendgrid"))
    assert other is None
    assert own is not None and own.email_id == email_id
    assert await _state(sessions, email_id) == ("delivered", [("delivered", "delivered from sendgrid for ann@example.com")])


async def test_a_scoped_caller_finds_its_own_email_when_another_sender_has_the_same_message_id(sessions: Any, user_id: str) -> None:
    """The scope is part of the lookup: an older email of another sender with the same provider
    message id does not hide this sender's."""
    theirs, provider_id = await _email(sessions, None, to="shared@example.com")  # the system's, first
    mine = new_email_id()
    async with sessions() as s:
        s.add(Email(
            id=mine, workflow_id=workflow_id_for(mine), from_address="sender@example.com", to=["shared@example.com"],
            sender_type=SenderType.USER.value, sender_id=user_id, status=EmailStatus.SENT.value, provider="sendgrid",
            provider_message_id=provider_id, message_id=f"<{mine}@example.com>",
        ))
        await s.commit()
    async with sessions() as s:
        recorded = await record_feedback(s, _feedback(FeedbackKind.DELIVERED, provider_id, recipient="shared@example.com"), sender=f"user:{user_id}")
    assert recorded is not None and recorded.email_id == mine
    assert (await _state(sessions, theirs))[0] == "sent"
