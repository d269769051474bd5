"""Provider events in: each request verified (mailqueue/inbound.py), then each of its events
recorded (mailqueue/feedback.py). The routes map the refusals to HTTP.

The operator's routes verify with the operator's keys and record events of any sender's emails; a
user's routes (`user_keys`) verify with that user's keys and record events of that user's emails only."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel.ext.asyncio.session import AsyncSession

from api.schemas.inbound import InboundResult
from mailqueue import inbound
from mailqueue.config import Settings
from mailqueue.contracts import SenderType
from mailqueue.crypto import SecretBox
from mailqueue.feedback import record_feedback
from mailqueue.models import InboundToken, SenderSettings
from mailqueue.senders import sender_key

log = logging.getLogger("mailqueue.inbound")


async def user_keys(session: AsyncSession, settings: Settings, user_id: str, secrets: SecretBox | None = None) -> tuple[inbound.Keys, str]:
    """A user's keys (none for an unknown user: refused like a user without them) and their sender
    key, which limits what the events may touch to their own emails. `secrets`: Mailgun's route only."""
    row = await session.get(SenderSettings, user_id)
    return inbound.Keys.of_sender(row, settings, secrets), sender_key(SenderType.USER, user_id)


async def _record(session: AsyncSession, source: str, batch: inbound.Batch, sender: str | None) -> InboundResult:
    result = InboundResult(ignored=batch.ignored)
    for feedback in batch.events:
        recorded = await record_feedback(session, feedback, sender=sender)
        if recorded is None:
            result.unknown += 1
        elif recorded.duplicate:
            result.duplicates += 1
        else:
            result.recorded += 1
    log.info("%s events%s: %d recorded, %d duplicates, %d unknown, %d ignored", source, f" for {sender}" if sender else "",
             result.recorded, result.duplicates, result.unknown, result.ignored)
    return result


async def ses(
    session: AsyncSession, keys: inbound.Keys, certificates: inbound.SnsCertificates, body: bytes, sender: str | None = None,
) -> InboundResult:
    message = await inbound.verify_sns(body, keys, certificates)
    if message.Type == "SubscriptionConfirmation":
        await certificates.confirm(message.SubscribeURL or "")
        log.info("SNS subscription to %s confirmed", message.TopicArn)
        return InboundResult(confirmed=True)
    if message.Type == "UnsubscribeConfirmation":
        log.warning("SNS: this endpoint was unsubscribed from %s; SES events of that topic stop coming", message.TopicArn)
        return InboundResult()
    return await _record(session, inbound.SES, inbound.ses_events(message), sender)


async def sendgrid(
    session: AsyncSession, keys: inbound.Keys, body: bytes, signature: str | None, timestamp: str | None, sender: str | None = None,
) -> InboundResult:
    inbound.verify_sendgrid(body, signature, timestamp, keys)
    return await _record(session, inbound.SENDGRID, inbound.sendgrid_events(body), sender)


async def _remember(session: AsyncSession, digest: str, keep: timedelta) -> None:
    """Note a token as used (every API process shares the table); a token noted before is a replay.
    Tokens older than `keep` go: their requests are refused as stale anyway."""
    now = datetime.now(UTC)
    tokens = InboundToken.__table__  # type: ignore[attr-defined]
    try:
        await session.execute(sa.insert(tokens).values(digest=digest, seen_at=now))
        await session.execute(sa.delete(tokens).where(tokens.c.seen_at < now - keep))
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise inbound.Replayed("this signed token was used before (a replayed request)") from None


async def _forget(session: AsyncSession, digest: str) -> None:
    await session.rollback()
    tokens = InboundToken.__table__  # type: ignore[attr-defined]
    await session.execute(sa.delete(tokens).where(tokens.c.digest == digest))
    await session.commit()


async def mailgun(session: AsyncSession, keys: inbound.Keys, body: bytes, sender: str | None = None) -> InboundResult:
    hook, digest = inbound.verify_mailgun(body, keys)
    # Kept for the window a signed timestamp is accepted in, either side of now.
    await _remember(session, digest, keys.max_age + 2 * inbound.CLOCK_SKEW)
    try:
        return await _record(session, inbound.MAILGUN, inbound.mailgun_events(hook), sender)
    except BaseException:
        # Not recorded (the database went away, say): Mailgun's retry of this request must not be a "replay".
        try:
            await _forget(session, digest)
        except Exception:  # noqa: BLE001 - the first error is the one to report
            log.warning("mailgun: could not forget the token of a request that failed")
        raise


# --- a user's own provider account: their keys, their emails -------------------------------------


async def user_ses(
    session: AsyncSession, settings: Settings, certificates: inbound.SnsCertificates, user_id: str, body: bytes,
) -> InboundResult:
    keys, sender = await user_keys(session, settings, user_id)
    return await ses(session, keys, certificates, body, sender)


async def user_sendgrid(
    session: AsyncSession, settings: Settings, user_id: str, body: bytes, signature: str | None, timestamp: str | None,
) -> InboundResult:
    keys, sender = await user_keys(session, settings, user_id)
    return await sendgrid(session, keys, body, signature, timestamp, sender)


async def user_mailgun(session: AsyncSession, settings: Settings, secrets: SecretBox, user_id: str, body: bytes) -> InboundResult:
    keys, sender = await user_keys(session, settings, user_id, secrets)  # the stored signing key decrypted here, kept in memory only
    return await mailgun(session, keys, body, sender)
