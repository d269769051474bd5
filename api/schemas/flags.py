"""Bodies of /v1/flags and /v1/audit: a flag as this process evaluates it, a change to one, the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from api.schemas.common import Text
from mailqueue.flags import MAX_SENDERS, SENDER_KEY, Evaluation, FlagSpec, FlagState
from mailqueue.models import FlagAudit


def sender_key(value: str) -> str:
    value = "system:" if value == "system" else value
    if not SENDER_KEY.match(value):
        raise ValueError(f"{value!r} is not a sender key: system: (or system), or user:<user id>")
    return value


SenderKey = Annotated[str, Field(max_length=80, examples=["user:0193e7a0-8c1b-7f3e-9a55-1b2c3d4e5f60"]), AfterValidator(sender_key)]


class FlagIn(BaseModel):
    """The flag's whole new state: what is not given is reset (no rollout, no targeted senders)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"enabled": True, "reason": "incident 42: the relay drops mail"}]},
    )
    enabled: bool = Field(description="The flag's value (for senders neither targeted nor in a rollout)")
    percentage: int | None = Field(
        default=None, ge=0, le=100,
        description="A rollout: on for this share of senders (a stable hash of flag and sender), whatever `enabled` says",
    )
    senders: list[SenderKey] = Field(
        default_factory=list, max_length=MAX_SENDERS, description="Sender keys it is always on for: system: or user:<id>",
    )
    reason: Text = Field(min_length=1, max_length=500, description="Why: kept in the audit log")


class FlagOut(BaseModel):
    key: str
    description: str
    default: bool = Field(description="Its value while no admin has set it")
    value: bool = Field(description="Its value as this API process evaluates it now (for `sender`, when asked for one)")
    sender: str | None = Field(default=None, description="The sender key `value` was evaluated for (None: the flag as a whole)")
    reason: str = Field(description="Why it has that value (OpenFeature's reason): DEFAULT, STATIC, SPLIT (rollout) or TARGETING_MATCH")
    enabled: bool
    percentage: int | None
    senders: list[str]
    updated_at: datetime | None = Field(description="When an admin last set it (None: never, it has its default)")
    updated_by: str | None
    source: Literal["cache"] = Field(
        default="cache", description="Read from this API process's cache, not the table: what this process acts on now",
    )
    loaded_at: datetime | None = Field(description="When this process last loaded the flags table (None: it runs on the defaults)")
    stale: bool = Field(description="The last load failed (database away): these are the values from loaded_at")

    @classmethod
    def of(cls, spec: FlagSpec, state: FlagState, value: Evaluation, loaded_at: datetime | None, stale: bool) -> FlagOut:
        return cls(
            key=spec.key, description=spec.description, default=spec.default, value=value.value, sender=value.sender,
            reason=value.reason, enabled=state.enabled, percentage=state.percentage, senders=list(state.senders),
            updated_at=state.updated_at, updated_by=state.updated_by, loaded_at=loaded_at, stale=stale,
        )


class AuditOut(BaseModel):
    id: str
    key: str
    at: datetime
    actor: str = Field(description="Who: the user's id, or admin (the bootstrap key)")
    old: dict[str, Any] | None = Field(description="The state before: enabled, percentage, senders (the default if never set)")
    new: dict[str, Any]
    reason: str

    @classmethod
    def of(cls, row: FlagAudit) -> AuditOut:
        return cls(id=row.id, key=row.key, at=row.at, actor=row.actor, old=row.old, new=row.new, reason=row.reason)


class AuditPage(BaseModel):
    items: list[AuditOut]
    page: int
    page_size: int
    total: int
