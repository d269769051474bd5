"""Bodies of /v1/suppressions: the addresses a sender mails no more, and why."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.schemas.common import Address, normalize_address
from mailqueue.models import Suppression, SuppressionReason


class SuppressionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"address": "ann@example.com"}]})
    address: Address = Field(description="The address to mail no more (matched with the domain in any case)")
    reason: SuppressionReason = Field(default=SuppressionReason.MANUAL, description="Why; by hand: manual unless you say")
    user_id: str | None = Field(default=None, max_length=36, description="Admins: whose list (default: the caller's own)")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return normalize_address(value)


class SuppressionOut(BaseModel):
    address: str = Field(description="As it was given or reported")
    reason: str = Field(description="hard_bounce, complaint, unsubscribe or manual")
    source: str = Field(description="Where it came from: api, unsubscribe link, ...")
    sender: str = Field(description="Whose list: system: (the bootstrap key's) or user:<id>")
    created_at: datetime

    @classmethod
    def of(cls, row: Suppression) -> SuppressionOut:
        return cls(address=row.address, reason=row.reason, source=row.source, sender=row.sender, created_at=row.created_at)


class SuppressionPage(BaseModel):
    items: list[SuppressionOut]
    page: int
    page_size: int
    total: int
