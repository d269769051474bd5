"""Bodies of /v1/domains: a user's sender domains and the DNS records that prove them."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailqueue.domains import normalize_domain, record_name, record_value, shown
from mailqueue.models import SenderDomain


class DomainIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"domain": "example.org"}]})
    domain: str = Field(
        min_length=1, max_length=253,
        description="The exact domain to send from (a subdomain is verified on its own); Unicode names are kept in their xn-- form",
    )
    user_id: str | None = Field(default=None, max_length=36, description="Admins: whose domain (default: the caller's own)")

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        return normalize_domain(value)


class VerifyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    force: bool = Field(
        default=False, description="Admins only: mark the domain verified without looking at DNS (recorded as the admin's override)",
    )


class DnsRecord(BaseModel):
    purpose: Literal["verification"] = Field(description="What the record is for (DKIM keys will add their own)")
    type: Literal["TXT"]
    name: str = Field(examples=["_mailqueue.example.org"])
    value: str = Field(examples=["mailqueue-verification=3f2a..."])


class DomainOut(BaseModel):
    id: str
    user_id: str
    domain: str = Field(description="ASCII (IDNA) form, lower case")
    shown_as: str = Field(description="The domain with its Unicode spelling, when it has one")
    status: str = Field(description="pending (its TXT record not seen yet) or verified")
    verified_at: datetime | None
    verified_by: str | None = Field(description="dns, or admin:<who> for an admin's override")
    created_at: datetime
    records: list[DnsRecord] = Field(description="Publish these in the domain's DNS; keep them there")

    @classmethod
    def of(cls, row: SenderDomain) -> DomainOut:
        return cls(
            id=row.id, user_id=row.user_id, domain=row.domain, shown_as=shown(row.domain), status=row.status,
            verified_at=row.verified_at, verified_by=row.verified_by, created_at=row.created_at,
            records=[DnsRecord(purpose="verification", type="TXT", name=record_name(row.domain), value=record_value(row.token))],
        )
