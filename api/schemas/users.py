"""Bodies of /v1/users: users and their API keys (never the keys themselves, but once)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.schemas.common import Text, normalize_address
from mailqueue.config import Settings
from mailqueue.models import ApiKey, Role, User
from mailqueue.senders import recipients_cap

Priority = Literal["high", "normal", "low"]


class LimitsIn(BaseModel):
    """A user's abuse limits, set by admins. Given as null: no ceiling (hourly_limit, daily_limit), or
    back to the operator's default (recipients_per_hour, max_priority: MAILQUEUE_USER_*)."""

    model_config = ConfigDict(extra="forbid")
    hourly_limit: int | None = Field(default=None, ge=1, le=10_000_000, description="Ceiling on sends per hour: the user's own hourly_limit may only be lower")
    daily_limit: int | None = Field(default=None, ge=1, le=100_000_000, description="Ceiling on sends per day")
    recipients_per_hour: int | None = Field(default=None, ge=0, le=10_000_000, description="Recipients (to+cc+bcc) queued per hour; 0: no cap")
    max_priority: Priority | None = Field(default=None, description="The highest priority the user may ask for")


class UserIn(LimitsIn):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")
    email: str | None = Field(default=None, max_length=512, description="Where POST /v1/settings/mail/test sends by default")
    role: str = Field(default=Role.USER.value, pattern=r"^(user|admin)$")

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        return normalize_address(value) if value is not None else None


class KeyOut(BaseModel):
    id: str
    name: str | None
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, k: ApiKey) -> KeyOut:
        return cls(id=k.id, name=k.name, prefix=k.prefix, created_at=k.created_at, last_used_at=k.last_used_at, revoked_at=k.revoked_at)


class UserPatch(LimitsIn):
    """Change what is given, nothing else."""

    is_active: bool | None = Field(default=None, description="false: every key of the user is refused (401) until true again")

    @field_validator("is_active")
    @classmethod
    def _given(cls, value: bool | None) -> bool:
        if value is None:
            raise ValueError("is_active is true or false")
        return value


class UserOut(BaseModel):
    id: str
    name: str
    email: str | None
    role: str
    is_active: bool
    created_at: datetime
    hourly_limit: int | None = Field(description="Ceiling on the user's sends per hour (null: none)")
    daily_limit: int | None = Field(description="Ceiling on the user's sends per day (null: none)")
    recipients_per_hour: int = Field(description="Recipients the user may queue per hour (0: no cap)")
    max_priority: Priority = Field(description="The highest priority the user may ask for (admins: any)")
    api_keys: list[KeyOut] = []

    @classmethod
    def of(cls, user: User, keys: list[ApiKey], settings: Settings) -> UserOut:
        """The user with the limits in force (the operator's defaults where an admin set none)."""
        return cls(
            **user.model_dump(exclude={"recipients_per_hour", "max_priority"}),
            recipients_per_hour=recipients_cap(settings, user),
            max_priority=user.max_priority or settings.user_max_priority,  # type: ignore[arg-type]
            api_keys=[KeyOut.of(k) for k in keys],
        )


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text | None = Field(default=None, max_length=200)


class IssuedKeyOut(KeyOut):
    key: str = Field(description="The API key. Shown this once: only its hash is stored.")
