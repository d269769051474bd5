"""Bodies of /v1/domains: a user's sender domains, the DNS records that prove them, and their DKIM keys' records."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailqueue import dkim_keys
from mailqueue.config import Settings
from mailqueue.domains import normalize_domain, record_name, record_value, shown
from mailqueue.models import DkimKey, SenderDomain


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
    purpose: Literal["verification"] = Field(description="What the record is for (the DKIM keys' records are under `dkim`)")
    type: Literal["TXT"]
    name: str = Field(examples=["_mailqueue.example.org"])
    value: str = Field(examples=["mailqueue-verification=3f2a..."])


class DkimRecord(BaseModel):
    selector: str = Field(examples=["mq202611291-rsa"])
    algorithm: Literal["rsa-sha256", "ed25519-sha256"]
    type: Literal["TXT"] = "TXT"
    record_name: str = Field(examples=["mq202611291-rsa._domainkey.example.org"])
    record_value: str = Field(examples=["v=DKIM1; k=rsa; p=MIIBIjANBgkqh..."])
    status: Literal["active", "retired"] = Field(
        description="active: signs the domain's mail; retired (by a rotation): signs nothing, but keep its record "
                    "published while mail it signed can still be checked (days)",
    )
    published: bool | None = Field(description="Whether the record was found in DNS at the last verify (null: not checked yet)")
    checked_at: datetime | None
    created_at: datetime
    retired_at: datetime | None

    @classmethod
    def of(cls, key: DkimKey, domain: str) -> DkimRecord:
        return cls(
            selector=key.selector, algorithm=key.algorithm,  # type: ignore[arg-type]
            record_name=dkim_keys.record_name(key.selector, domain), record_value=dkim_keys.record_value(key),
            status="active" if key.retired_at is None else "retired", published=key.published, checked_at=key.checked_at,
            created_at=key.created_at, retired_at=key.retired_at,
        )


class AdvisedRecord(BaseModel):
    type: Literal["TXT"] = "TXT"
    name: str
    value: str | None = Field(description="null: not known here (the note says what to ask)")
    note: str

    @classmethod
    def of(cls, advice: dkim_keys.Advice) -> AdvisedRecord:
        return cls(name=advice.name, value=advice.value, note=advice.note)


class Advice(BaseModel):
    spf: AdvisedRecord = Field(description="Which servers may send as the domain")
    dmarc: AdvisedRecord = Field(description="What receivers do with mail that passes neither SPF nor DKIM, and where they report")


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
    dkim: list[DkimRecord] = Field(
        description="The DKIM keys' TXT records, active first: publish each; after a rotation keep the retired ones a while",
    )
    advice: Advice = Field(description="SPF and DMARC records worth publishing beside DKIM")

    @classmethod
    def of(cls, row: SenderDomain, keys: list[DkimKey], settings: Settings) -> DomainOut:
        return cls(
            id=row.id, user_id=row.user_id, domain=row.domain, shown_as=shown(row.domain), status=row.status,
            verified_at=row.verified_at, verified_by=row.verified_by, created_at=row.created_at,
            records=[DnsRecord(purpose="verification", type="TXT", name=record_name(row.domain), value=record_value(row.token))],
            dkim=[DkimRecord.of(k, row.domain) for k in keys],
            advice=Advice(
                spf=AdvisedRecord.of(dkim_keys.spf_advice(settings, row.domain)),
                dmarc=AdvisedRecord.of(dkim_keys.dmarc_advice(row.domain)),
            ),
        )
