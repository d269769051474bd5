"""Typed inputs and outputs of the email workflow and its activities.

Pure data with no I/O: the workflow sandbox imports this module, and every field here
ends up in workflow histories, so nothing secret may ever be added to these types.
Add fields with defaults only: recorded histories must keep decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

WORKFLOW_ID_PREFIX = "email-"


def workflow_id_for(email_id: str) -> str:
    return f"{WORKFLOW_ID_PREFIX}{email_id}"


def priority_key(priority: str) -> int:
    """Temporal's priority key (1 first … 5 last) for an email's priority: high/normal/low, or 1–10 (1 highest)."""
    named = {"high": 1, "normal": 3, "low": 5}
    if priority in named:
        return named[priority]
    return (min(max(int(priority), 1), 10) + 1) // 2 if priority.isdigit() else 3


def send_queue_name(task_queue: str, driver: str) -> str:
    """The task queue of one driver's rate-limited sends."""
    return f"{task_queue}.{driver}"


class SenderType(StrEnum):
    """Who an email is sent as: the system (the bootstrap key) or one user (with their own settings)."""

    SYSTEM = "system"
    USER = "user"


class EmailStatus(StrEnum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    DEFERRED = "deferred"  # over the sender's hourly/daily limit: waits for the window to open
    SENDING = "sending"
    RETRYING = "retrying"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SUPPRESSED = "suppressed"  # every recipient is on the sender's suppression list: nothing was sent
    PAUSED = "paused"  # at its send step while sending is paused (the kill switch, or its driver turned off): waits
    # After "sent": what the receiving side said later (mailqueue/feedback.py). A record only moves
    # up this order (sent < delivered < bounced < complained), never back.
    DELIVERED = "delivered"
    BOUNCED = "bounced"  # a hard bounce (soft bounces are events only)
    COMPLAINED = "complained"

    @property
    def is_final(self) -> bool:
        return self in FINAL

    @property
    def is_cancellable(self) -> bool:
        return self in CANCELLABLE


# The status groups: the one home of "which statuses are alike", for the workflow's validators,
# the API, the stats and the reconciler.
# Waiting on purpose (for send_at, or for a quota window): not stuck however long they wait.
WAITING = frozenset({EmailStatus.SCHEDULED, EmailStatus.DEFERRED, EmailStatus.PAUSED})
# On their way: a record that stays here unchanged for long is stuck.
IN_FLIGHT = frozenset({EmailStatus.QUEUED, EmailStatus.SENDING, EmailStatus.RETRYING})
# Not handed to the send step yet: cancel still stops them.
CANCELLABLE = frozenset({EmailStatus.QUEUED, EmailStatus.SCHEDULED, EmailStatus.DEFERRED, EmailStatus.PAUSED})
# Went out: the send step delivered it to the server or provider; what came back later may move it on.
WENT_OUT = frozenset({EmailStatus.SENT, EmailStatus.DELIVERED, EmailStatus.BOUNCED, EmailStatus.COMPLAINED})
# Ended: nothing changes them but a retry (failed ones only) or, once out, the receiving side's word.
FINAL = WENT_OUT | {EmailStatus.FAILED, EmailStatus.CANCELLED, EmailStatus.SUPPRESSED}


def status_values(group: frozenset[EmailStatus]) -> list[str]:
    """A group's statuses as stored in the records, in a fixed order (for SQL)."""
    return sorted(s.value for s in group)


def cancel_refusal(status: EmailStatus) -> str | None:
    """Why an email in `status` cannot be cancelled (None: it can)."""
    if status in CANCELLABLE:
        return None
    return f"the email is already {status.value}; only queued, scheduled, deferred or paused emails can be cancelled"


def reschedule_refusal(status: EmailStatus | str) -> str | None:
    """Why an email in `status` cannot be rescheduled (None: it can). `status` may also say "being cancelled"."""
    if status == EmailStatus.SCHEDULED:
        return None
    return f"only scheduled emails can be rescheduled; this one is {status}"


def retry_refusal(status: EmailStatus) -> str | None:
    """Why an email in `status` cannot be delivered again (None: it can)."""
    if status == EmailStatus.FAILED:
        return None
    return f"only failed emails can be retried; this one is {status.value}"


class EventType(StrEnum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    RESCHEDULED = "rescheduled"
    DEFERRED = "deferred"
    SENDING = "sending"
    RETRYING = "retrying"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CANCEL_REJECTED = "cancel_rejected"
    RECONCILED = "reconciled"  # set right from Temporal's state by the reconciler
    SUPPRESSED = "suppressed"  # recipients dropped: on the sender's suppression list (mailqueue/suppressions.py)
    PAUSED = "paused"  # reached its send step while sending was paused: waits (mailqueue/flags.py)
    # What the receiving side said after "sent" (mailqueue/feedback.py): provider events, DSNs, unsubscribes.
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    COMPLAINED = "complained"
    UNSUBSCRIBED = "unsubscribed"


@dataclass
class RetrySettings:
    """The send step's Temporal retry policy, fixed when the email is accepted."""

    max_attempts: int = 3
    initial_interval_seconds: float = 2.0
    backoff_coefficient: float = 2.0
    maximum_interval_seconds: float = 600.0
    send_timeout_seconds: float = 60.0
    # How long the workflow waits for a server that cannot be reached (SERVER_UNREACHABLE):
    # that waiting uses up no attempt. 0: an unreachable server is an ordinary failed attempt.
    unreachable_wait_seconds: float = 21600.0


@dataclass
class Content:
    subject: str
    html: str | None = None
    text: str | None = None


@dataclass
class TemplatePin:
    """One exact template version: a layout or partial an email's template uses."""

    name: str
    version: int
    locale: str = ""


@dataclass
class TemplateRef:
    """The template an email renders, pinned when it was queued: edits never change it."""

    name: str
    version: int
    locale: str | None = None  # the variant that was picked ("" / None: the default one)
    data: dict[str, Any] = field(default_factory=dict)
    dependencies: list[TemplatePin] = field(default_factory=list)  # layouts and partials, pinned too
    format_locale: str | None = None  # the locale the caller asked for: dates, numbers, money


@dataclass
class AttachmentRef:
    """One attachment of an email, by reference: its bytes are in the blob store (mailqueue/blobs.py),
    never in a workflow input or history. The send step reads them by `blob_id` and checks size and hash."""

    blob_id: str
    filename: str  # sanitised (mailqueue/attachments.py): no path, no control characters
    content_type: str  # checked against the content when accepted
    size: int
    sha256: str  # hex
    disposition: str = "attachment"  # or "inline": shown in the HTML where it says cid:<content_id>
    content_id: str | None = None  # inline parts: the id the HTML refers to, without <>


@dataclass
class EmailSpec:
    """Everything needed to deliver one email: the workflow's input."""

    email_id: str
    message_id: str
    from_address: str
    to: list[str]
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    reply_to: str | None = None
    content: Content | None = None
    template: TemplateRef | None = None
    headers: dict[str, str] = field(default_factory=dict)
    send_at: datetime | None = None
    retry: RetrySettings = field(default_factory=RetrySettings)
    priority: str = "normal"
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    related_entity_type: str | None = None
    related_entity_id: str | None = None
    sender_type: SenderType = SenderType.SYSTEM
    sender_id: str | None = None
    # The driver whose rated send queue this email's send waits in (MAILQUEUE_SEND_RATES); None: the main queue.
    # Chosen from the sender's settings when the email is accepted; if the sender's driver has changed by
    # the time it is sent, the send step says so and the workflow sends from the new driver's queue.
    send_queue: str | None = None
    # True when the caller (the API) already wrote the record and its `queued` event in
    # the same transaction that accepted the email; the workflow then skips that step.
    recorded: bool = False
    # Files sent with the email, by reference (ids, sizes and hashes only).
    attachments: list[AttachmentRef] = field(default_factory=list)


@dataclass
class QuotaRequest:
    sender_type: SenderType
    sender_id: str | None


@dataclass
class QuotaAnswer:
    """ok: a slot was taken for this send. Otherwise wait until `retry_at` (the full window's end)."""

    ok: bool
    retry_at: datetime | None = None
    detail: str | None = None


@dataclass
class CancelRequest:
    reason: str | None = None


@dataclass
class RescheduleRequest:
    send_at: datetime


@dataclass
class EmailState:
    """What the workflow knows now: the answer of the `status` query and of updates."""

    email_id: str
    status: EmailStatus
    send_at: datetime | None = None
    attempts: int = 0
    last_error: str | None = None
    provider_message_id: str | None = None


# --- activity inputs and outputs -------------------------------------------------


@dataclass
class AuditEntry:
    """One audit step: an event row plus the record fields that change with it."""

    email_id: str
    event_id: str
    event: EventType
    at: datetime
    status: EmailStatus | None = None
    attempt: int | None = None
    detail: str | None = None
    scheduled_for: datetime | None = None
    sent_at: datetime | None = None
    provider: str | None = None
    provider_message_id: str | None = None
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    # The mail as rendered for sending (templated emails), kept on the record for people reading it.
    content: Content | None = None
    # So that any step can create the record if it is missing (a workflow started from the
    # Temporal CLI, or a record lost to a race); unchanged if the record exists.
    spec: EmailSpec | None = None


@dataclass
class RenderRequest:
    email_id: str
    template: TemplateRef


@dataclass
class SendRequest:
    spec: EmailSpec
    # Set by workflows that rendered before sending (before the `send-renders-the-template`
    # patch). Now None: the send activity takes spec.content or renders spec.template itself.
    content: Content | None = None
    # Read the feature flags from the database, not the process's cache: the workflow was told that
    # sending resumed (a cache can lag a change by a couple of seconds).
    fresh_flags: bool = False


@dataclass
class SendResult:
    provider: str
    provider_message_id: str
    attempt: int
    accepted_at: datetime
    refused_recipients: dict[str, str] = field(default_factory=dict)
    # True when the activity already recorded `sent` (right after the server accepted).
    recorded: bool = False
    # True when nothing was sent because every recipient was suppressed by the time of sending;
    # the activity has recorded the email `suppressed` (then `recorded` is True as well).
    suppressed: bool = False

    def describe(self) -> str:
        refused = "; ".join(f"{addr}: {why}" for addr, why in self.refused_recipients.items())
        return f"accepted by {self.provider}" + (f"; refused: {refused}" if refused else "")


# Error types carried in Temporal failures (ApplicationError.type).
PERMANENT_DELIVERY_ERROR = "PermanentDeliveryError"
TRANSIENT_DELIVERY_ERROR = "TransientDeliveryError"
TEMPLATE_ERROR = "TemplateRenderError"
# Nothing was sent and it was not an attempt: the send could not load what it needs from the
# database (template, sender settings), or its attempt had too little time left to send. The
# workflow waits and asks again. The value (from when only the template store could cause it)
# is in recorded histories: never change it.
NOT_SENT_ASK_AGAIN = "TemplateStoreUnavailable"
# The mail server or provider could not be reached: nothing was handed over. The workflow waits
# and asks again, for up to RetrySettings.unreachable_wait_seconds, without using up attempts.
SERVER_UNREACHABLE = "ServerUnreachable"
# The sender's driver has changed since the email was queued, and with it the rated send queue
# (MAILQUEUE_SEND_RATES): nothing was sent. Details: {"send_queue": the new driver's queue, or
# None for the main queue}. The workflow sends again at once, from that queue.
SEND_QUEUE_CHANGED = "SendQueueChanged"
# Sending is paused for this email (the kill switch `sending.paused`, or its driver turned off:
# mailqueue/flags.py): nothing was sent and no attempt is used up. The workflow records `paused` and
# waits for the `resume` signal (sent when such a flag changes) or its next look.
SENDING_PAUSED = "SendingPaused"
# A local activity's database step failed (the database is away): retried without limit.
DATABASE_ERROR = "DatabaseError"
EMAIL_FAILED = "EmailDeliveryFailed"
# A send attempt that outlived its workflow run (a starved worker) found the record final
# (failed or cancelled): it sends nothing. Its run has ended, so no workflow ever sees this.
EMAIL_CLOSED = "EmailAlreadyClosed"

# Names shared by the workflow and its callers (the API starts and updates by name).
SEND_EMAIL_WORKFLOW = "SendEmailWorkflow"
RECONCILE_WORKFLOW = "ReconcileEmailsWorkflow"
CANCEL_UPDATE = "cancel"
RESCHEDULE_UPDATE = "reschedule"
STATUS_QUERY = "status"
RESUME_SIGNAL = "resume"  # a paused email looks again at once


@dataclass
class ReconcileRequest:
    """Records not finished and unchanged for `stale_after_seconds` are checked against Temporal."""

    stale_after_seconds: float = 300.0
    limit: int = 5000  # records checked per run, oldest first


@dataclass
class ReconcileReport:
    checked: int = 0
    running: int = 0  # their workflows are alive: they record their own progress
    restarted: int = 0  # no workflow in Temporal: delivery started again
    settled: dict[str, int] = field(default_factory=dict)  # closed workflows: record set to this status


def reconcile_schedule_id(task_queue: str) -> str:
    return f"{task_queue}-reconcile"


# Retention (mailqueue/retention.py): a daily Schedule runs PurgeEmailsWorkflow.
PURGE_WORKFLOW = "PurgeEmailsWorkflow"


@dataclass
class PurgeRequest:
    """Final emails unchanged for `retention_days` go, `batch` per transaction (0 days: nothing goes)."""

    retention_days: int = 90
    batch: int = 500


@dataclass
class PurgeReport:
    """What one purge removed. Counts only what this run itself deleted: two runs at once add up."""

    cutoff: datetime | None = None  # emails last changed before this went (None: retention is off)
    emails: int = 0
    events: int = 0  # their email_events rows (and with them their event feed rows)
    blobs: int = 0  # stored files no email names any more
    batches: int = 0  # transactions that deleted emails
    started_at: datetime | None = None
    finished_at: datetime | None = None


def purge_schedule_id(task_queue: str) -> str:
    return f"{task_queue}-purge"
