"""The duplicate window: a send retried after its mail went out does not send it again.

An attempt records `sending` before it talks to the mail server and `sent` right after the
server accepts. When the worker dies after that, Temporal retries the activity; the retry sees
`sent` on the record and returns that delivery instead of sending a second copy. Only a death
between the server's acceptance and that write (milliseconds) can still double a mail, and then
both copies carry the same Message-ID.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from mailqueue.template_library import Renderer
from activities.send import SendActivities
from mailqueue.config import Settings
from mailqueue.contracts import EMAIL_CLOSED, SendRequest, SendResult
from mailqueue.drivers.factory import DriverFactory, driver_from_settings
from mailqueue.models import Email
from mailqueue.email_store import events_of, insert_email, record_from_spec
from mailqueue.templating import TemplateEngine
from tests.helpers import SmtpSink, make_spec

RUN_ID = str(uuid.uuid4())


async def attempt(acts: SendActivities, req: SendRequest, n: int, run_id: str = RUN_ID) -> SendResult:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info, attempt=n, workflow_run_id=run_id, activity_type="send_email",
        started_time=datetime.now(UTC), start_to_close_timeout=timedelta(seconds=10),
    )
    return await env.run(acts.send, req)


def send_activities(settings: Settings, sessions) -> SendActivities:  # type: ignore[no-untyped-def]
    return SendActivities(
        sessions, DriverFactory(settings, driver_from_settings(settings)),
        Renderer(sessions, TemplateEngine(settings.default_locale)), settings,
    )


async def queued(sessions, req: SendRequest) -> None:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        await insert_email(s, record_from_spec(req.spec))
        await s.commit()


async def test_retry_after_the_mail_went_out_does_not_send_again(settings: Settings, sessions, sink: SmtpSink) -> None:
    acts = send_activities(settings, sessions)
    req = SendRequest(make_spec())
    await queued(sessions, req)

    first = await attempt(acts, req, 1)
    # The worker died here, before Temporal heard of the completion: the activity runs again.
    second = await attempt(acts, req, 2)

    assert len(sink.messages) == 1
    assert second.recorded and second.attempt == 1
    assert (second.provider, second.provider_message_id) == (first.provider, first.provider_message_id)
    async with sessions() as s:
        email = await s.get(Email, req.spec.email_id)
        assert email is not None and (email.status, email.attempts) == ("sent", 1)
        assert [e.event for e in await events_of(s, req.spec.email_id)] == ["queued", "sending", "sent"]
    await acts._drivers.aclose()


async def test_outcome_unknown_sends_again_with_the_same_message_id(settings: Settings, sessions, sink: SmtpSink) -> None:
    acts = send_activities(settings, sessions)
    req = SendRequest(make_spec())
    await queued(sessions, req)

    await attempt(acts, req, 1)
    # As if the worker died between the server's acceptance and the `sent` write: the record
    # still says `sending`, so nobody can know the mail went; the retry sends it again.
    async with sessions() as s:
        await (await s.connection()).execute(sa.update(Email).where(Email.id == req.spec.email_id).values(status="sending"))
        await s.commit()
    second = await attempt(acts, req, 2)

    assert second.attempt == 2
    assert [str(m.message["Message-ID"]) for m in sink.messages] == [req.spec.message_id] * 2
    async with sessions() as s:
        email = await s.get(Email, req.spec.email_id)
        assert email is not None and (email.status, email.attempts) == ("sent", 2)
    await acts._drivers.aclose()


async def test_an_attempt_that_outlived_its_run_neither_sends_nor_reopens_the_record(
    settings: Settings, sessions, sink: SmtpSink
) -> None:
    """On a starved worker an attempt can still be running when Temporal has timed it out for the
    last time and the workflow has recorded `failed` (seen under load in the fault suite: the record
    went back to `sending`). Such an attempt finds the record final and stops."""
    acts = send_activities(settings, sessions)
    for final in ("failed", "cancelled"):
        req = SendRequest(make_spec())
        await queued(sessions, req)
        async with sessions() as s:
            await (await s.connection()).execute(sa.update(Email).where(Email.id == req.spec.email_id).values(status=final))
            await s.commit()
        with pytest.raises(ApplicationError) as refused:
            await attempt(acts, req, 3)
        assert refused.value.type == EMAIL_CLOSED and refused.value.non_retryable
        async with sessions() as s:
            email = await s.get(Email, req.spec.email_id)
            assert email is not None and email.status == final
            assert [e.event for e in await events_of(s, req.spec.email_id)] == ["queued"]
    assert sink.messages == []
    await acts._drivers.aclose()


class Paused:
    """Feature flags with sending paused (the kill switch), for this activity only: the shared
    database's flags stay as they are for every other test."""

    def is_on(self, key: str, sender: str | None = None) -> bool:
        return True  # sending.paused on; every driver and users' SMTP enabled

    async def refresh(self) -> None:
        pass


async def test_a_retry_finding_sending_paused_after_its_mail_went_out_answers_with_that_delivery(
    settings: Settings, sessions, sink: SmtpSink,  # type: ignore[no-untyped-def]
) -> None:
    """The pause came between the send and Temporal hearing of it: the retry must not wait `paused`
    (and later, resumed, send again); it answers with the delivery the record holds."""
    acts = send_activities(settings, sessions)
    req, run = SendRequest(make_spec()), str(uuid.uuid4())  # a run of its own: event ids are per run and attempt
    await queued(sessions, req)
    first = await attempt(acts, req, 1, run)
    acts._flags = Paused()  # type: ignore[assignment]  # the pause came now
    second = await attempt(acts, req, 2, run)
    assert second.recorded and (second.provider, second.provider_message_id) == (first.provider, first.provider_message_id)
    assert len(sink.messages) == 1

    fresh = SendRequest(make_spec())  # one that never went: held, not an attempt
    await queued(sessions, fresh)
    with pytest.raises(ApplicationError) as held:
        await attempt(acts, fresh, 1, run)
    assert held.value.type == "SendingPaused" and "sending is paused" in held.value.message
    assert len(sink.messages) == 1
    await acts._drivers.aclose()
