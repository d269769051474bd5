"""Bodies of /v1/users: users and their API keys (never the keys themselves, but once)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.schemas.common import Text, normalize_address
from mailqueue.models import ApiKey, Role, User


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
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


class UserOut(BaseModel):
    id: str
    name: str
    email: str | None
    role: str
    is_active: bool
    created_at: datetime
    api_keys: list[KeyOut] = []

    @classmethod
    def of(cls, user: User, keys: list[ApiKey]) -> UserOut:
        return cls(**user.model_dump(), api_keys=[KeyOut.of(k) for k in keys])


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text | None = Field(default=None, max_length=200)


class IssuedKeyOut(KeyOut):
    key: str = Field(description="The API key. Shown this once: only its hash is stored.")
