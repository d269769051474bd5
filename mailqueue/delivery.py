"""Starting an email's delivery in Temporal: shared by the API (accept, retry) and the reconciler (restart)."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client
from temporalio.common import Priority, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from mailqueue import search
from mailqueue.config import Settings
from mailqueue.contracts import SEND_EMAIL_WORKFLOW, EmailSpec, RetrySettings, SenderType, priority_key, workflow_id_for
from mailqueue.drivers.base import DriverName
from mailqueue.email_store import spec_from_record
from mailqueue.models import Email
from mailqueue.senders import SenderRoute, resolve_sender

log = logging.getLogger("mailqueue.delivery")

RPC_TIMEOUT = timedelta(seconds=10)


class TemporalUnavailable(Exception):
    """Temporal did not answer: the caller should try again later (HTTP 503)."""


def retry_settings(settings: Settings, max_attempts: int | None, route: SenderRoute | None = None) -> RetrySettings:
    """The send step's retry policy for an email that leaves through `route` (None: the system's)."""
    return RetrySettings(
        max_attempts=max_attempts or settings.default_max_attempts,
        initial_interval_seconds=settings.retry_initial_interval_seconds,
        backoff_coefficient=settings.retry_backoff_coefficient,
        maximum_interval_seconds=settings.retry_maximum_interval_seconds,
        send_timeout_seconds=settings.send_timeout_seconds,
        unreachable_wait_seconds=unreachable_wait(settings, route),
    )


def unreachable_wait(settings: Settings, route: SenderRoute | None) -> float:
    """How long an unreachable server is waited for. The system's relay and the providers are
    worth hours (an outage delays mail instead of failing it); a user's own SMTP server gets
    user_unreachable_wait_seconds: it may be a typo, or a host that was never a mail server,
    and a long wait keeps the workflow knocking on it."""
    if route is not None and route.driver is DriverName.USER_SMTP:
        return settings.user_unreachable_wait_seconds
    return settings.unreachable_wait_seconds


async def redelivery_spec(session: AsyncSession, settings: Settings, email: Email) -> EmailSpec:
    """The workflow input that delivers a recorded email again (a retry, the reconciler's restart):
    same id and Message-ID, the record already written, the sender's queue as its settings say now."""
    route = await resolve_sender(session, settings, SenderType(email.sender_type), email.sender_id)
    spec = spec_from_record(email, retry_settings(settings, email.max_attempts, route))
    spec.recorded = True
    spec.send_queue = route.send_queue
    return spec


async def start_delivery(
    temporal: Client, spec: EmailSpec, task_queue: str, reuse: WorkflowIDReusePolicy, *, searchable: bool = True
) -> None:
    """Start the email's workflow. `searchable`: with its search attributes, which the workflow then
    keeps up to date (MAILQUEUE_SEARCH_ATTRIBUTES), and in any case with its summary for the UI."""
    try:
        await temporal.start_workflow(
            SEND_EMAIL_WORKFLOW,
            spec,
            id=workflow_id_for(spec.email_id),
            task_queue=task_queue,
            id_reuse_policy=reuse,
            rpc_timeout=RPC_TIMEOUT,
            # Ordered by the server: with a backlog, high before normal before low. Activities inherit it.
            priority=Priority(priority_key=priority_key(spec.priority)),
            search_attributes=search.initial(spec) if searchable else None,
            static_summary=search.summary(spec),
            static_details=search.details(spec),
        )
    except WorkflowAlreadyStartedError:
        raise
    except RPCError as exc:
        if exc.status is RPCStatusCode.INVALID_ARGUMENT and "search attribute" in exc.message.lower():
            log.error(
                "Temporal refused the email's search attributes (%s): start a worker, which adds them, or see the "
                "README's 'Operating it'; MAILQUEUE_SEARCH_ATTRIBUTES=false runs without them", exc.message,
            )
        raise TemporalUnavailable(str(exc)) from exc
    except RuntimeError as exc:
        raise TemporalUnavailable(str(exc)) from exc

