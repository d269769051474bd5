"""/graphql: seed 000's API (SendEmail, SendTemplatedEmail, UpdateMailSettings, CancelScheduledEmail,
RetryFailedEmail; GetEmailStatus/History/MailSettings/Templates; OnEmailStatusChanged) over the
same service layer as REST. Resolvers only translate: each calls the service REST's route calls."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Any

import strawberry
from graphql import GraphQLError
from strawberry.types import Info

from api.graph.context import GraphContext, as_graphql_error, checked, refused, service
from api.graph.types import (
    BatchEmailInput,
    BatchItem,
    BatchResult,
    ChangeKind,
    Email,
    EmailAccepted,
    EmailConnection,
    EmailEdge,
    EmailEvent,
    EmailFilter,
    EmailStatus,
    EmailStatusChange,
    EmailStatusInfo,
    FieldError,
    Id,
    MailSettings,
    MailSettingsInput,
    PageInfo,
    SendEmailInput,
    SendTemplatedEmailInput,
    Stats,
    Template,
    TemplatePreview,
    TemplatesReloaded,
    as_body,
    email_of,
    stats_of,
    template_of,
    email_body,
    email_cursor,
    parse_email_cursor,
)
from api.metrics import RECEIVED_BY_STATUS, ApiMetrics, Received
from api.schemas.emails import BatchIn, CancelBody, EmailRequest, RescheduleBody
from api.schemas.settings import MailSettingsOut
from api.schemas.templates import PreviewIn
from api.services import emails
from api.services import events as feed
from api.services import settings as mail_settings
from api.services import stats as queue_stats
from api.services import templates
from api.services.errors import OUTSIDE, REFUSALS, ServiceError
from mailqueue.contracts import EmailStatus as EmailStatusEnum
from mailqueue.events import feed_now

log = logging.getLogger("mailqueue.api.graphql")

INFO = Info[GraphContext, Any]
# A refusal's extensions.code as the status REST would have answered (for the metrics of emails received).
_STATUS_OF_CODE = {code: status for status, code in [*REFUSALS.values(), *OUTSIDE.items()]}


def _metrics(info: INFO) -> ApiMetrics:
    return info.context.state.metrics


async def _send(info: INFO, value: Any, arg: str, templated: bool) -> EmailAccepted:
    body, key = email_body(value)
    try:
        if templated and not body.get("template"):
            raise refused(f"{arg}.template: a template name is required", "BAD_USER_INPUT",
                          fields=[{"path": [arg, "template"], "message": "a template name is required"}])
        async with service(info, arg=arg) as ctx:
            key = checked(arg, emails.check_idempotency_key, key)
            email = await emails.accept(ctx, checked(arg, EmailRequest.model_validate, body), key)
            _metrics(info).received(Received.DUPLICATE if ctx.replays else Received.ACCEPTED)
            return EmailAccepted.of(email)
    except GraphQLError as exc:
        status = _STATUS_OF_CODE.get((exc.extensions or {}).get("code", ""))
        if status in RECEIVED_BY_STATUS:  # as REST counts a refused POST /v1/emails from its answer
            _metrics(info).received(RECEIVED_BY_STATUS[status])
        raise


@strawberry.type
class Query:
    @strawberry.field(description="An email with everything about it (yours; admins: anyone's)")
    async def email(self, info: INFO, id: Id) -> Email:
        async with service(info) as ctx:
            return email_of(await emails.email_or_404(ctx, id))

    @strawberry.field(description="An email's status in brief")
    async def email_status(self, info: INFO, id: Id) -> EmailStatusInfo:
        async with service(info) as ctx:
            return EmailStatusInfo.of(await emails.email_or_404(ctx, id))

    @strawberry.field(description="An email's events, oldest first")
    async def email_history(self, info: INFO, id: Id) -> list[EmailEvent]:
        async with service(info) as ctx:
            _, events = await emails.get_email(ctx, id)
            return [EmailEvent.of(e) for e in events]

    @strawberry.field(description="Emails newest first, as GET /v1/emails filters them; `first` at most 100")
    async def emails(
        self, info: INFO, filter: EmailFilter | None = None, first: int = 20, after: str | None = None,
    ) -> EmailConnection:
        async with service(info, arg="filter") as ctx:
            if not 1 <= first <= emails.MAX_PAGE_SIZE:
                raise refused(f"first: must be 1 to {emails.MAX_PAGE_SIZE}", "BAD_USER_INPUT",
                              fields=[{"path": ["first"], "message": f"must be 1 to {emails.MAX_PAGE_SIZE}"}])
            try:
                start = parse_email_cursor(after) if after else None
            except ValueError as exc:
                raise refused(f"after: {exc}", "BAD_USER_INPUT", fields=[{"path": ["after"], "message": str(exc)}]) from None
            where = emails.EmailFilter(**as_body(filter)) if filter else emails.EmailFilter()
            if where.statuses:
                where.statuses = [EmailStatusEnum(s) for s in where.statuses]
            total, rows, more = await emails.email_slice(ctx, where, start, first)
        edges = [EmailEdge(cursor=email_cursor(e), node=email_of(e)) for e in rows]
        return EmailConnection(
            edges=edges, total_count=total,
            page_info=PageInfo(has_next_page=more, has_previous_page=start is not None,
                               start_cursor=edges[0].cursor if edges else None, end_cursor=edges[-1].cursor if edges else None),
        )

    @strawberry.field(description="Your sender settings (admins: anyone's, by userId); secrets never shown")
    async def mail_settings(self, info: INFO, user_id: strawberry.ID | None = None) -> MailSettings:
        async with service(info) as ctx:
            user, row = await mail_settings.get_mail_settings(ctx, user_id)
            return MailSettings.from_pydantic(MailSettingsOut.of(user.id, row))

    @strawberry.field(description="The current version of every template and variant")
    async def email_templates(self, info: INFO, include_inactive: bool = False) -> list[Template]:
        async with service(info) as ctx:
            return [template_of(t) for t in await templates.list_current(ctx, include_inactive)]

    @strawberry.field(description="A template's current version in a locale ('' the default), or a stored version")
    async def email_template(self, info: INFO, name: str, locale: str = "", version: int | None = None) -> Template:
        async with service(info) as ctx:
            return template_of(await templates.get(ctx, name, locale, version))

    @strawberry.field(description="A template rendered with `data` (its sample data when absent)")
    async def template_preview(
        self, info: INFO, name: str, data: strawberry.scalars.JSON | None = None, locale: str | None = None,
        version: int | None = None,
    ) -> TemplatePreview:
        async with service(info) as ctx:
            body = checked(None, PreviewIn.model_validate, {"data": data, "locale": locale, "version": version})
            return TemplatePreview.from_pydantic(await templates.preview(ctx, name, body.locale, body.version, body.data))

    @strawberry.field(description="Counts by status, queue depth, recent throughput, stuck emails")
    async def stats(self, info: INFO, stuck_after_seconds: int = queue_stats.STUCK_AFTER_SECONDS) -> Stats:
        async with service(info) as ctx:
            if not 1 <= stuck_after_seconds <= 7 * 86400:
                raise refused("stuckAfterSeconds: must be 1 to 604800", "BAD_USER_INPUT",
                              fields=[{"path": ["stuckAfterSeconds"], "message": "must be 1 to 604800"}])
            return stats_of(await queue_stats.stats(ctx, stuck_after_seconds))


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Queue an email (as POST /v1/emails)")
    async def send_email(self, info: INFO, input: SendEmailInput) -> EmailAccepted:
        return await _send(info, input, "input", templated=False)

    @strawberry.mutation(description="Queue an email made from a stored template")
    async def send_templated_email(self, info: INFO, input: SendTemplatedEmailInput) -> EmailAccepted:
        return await _send(info, input, "input", templated=True)

    @strawberry.mutation(description="Queue up to 100 emails; each is validated and answered on its own (as POST /v1/emails/batch)")
    async def send_emails(self, info: INFO, inputs: list[BatchEmailInput], all_or_nothing: bool = False) -> BatchResult:
        bodies = []
        for item in inputs:
            body, key = email_body(item.chosen())
            bodies.append(body | ({"idempotency_key": key} if key is not None else {}))
        async with service(info, arg="inputs") as ctx:
            batch = checked("inputs", BatchIn.model_validate, {"emails": bodies, "all_or_nothing": all_or_nothing})
            try:
                out = await emails.accept_batch(ctx, batch)
            except ServiceError as exc:
                _metrics(info).refused_batch(exc, len(bodies))
                raise
            _metrics(info).received_batch((item.status for item in out.items), ctx.replays)
        return BatchResult(
            accepted=out.accepted, rejected=out.rejected,
            items=[
                BatchItem(
                    index=i.index, code=i.status, id=i.id, workflow_id=i.workflow_id,
                    status=EmailStatusEnum(i.email_status) if i.email_status else None,
                    errors=[FieldError(path=[str(p) for p in d.get("loc", [])], message=str(d.get("msg", ""))) for d in i.detail or []],
                )
                for i in out.items
            ],
        )

    @strawberry.mutation(description="Replace your sender settings (admins: anyone's, by userId); secrets write-only")
    async def update_mail_settings(self, info: INFO, input: MailSettingsInput, user_id: strawberry.ID | None = None) -> MailSettings:
        async with service(info, arg="input") as ctx:
            body = checked("input", input.to_pydantic)
            user, row = await mail_settings.put_mail_settings(ctx, body, user_id)
            return MailSettings.from_pydantic(MailSettingsOut.of(user.id, row))

    @strawberry.mutation(description="Cancel a queued, scheduled, deferred or paused email")
    async def cancel_scheduled_email(self, info: INFO, id: Id, reason: str | None = None) -> Email:
        async with service(info) as ctx:
            body = checked(None, CancelBody.model_validate, {"reason": reason})
            email, _ = await emails.cancel(ctx, id, body.reason)
            return email_of(email)

    @strawberry.mutation(description="Move a scheduled email's send time")
    async def reschedule_email(self, info: INFO, id: Id, send_at: datetime) -> Email:
        async with service(info) as ctx:
            body = checked(None, RescheduleBody.model_validate, {"send_at": send_at})
            email, _ = await emails.reschedule(ctx, id, body.send_at)
            return email_of(email)

    @strawberry.mutation(description="Admins: load the templates folder (a new version of every template whose files changed)")
    async def reload_templates(self, info: INFO) -> TemplatesReloaded:
        async with service(info, admin=True) as ctx:
            return TemplatesReloaded.from_pydantic(await templates.reload(ctx))

    @strawberry.mutation(description="Deliver a failed email again (a new run of its workflow, same id and Message-ID)")
    async def retry_failed_email(self, info: INFO, id: Id) -> EmailAccepted:
        async with service(info) as ctx:
            return EmailAccepted.of(await emails.retry(ctx, id))


@strawberry.type
class Subscription:
    @strawberry.subscription(description=(
        "Status changes of your emails (or of one), from the moment of subscribing, fed by the event feed. "
        "The first message is SUBSCRIBED (with the email's status now, when emailId is given)"
    ))
    async def on_email_status_changed(
        self, info: INFO, email_id: strawberry.ID | None = None, statuses: list[EmailStatus] | None = None,  # type: ignore[valid-type]
    ) -> AsyncGenerator[EmailStatusChange, None]:
        principal = info.context.caller()
        state = info.context.state
        wanted = {EmailStatusEnum(s).value for s in statuses or ()}
        try:
            async with state.sessions() as session:
                start, before = await feed_now(session)  # what commits from now on; nothing before is replayed
            stream = await feed.open_stream(state, principal, after=str(start), last_event_id=None, types=(), email_id=email_id)
            current = None
            if email_id is not None:
                async with service(info) as ctx:
                    current = EmailStatusEnum((await emails.email_or_404(ctx, email_id)).status)
        except Exception as exc:
            raise (as_graphql_error(exc, None) or exc) from None
        yield EmailStatusChange(
            kind=ChangeKind.SUBSCRIBED, email_id=email_id, status=current, event=None, attempt=None, at=datetime.now(UTC), cursor=str(start),
            detail="changes before this message are not replayed: query email/emailHistory for them",
        )
        async for event in stream:
            if event.status is None or (wanted and event.status not in wanted) or (before is not None and event.cursor in before):
                continue
            yield EmailStatusChange(
                kind=ChangeKind.CHANGED, email_id=event.email_id, status=EmailStatusEnum(event.status), event=event.event,
                attempt=event.attempt, detail=event.detail, at=event.created_at, cursor=str(event.cursor),
            )
