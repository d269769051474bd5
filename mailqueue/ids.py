"""Email ids, idempotent ids and the deterministic Message-ID."""

from __future__ import annotations

import uuid

import uuid6

# Fixed namespace: an Idempotency-Key maps to the same email id forever.
_IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1c1c39-3c4e-4b8e-9a53-2d0f5b7a8e11")


def new_email_id() -> str:
    """A time-ordered UUIDv7, so ids sort by acceptance time."""
    return str(uuid6.uuid7())


def idempotent_email_id(sender_type: str, sender_id: str | None, key: str) -> str:
    """The id of the email a sender's Idempotency-Key stands for."""
    return str(uuid.uuid5(_IDEMPOTENCY_NAMESPACE, f"{sender_type}\x1f{sender_id or ''}\x1f{key}"))


def message_id_for(email_id: str, domain: str) -> str:
    """RFC 5322 Message-ID derived from the email id: every retry reuses it, receivers dedupe on it."""
    return f"<{email_id}@{domain}>"
