"""Users, their API keys, and who is calling: keys are random, shown once, stored as SHA-256 only."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mailqueue.contracts import SenderType
from mailqueue.ids import new_email_id
from mailqueue.models import ApiKey, Role, User, utcnow

KEY_PREFIX = "mq_"
# A key's last-used time is written at most this often: not one write per request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class PrincipalKind(StrEnum):
    BOOTSTRAP = "bootstrap"  # MAILQUEUE_BOOTSTRAP_API_KEY: an admin that sends as the system
    USER = "user"  # a user's API key (the user may have the admin role)


# How templates name the bootstrap key as their author (`created_by`): stored rows and answers say so.
BOOTSTRAP_AUTHOR = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the bootstrap key, or a user (maybe an admin)."""

    kind: PrincipalKind
    id: str | None
    role: Role = Role.ADMIN

    @classmethod
    def bootstrap(cls) -> Principal:
        return cls(kind=PrincipalKind.BOOTSTRAP, id=None)

    @classmethod
    def of(cls, user: User) -> Principal:
        return cls(kind=PrincipalKind.USER, id=user.id, role=Role(user.role))

    @property
    def is_admin(self) -> bool:
        return self.kind is PrincipalKind.BOOTSTRAP or self.role is Role.ADMIN

    @property
    def is_user(self) -> bool:
        return self.kind is PrincipalKind.USER

    @property
    def sender(self) -> tuple[SenderType, str | None]:
        """Whom the caller's emails are sent as."""
        return (SenderType.USER, self.id) if self.is_user else (SenderType.SYSTEM, None)

    @property
    def author(self) -> str:
        """The caller as the author of what it saves (templates' `created_by`)."""
        return self.id or BOOTSTRAP_AUTHOR

    def may_see(self, sender_type: str, sender_id: str | None) -> bool:
        """A user sees only the emails they sent (and their own settings); admins see all."""
        return self.is_admin or (sender_type, sender_id) == (SenderType.USER, self.id)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# The bootstrap key opens everything, from anywhere: the API refuses to start with one that is
# short, or made of few characters (`aaaa…`, a word repeated). A random key passes: 32 random hex
# characters have 10 or more distinct ones all but once in 10,000 tries; token_urlsafe(32) always.
BOOTSTRAP_KEY_MIN_LENGTH = 32
BOOTSTRAP_KEY_MIN_DISTINCT = 10
MAKE_A_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def weak_bootstrap_key(key: str) -> str | None:
    """Why a bootstrap key is too weak (never quoting it), or None."""
    problems = []
    if len(key) < BOOTSTRAP_KEY_MIN_LENGTH:
        problems.append(f"{len(key)} characters, fewer than {BOOTSTRAP_KEY_MIN_LENGTH}")
    if len(set(key)) < BOOTSTRAP_KEY_MIN_DISTINCT:
        problems.append(f"{len(set(key))} distinct characters, fewer than {BOOTSTRAP_KEY_MIN_DISTINCT}")
    if not problems:
        return None
    return f"MAILQUEUE_BOOTSTRAP_API_KEY is too weak ({'; '.join(problems)}): set a random one, e.g. the output of {MAKE_A_KEY}"


@dataclass
class IssuedKey:
    row: ApiKey
    key: str  # the only time the whole key exists outside its owner's hands


def new_id() -> str:
    return new_email_id()  # a UUIDv7 serves users and keys as well as emails


async def issue_key(session: AsyncSession, user: User, name: str | None = None) -> IssuedKey:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id(), user_id=user.id, name=name, prefix=key[:10], key_hash=hash_key(key))
    session.add(row)
    await session.commit()
    await session.refresh(row)
    return IssuedKey(row=row, key=key)


async def user_for_key(session: AsyncSession, key: str, now: datetime | None = None) -> User | None:
    """The active user a live key belongs to (and note the key's use), or None."""
    if not key.startswith(KEY_PREFIX):
        return None
    found = (
        await session.exec(
            select(ApiKey, User).join(User, col(User.id) == col(ApiKey.user_id)).where(col(ApiKey.key_hash) == hash_key(key))
        )
    ).first()
    if found is None:
        return None
    api_key, user = found
    if api_key.revoked_at is not None or not user.is_active:
        return None
    now = now or utcnow()
    if api_key.last_used_at is None or now - api_key.last_used_at >= LAST_USED_RESOLUTION:
        api_key.last_used_at = now
        session.add(api_key)
        await session.commit()
    return user
