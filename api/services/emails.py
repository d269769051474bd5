"""Emails: accept one or a batch, read them (each caller sees only what is theirs), cancel, retry, reschedule."""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from temporalio.client import (
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError

from api.schemas.common import named_address, normalize_address
from api.schemas.emails import (
    IDEMPOTENCY_KEY_MAX_LENGTH,
    IDEMPOTENCY_KEY_PATTERN,
    BatchIn,
    BatchItemOut,
    BatchOut,
    EmailRequest,
)
from api.services.attachments import PreparedFiles, forget_new, prepare_files, store_new
from api.services.context import Context
from api.services.errors import Conflict, FeatureOff, Invalid, LimitReached, NotFound, TooLarge, invalid
from mailqueue.accounts import Principal
from mailqueue.bounces import unsubscribe_mailto
from mailqueue.config import Settings
from mailqueue.contracts import (
    CANCEL_UPDATE,
    RESCHEDULE_UPDATE,
    CancelRequest,
    Content,
    EmailSpec,
    EmailState,
    EmailStatus,
    EventType,
    RescheduleRequest,
    SenderType,
    TemplateRef,
    cancel_refusal,
    reschedule_refusal,
    retry_refusal,
)
from mailqueue.delivery import (
    RPC_TIMEOUT,
    TemporalUnavailable,
    redelivery_spec,
    retry_settings,
    start_delivery,
)
from mailqueue.domains import FromRefused, sender_identity
from mailqueue.email_store import (
    events_of,
    insert_email,
    queued_event,
    record_from_spec,
)
from mailqueue.errors import TemplateError
from mailqueue.ids import idempotent_email_id, message_id_for, new_email_id
from mailqueue.message import bare_address, header_text_problem
from mailqueue.models import Email, EmailEvent, EmailRecipient, User, utcnow
from mailqueue.senders import (
    priorities_within,
    priority_allowed,
    recipients_cap,
    resolve_sender,
    sender_key,
)
from mailqueue.suppressions import (
    Unsubscribe,
    UnsubscribeTokens,
    dropped_detail,
    has_recipients,
    suppressed_for,
    unsubscribe_headers,
    without_suppressed,
)
from mailqueue.template_library import MissingVariables, TemplateLimitError, prepare
from mailqueue.template_store import current_template
from mailqueue.templating import is_partial
from mailqueue.usage import Window, give_back, take, used

IDEMPOTENCY_KEY_RULE = f"1 to {IDEMPOTENCY_KEY_MAX_LENGTH} printable ASCII characters, no spaces"
_EMAIL_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# --- accepting -------------------------------------------------------------------------


@dataclass
class PreparedEmail:
    """A request that passed every check, turned into its workflow input; nothing written yet."""

    spec: EmailSpec
    content: Content | None = None  # the rendered subject etc. of a templated email (Jinja only)
    body_hash: str = ""
    idempotency_key: str | None = None
    send_at: datetime | None = None
    # Recipients on the sender's suppression list, left out of what is sent (the record keeps them):
    # how many, by reason; and the spec the workflow gets (None: `spec` itself).
    dropped: Counter[str] = field(default_factory=Counter)
    delivery: EmailSpec | None = None
    files: PreparedFiles = field(default_factory=PreparedFiles)  # its attachments; the bytes of inline ones still to store


def check_idempotency_key(key: Any, loc: tuple[str, ...] = ("body", "idempotency_key")) -> str | None:
    """A batch item's (or a GraphQL input's) Idempotency-Key: the rule REST's header declares."""
    if key is not None and not (
        isinstance(key, str) and len(key) <= IDEMPOTENCY_KEY_MAX_LENGTH and re.fullmatch(IDEMPOTENCY_KEY_PATTERN, key)
    ):
        raise invalid(loc, IDEMPOTENCY_KEY_RULE)
    return key


def check_send_at(settings: Settings, send_at: datetime | None) -> None:
    if send_at is None:
        return
    now = datetime.now(UTC)
    if send_at < now - timedelta(seconds=settings.send_at_grace_seconds):
        raise invalid(("body", "send_at"), f"send_at is in the past (now is {now.isoformat(timespec='seconds')})", value=send_at.isoformat())
    if send_at > now + timedelta(days=settings.send_at_max_days):
        raise invalid(("body", "send_at"), f"send_at is more than {settings.send_at_max_days} days ahead", value=send_at.isoformat())


def _check_limits(ctx: Context, req: EmailRequest) -> None:
    settings = ctx.settings
    recipients = len(req.to) + len(req.cc) + len(req.bcc)
    if recipients > settings.max_recipients:
        raise invalid(("body", "to"), f"{recipients} recipients; at most {settings.max_recipients} are allowed per email")
    for part in ("html", "text"):
        body = getattr(req, part)
        if body is not None and len(body.encode()) > settings.max_body_bytes:
            raise invalid(("body", part), f"{part} is larger than {settings.max_body_bytes} bytes")
    if req.template_data is not None:
        size = len(json.dumps(req.template_data).encode())
        if size > settings.max_template_data_bytes:
            raise invalid(("body", "template_data"), f"template_data is {size} bytes; the limit is {settings.max_template_data_bytes}")
    check_send_at(settings, req.send_at)


async def _pin_template(ctx: Context, req: EmailRequest) -> tuple[TemplateRef, Content, str | None, str | None]:
    """Pin the template and its layouts/partials now, and prove the data renders them (422 otherwise)."""
    assert req.template is not None
    row = await current_template(ctx.session, req.template, req.locale)
    if row is None:
        raise invalid(("body", "template"), f"unknown or inactive template {req.template!r}", value=req.template)
    if is_partial(row.name):
        raise invalid(("body", "template"), f"{row.name!r} is a layout or partial; it is not sent by itself", value=req.template)
    data = req.template_data or {}
    try:
        # The worker renders the mail itself at send time; here Jinja alone proves the data fits.
        prepared = await prepare(ctx.session, ctx.templates, row, data, req.locale, finish=False)
    except MissingVariables as exc:
        raise invalid(("body", "template_data"), str(exc), type="missing_variables", missing=exc.names) from None
    except TemplateLimitError as exc:  # a render bound (string size, loops, CPU, time, memory): named in the message
        raise invalid(("body", "template_data"), f"template {row.name!r} cannot be rendered with this data: {exc}",
                      type="template_limit", limit=exc.limit) from None
    except TemplateError as exc:
        raise invalid(("body", "template_data"), f"template {row.name!r} cannot be rendered with this data: {exc}") from None
    return prepared.ref(data, req.locale), prepared.content, row.default_from, row.default_from_name


def _request_hash(req: EmailRequest) -> str:
    canonical = json.dumps(req.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _sender_identity(
    ctx: Context, req: EmailRequest, default_from: str | None, template_from: str | None, template_from_name: str | None,
) -> tuple[str, str]:
    """(the From, the Message-ID domain): the first of `from`, the sender's default_from and the
    template's, which a user may send from only in a verified domain (mailqueue/domains.py)."""
    address, source = next(
        ((a, s) for a, s in ((req.from_, "from"), (default_from, "your default_from (/v1/settings/mail)"),
                             (template_from, f"the template's default_from ({req.template})")) if a),
        (None, "from"),
    )
    sender_type, sender_id = ctx.principal.sender
    try:
        identity = await sender_identity(
            ctx.session, ctx.settings, sender_type, sender_id, address, source, normalize_address(ctx.settings.default_from),
        )
    except FromRefused as exc:
        raise invalid(("body", "from"), str(exc), value=req.from_, type="unverified_sender") from None
    from_address = identity.from_address
    if not req.from_ and template_from_name:  # the template names the sender; the address is its own or the system's
        from_address = named_address(template_from_name, bare_address(from_address))
    return from_address, identity.message_id_domain


def _check_rendered_subject(content: Content) -> None:
    """Template data lands in the subject: refused here what the schema refuses in a given one."""
    problem = header_text_problem(" ".join(content.subject.split()))  # as the worker finishes it
    if problem is not None:
        raise invalid(("body", "template_data"), f"the rendered subject must not contain {problem}", type="unsafe_subject")


def _check_features(ctx: Context, req: EmailRequest) -> None:
    """Templates and scheduling can be turned off (feature flags): new emails that need them are refused
    (503, nothing queued); emails already queued are sent as they were accepted."""
    if ctx.flags is None:
        return
    sender = sender_key(*ctx.principal.sender)
    if req.template is not None and not ctx.flags.is_on("templates.enabled", sender):
        raise FeatureOff("templated emails are turned off for now (feature flag templates.enabled); send subject/html/text, or try later")
    if req.send_at is not None and req.send_at > datetime.now(UTC) and not ctx.flags.is_on("scheduling.enabled", sender):
        raise FeatureOff("scheduled emails are turned off for now (feature flag scheduling.enabled); send without send_at, or try later")


async def prepare_email(ctx: Context, req: EmailRequest, idempotency_key: str | None) -> PreparedEmail:
    """Validate beyond the schema (limits, template and its data, sender) and build the spec: the 422s come from here."""
    _check_limits(ctx, req)
    _check_features(ctx, req)
    template_ref = content = template_from = template_from_name = None
    if req.template is not None:
        template_ref, content, template_from, template_from_name = await _pin_template(ctx, req)
    sender_type, sender_id = ctx.principal.sender
    route = await resolve_sender(ctx.session, ctx.settings, sender_type, sender_id)
    from_address, message_id_domain = await _sender_identity(ctx, req, route.default_from, template_from, template_from_name)
    if content is not None:
        _check_rendered_subject(content)

    email_id = idempotent_email_id(sender_type, sender_id, idempotency_key) if idempotency_key else new_email_id()
    files = await prepare_files(ctx, req.attachments, email_id)
    related = req.related_entity
    spec = EmailSpec(
        email_id=email_id,
        message_id=message_id_for(email_id, message_id_domain),
        from_address=from_address,
        to=req.to,
        cc=req.cc,
        bcc=req.bcc,
        reply_to=req.reply_to,
        content=None if template_ref else Content(subject=req.subject or "", html=req.html, text=req.text),
        template=template_ref,
        headers=req.headers,
        send_at=req.send_at,
        retry=retry_settings(ctx.settings, req.max_attempts, route),
        priority=_within_ceiling(ctx, str(req.priority), route.max_priority),
        tags=req.tags,
        metadata=req.metadata,
        related_entity_type=related.type if related else None,
        related_entity_id=related.id if related else None,
        sender_type=sender_type,
        sender_id=sender_id,
        send_queue=route.send_queue,
        recorded=True,  # the record and its `queued` event are written before the workflow starts
        attachments=files.refs,
    )
    if req.wants_unsubscribe:
        spec = replace(spec, headers={**spec.headers, **_unsubscribe_headers(ctx, req, sender_key(sender_type, sender_id), email_id)})
    prepared = PreparedEmail(spec, content, _request_hash(req), idempotency_key, req.send_at, files=files)
    found = await suppressed_for(ctx.session, spec)
    if found:
        prepared.delivery, prepared.dropped = without_suppressed(spec, found)
    return prepared


def _unsubscribe_headers(ctx: Context, req: EmailRequest, sender: str, email_id: str) -> dict[str, str]:
    """List-Unsubscribe (RFC 8058 one-click) for the email's one recipient. One message goes to all
    of an email's recipients, and a link names one of them: hence exactly one, in `to`. With a bounce
    domain, a mailto (RFC 2369) follows the link: mail to it from that recipient unsubscribes them
    (mailqueue/bounce_server.py)."""
    loc = ("body", "unsubscribe")
    if len(req.to) != 1 or req.cc or req.bcc:
        raise invalid(loc, "an email with an unsubscribe link (unsubscribe: true, or category marketing) goes to exactly "
                      "one recipient, in `to`: the link unsubscribes that recipient. Send one email per recipient (POST /v1/emails/batch)")
    if ctx.settings.public_url is None:
        raise invalid(loc, "this server has no public URL (MAILQUEUE_PUBLIC_URL) for unsubscribe links; ask its operator")
    given = sorted(name for name in req.headers if name.lower() in ("list-unsubscribe", "list-unsubscribe-post"))
    if given:
        raise invalid(("body", "headers"), f"give either the {' and '.join(given)} header or unsubscribe/category marketing, not both")
    token = UnsubscribeTokens.from_settings(ctx.settings).make(Unsubscribe(sender, bare_address(req.to[0]), req.category))
    domain = ctx.settings.bounce_domain
    return unsubscribe_headers(ctx.settings.public_url, token, unsubscribe_mailto(email_id, domain) if domain else None)


async def commit_email(ctx: Context, prepared: PreparedEmail) -> Email:
    """Write the record, then start the workflow. Conflict: the Idempotency-Key was used with another
    request; TemporalUnavailable: not accepted (the new record is removed again, so an accepted
    email always has its workflow)."""
    session = ctx.session
    spec, key = prepared.spec, prepared.idempotency_key
    email_id = spec.email_id
    email = await session.get(Email, email_id) if key else None
    created = email is None
    if email is None:
        email = record_from_spec(spec, idempotency_key=key, request_hash=prepared.body_hash)
        if prepared.content is not None:
            email.subject = prepared.content.subject  # as rendered at acceptance, for people reading the record
        if prepared.send_at is not None and prepared.send_at > datetime.now(UTC):
            email.status = EmailStatus.SCHEDULED.value
        if prepared.delivery is not None and not has_recipients(prepared.delivery):
            email.status = EmailStatus.SUPPRESSED.value  # final: no workflow is started for it
        try:
            await store_new(ctx, prepared.files)
            await insert_email(session, email)
            if prepared.dropped:
                session.add(_suppressed_event(email, prepared.dropped))
            await session.commit()
        except IntegrityError:  # the same key, at the same moment, from another request
            await session.rollback()
            email = await session.get(Email, email_id)
            created = False
            if email is None:
                raise
    if not created and email.request_hash != prepared.body_hash:
        raise Conflict("this Idempotency-Key was used with a different request body")

    await session.commit()  # never hold a database transaction while waiting on Temporal
    if email.status == EmailStatus.SUPPRESSED:  # every recipient suppressed: recorded, nothing to deliver
        if not created:
            ctx.replays += 1
        return email
    try:
        await start_delivery(
            ctx.temporal, prepared.delivery or spec, ctx.settings.task_queue, WorkflowIDReusePolicy.REJECT_DUPLICATE,
            searchable=ctx.settings.search_attributes,
        )
    except WorkflowAlreadyStartedError:
        pass  # a repeated request: the first one started it
    except TemporalUnavailable:
        if created:  # not durably accepted: leave no record behind that nothing will ever send
            await (await session.connection()).execute(sa.delete(Email.__table__).where(Email.__table__.c.id == email_id))  # type: ignore[attr-defined]
            await session.commit()
            await forget_new(ctx, prepared.files)
        raise
    if not created:
        ctx.replays += 1  # an Idempotency-Key replay: the email it names, nothing new queued
    return email


def _suppressed_event(email: Email, dropped: Counter[str]) -> EmailEvent:
    """Recipients left out at the door; with none left, the email's end. Counts and reasons only."""
    final = email.status == EmailStatus.SUPPRESSED.value
    return EmailEvent(
        id=str(uuid.uuid4()), email_id=email.id, event=EventType.SUPPRESSED.value,
        status=EmailStatus.SUPPRESSED.value if final else None, attempt=0,
        detail=dropped_detail(dropped) + ("; nothing to send" if final else ""),
    )


# --- volume limits: the priority ceiling and recipients per hour -----------------------------


def _within_ceiling(ctx: Context, priority: str, ceiling: str) -> str:
    """The priority asked for, if the caller may ask for it: admins (and the bootstrap key) may ask for any."""
    if not ctx.principal.is_admin and not priority_allowed(priority, ceiling):
        raise invalid(
            ("body", "priority"),
            f"priority {priority} is above your ceiling of {ceiling}: ask for {priorities_within(ceiling)} (an admin can raise it)",
            value=priority,
        )
    return priority


@dataclass
class CountedRecipients:
    """Recipients counted against a user's hourly cap, by email: an email that is not queued after
    all (409, 503) gives its count back."""

    sender: str
    window: str
    by_email: dict[str, int]


def _recipients(spec: EmailSpec) -> int:
    return len(spec.to) + len(spec.cc) + len(spec.bcc)


async def _count_recipients(ctx: Context, emails: Sequence[PreparedEmail]) -> CountedRecipients | None:
    """Count these emails' recipients against their user's cap for this hour, all or none: committed
    at once (any API process, racing requests: the counter in sender_usage decides), or LimitReached.

    Counted when accepted, scheduled ones included. An email already recorded under its
    Idempotency-Key (a replay) counts nothing. Two identical requests racing with one new key may
    both count: on the safe side."""
    if not emails or emails[0].spec.sender_type != SenderType.USER:
        return None  # the system (bootstrap key) has no cap
    session, spec = ctx.session, emails[0].spec
    cap = recipients_cap(ctx.settings, await session.get(User, spec.sender_id))
    if not cap:
        return None
    by_email = {
        p.spec.email_id: _recipients(p.spec) for p in emails
        if not (p.idempotency_key and await session.get(Email, p.spec.email_id) is not None)
    }
    n = sum(by_email.values())
    if not n:
        return None
    now = time.time()
    window = Window.at("r", now, ctx.settings.quota_hour_seconds)
    sender = sender_key(SenderType.USER, spec.sender_id)
    connection = await session.connection()
    if await take(connection, sender, window.key, n, cap):
        await session.commit()
        return CountedRecipients(sender, window.key, by_email)
    so_far = await used(connection, sender, window.key)
    await session.commit()
    wait = max(1, math.ceil(window.ends - now))
    raise LimitReached(
        f"recipient limit reached: {cap} recipients (to, cc and bcc) may be queued per hour and {so_far} have been "
        f"this hour; this would add {n}. Try again in {wait} s (Retry-After), or ask an admin to raise recipients_per_hour",
        retry_after=wait,
    )


async def _commit_counted(ctx: Context, prepared: PreparedEmail, counted: CountedRecipients | None) -> Email:
    """commit_email; the email's counted recipients are given back when it is not queued after all."""
    try:
        return await commit_email(ctx, prepared)
    except (Conflict, TemporalUnavailable):
        n = counted.by_email.pop(prepared.spec.email_id, 0) if counted else 0
        if counted and n:
            await give_back(await ctx.session.connection(), counted.sender, counted.window, n)
            await ctx.session.commit()
        raise


async def accept(ctx: Context, req: EmailRequest, idempotency_key: str | None = None) -> Email:
    """Queue one email: a record and its workflow, or an error and nothing."""
    prepared = await prepare_email(ctx, req, idempotency_key)
    return await _commit_counted(ctx, prepared, await _count_recipients(ctx, [prepared]))


async def accept_batch(ctx: Context, body: BatchIn) -> BatchOut:
    """Each email validated and answered on its own; with `all_or_nothing`, one invalid email queues none
    (and a batch over the recipients cap: 429). Otherwise the emails that would pass the cap get 429 each."""
    results: list[BatchItemOut | None] = [None] * len(body.emails)
    ready: list[tuple[int, PreparedEmail]] = []
    for index, item in enumerate(body.emails):
        try:
            key = check_idempotency_key(item.pop("idempotency_key", None) if isinstance(item, dict) else None)
            req = EmailRequest.model_validate(item)
            ready.append((index, await prepare_email(ctx, req, key)))
        except (ValidationError, Invalid) as exc:
            status = 413 if isinstance(exc, TooLarge) else 422
            results[index] = BatchItemOut(index=index, status=status, detail=_item_errors(exc.errors()))
        except FeatureOff as exc:
            results[index] = BatchItemOut(index=index, status=503, detail=[{"msg": str(exc.detail)}])
    rejected = [r for r in results if r is not None]
    if body.all_or_nothing and rejected:
        raise Invalid({
            "msg": f"{len(rejected)} of {len(body.emails)} emails are invalid; nothing was queued (all_or_nothing)",
            "items": [r.model_dump(exclude_none=True) for r in rejected],
        })
    counted = await _count_recipients(ctx, [p for _, p in ready]) if body.all_or_nothing else None
    for index, prepared in ready:
        try:
            email = await _commit_counted(ctx, prepared, counted if body.all_or_nothing else await _count_recipients(ctx, [prepared]))
            results[index] = BatchItemOut(index=index, status=202, id=email.id, workflow_id=email.workflow_id, email_status=email.status)
        except LimitReached as exc:
            results[index] = BatchItemOut(index=index, status=429, detail=[{"msg": str(exc.detail), "retry_after": exc.retry_after}])
        except Conflict as exc:
            results[index] = BatchItemOut(index=index, status=409, detail=[{"msg": str(exc.detail)}])
        except TemporalUnavailable:
            results[index] = BatchItemOut(index=index, status=503, detail=[{"msg": "Temporal is unavailable; this email was not queued, send it again"}])
    items = [r for r in results if r is not None]
    return BatchOut(items=items, accepted=sum(r.status == 202 for r in items), rejected=sum(r.status != 202 for r in items))


def _item_errors(errors: Any) -> list[dict[str, Any]]:
    """Field errors as JSON (no exception objects in `ctx`), with `body` and the item's place dropped."""
    out = []
    for error in errors:
        loc = [part for part in error.get("loc", ()) if part != "body"]
        out.append({"type": error.get("type"), "loc": loc, "msg": error.get("msg"),
                    **({"missing": error["missing"]} if "missing" in error else {})})
    return out


# --- reading ---------------------------------------------------------------------------


def visible_to(principal: Principal) -> list[Any]:
    """SQL filters for the emails a caller may see: a user only their own; admins all."""
    if principal.is_admin:
        return []
    return [col(Email.sender_type) == SenderType.USER.value, col(Email.sender_id) == principal.id]


async def email_or_404(ctx: Context, email_id: str) -> Email:
    email = await ctx.session.get(Email, email_id) if _EMAIL_ID.match(email_id) else None
    if email is not None and not ctx.principal.may_see(email.sender_type, email.sender_id):
        email = None  # someone else's email: as unknown as one that does not exist
    if email is None:
        raise NotFound(f"no email with id {email_id!r}")
    return email


async def get_email(ctx: Context, email_id: str) -> tuple[Email, Sequence[EmailEvent]]:
    """An email with its events, oldest first."""
    email = await email_or_404(ctx, email_id)
    return email, await events_of(ctx.session, email.id)


@dataclass
class EmailFilter:
    """Which emails to list (all of them given: every condition holds)."""

    statuses: list[EmailStatus] | None = None
    recipient: str | None = None  # any of to/cc/bcc
    template: str | None = None
    related_entity_type: str | None = None
    related_entity_id: str | None = None
    tag: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


# The largest page of emails a caller may ask for (REST's page_size, GraphQL's `first`).
MAX_PAGE_SIZE = 100


def _matching(ctx: Context, where: EmailFilter) -> list[Any]:
    """SQL conditions for the emails `where` names among those the caller may see (tags aside: JSON, filtered in Python)."""
    filters: list[Any] = visible_to(ctx.principal)
    if where.statuses:
        filters.append(col(Email.status).in_([s.value for s in where.statuses]))
    if where.recipient:
        try:
            address = bare_address(normalize_address(where.recipient)).lower()
        except ValueError as exc:
            raise invalid(("query", "recipient"), str(exc), value=where.recipient) from None
        filters.append(
            sa.exists().where(col(EmailRecipient.email_id) == col(Email.id), col(EmailRecipient.address) == address)
        )
    if where.template:
        filters.append(col(Email.template_name) == where.template)
    if where.related_entity_type:
        filters.append(col(Email.related_entity_type) == where.related_entity_type)
    if where.related_entity_id:
        filters.append(col(Email.related_entity_id) == where.related_entity_id)
    for name, bound in (("created_after", where.created_after), ("created_before", where.created_before)):
        if bound is not None and bound.tzinfo is None:
            raise invalid(("query", name), "needs a time zone", value=str(bound))
        if bound is not None:
            try:
                bound.astimezone(UTC)  # compared in UTC: 0001-01-01T00:00+01:00 is before the first UTC instant
            except OverflowError:
                raise invalid(("query", name), "out of range in UTC", value=str(bound)) from None
    if where.created_after:
        filters.append(col(Email.created_at) >= where.created_after)
    if where.created_before:
        filters.append(col(Email.created_at) < where.created_before)
    return filters


_NEWEST_FIRST = (col(Email.created_at).desc(), col(Email.id).desc())


async def list_emails(ctx: Context, where: EmailFilter, page: int, page_size: int) -> tuple[int, Sequence[Email]]:
    """(how many match, one page of them), newest first."""
    session = ctx.session
    filters = _matching(ctx, where)
    query = select(Email).where(*filters).order_by(*_NEWEST_FIRST)
    if where.tag:
        rows = (await session.exec(query)).all()
        matching = [e for e in rows if where.tag in e.tags]  # tags are JSON: filtered here, portable across databases
        return len(matching), matching[(page - 1) * page_size : page * page_size]
    total = (await session.exec(select(sa.func.count()).select_from(Email).where(*filters))).one()
    items = (await session.exec(query.offset((page - 1) * page_size).limit(page_size))).all()
    return total, items


@dataclass(frozen=True)
class EmailsAfter:
    """Where a slice of the newest-first list goes on from: the last email seen (its created_at and id)."""

    created_at: datetime
    id: str


async def email_slice(ctx: Context, where: EmailFilter, after: EmailsAfter | None, first: int) -> tuple[int, Sequence[Email], bool]:
    """(how many match, the first `first` of them after `after`, whether more follow), newest first:
    a page that stays put while emails are added (GraphQL's `emails` connection)."""
    session = ctx.session
    filters = _matching(ctx, where)
    later = [] if after is None else [
        sa.or_(col(Email.created_at) < after.created_at, sa.and_(col(Email.created_at) == after.created_at, col(Email.id) < after.id))
    ]
    query = select(Email).where(*filters, *later).order_by(*_NEWEST_FIRST)
    if where.tag:
        rows = [e for e in (await session.exec(query)).all() if where.tag in e.tags]
        total = sum(where.tag in tags for tags in (await session.exec(select(Email.tags).where(*filters))).all())
    else:
        rows = list((await session.exec(query.limit(first + 1))).all())
        total = (await session.exec(select(sa.func.count()).select_from(Email).where(*filters))).one()
    return total, rows[:first], len(rows) > first


# --- changing ----------------------------------------------------------------------------


async def _update(ctx: Context, email: Email, name: str, arg: Any, refusal: Callable[[str], str | None]) -> EmailState:
    """Ask the email's workflow (the one that knows its true state) to change; its validator may say no."""
    # End the read transaction first: the workflow's own audit step must be able to write
    # (SQLite has one writer) while we wait for the update.
    await ctx.session.commit()
    handle = ctx.temporal.get_workflow_handle(email.workflow_id)
    try:
        return await handle.execute_update(name, arg, result_type=EmailState, rpc_timeout=RPC_TIMEOUT)
    except WorkflowUpdateFailedError as exc:  # the workflow's validator said no
        cause = exc.cause
        raise Conflict(cause.message if isinstance(cause, ApplicationError) else str(cause)) from None
    except RPCError as exc:
        if "already completed" in exc.message or "not found" in exc.message.lower():
            await ctx.session.refresh(email)  # its run has ended: the record says how, or soon will
            why = refusal(email.status) or f"the email's delivery run has ended; the record says {email.status}"
            raise Conflict(why) from None
        raise TemporalUnavailable(exc.message) from exc
    except (WorkflowUpdateRPCTimeoutOrCancelledError, RuntimeError) as exc:
        raise TemporalUnavailable(str(exc)) from exc


def _cancel_refusal(status: str) -> str | None:
    return cancel_refusal(EmailStatus(status))


async def cancel(ctx: Context, email_id: str, reason: str | None) -> tuple[Email, Sequence[EmailEvent]]:
    """Cancel an email its workflow has not handed to the send step yet (queued, scheduled, deferred)."""
    email = await email_or_404(ctx, email_id)
    if EmailStatus(email.status).is_final:  # its run has ended: no need to ask
        raise Conflict(_cancel_refusal(email.status))
    state = await _update(ctx, email, CANCEL_UPDATE, CancelRequest(reason=reason), _cancel_refusal)
    if state.status is not EmailStatus.CANCELLED:
        raise Conflict(f"the email could not be cancelled: it is {state.status.value}")
    await ctx.session.refresh(email)
    return email, await events_of(ctx.session, email.id)


async def retry(ctx: Context, email_id: str) -> Email:
    """Deliver a failed email again: a new run of its workflow, same id and Message-ID."""
    session, settings = ctx.session, ctx.settings
    email = await email_or_404(ctx, email_id)
    refusal = retry_refusal(EmailStatus(email.status))
    if refusal:
        raise Conflict(refusal)
    spec = await redelivery_spec(session, settings, email)
    # Written before the new run starts, so it can never overwrite the run's own steps.
    email.status, email.attempts, email.updated_at = EmailStatus.QUEUED.value, 0, utcnow()
    event = queued_event(email.id, "retry requested")
    session.add(event)
    await session.commit()
    try:
        await start_delivery(
            ctx.temporal, spec, settings.task_queue, WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            searchable=settings.search_attributes,
        )
    except (WorkflowAlreadyStartedError, TemporalUnavailable) as exc:
        email.status = EmailStatus.FAILED.value
        await session.delete(event)
        await session.commit()
        if isinstance(exc, WorkflowAlreadyStartedError):
            raise Conflict("a delivery run of this email is still open; try again shortly") from None
        raise
    return email


async def reschedule(ctx: Context, email_id: str, send_at: datetime) -> tuple[Email, Sequence[EmailEvent]]:
    """Move a scheduled email's send time."""
    check_send_at(ctx.settings, send_at)
    email = await email_or_404(ctx, email_id)
    refusal = reschedule_refusal(EmailStatus(email.status))
    if refusal:
        raise Conflict(refusal)
    await _update(ctx, email, RESCHEDULE_UPDATE, RescheduleRequest(send_at=send_at.astimezone(UTC)), reschedule_refusal)
    await ctx.session.refresh(email)
    return email, await events_of(ctx.session, email.id)
