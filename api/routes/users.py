"""Users and their API keys (admin only). A key is shown once, when it is issued."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Response, status
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from api.deps import AdminDep, SessionDep
from api.schemas import Text, normalize_address
from mailqueue.accounts import issue_key, new_id
from mailqueue.models import ApiKey, User, utcnow

router = APIRouter(prefix="/v1/users", tags=["users"])
NOT_FOUND = {404: {"description": "No such user (or key)"}}
UserId = Annotated[str, Path(max_length=36, pattern=r"^[0-9a-f-]{36}$")]
KeyId = UserId  # keys get their ids as users do (new_id)


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")
    email: str | None = Field(default=None, max_length=512, description="Where POST /v1/settings/mail/test sends by default")
    role: str = Field(default="user", pattern=r"^(user|admin)$")

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


class UserOut(BaseModel):
    id: str
    name: str
    email: str | None
    role: str
    is_active: bool
    created_at: datetime
    api_keys: list[KeyOut] = []


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text | None = Field(default=None, max_length=200)


class IssuedKeyOut(KeyOut):
    key: str = Field(description="The API key. Shown this once: only its hash is stored.")


def _key_out(k: ApiKey) -> KeyOut:
    return KeyOut(id=k.id, name=k.name, prefix=k.prefix, created_at=k.created_at, last_used_at=k.last_used_at, revoked_at=k.revoked_at)


async def _users_out(session: SessionDep, users: list[User]) -> list[UserOut]:
    """The users with their keys, in one query for all the keys."""
    keys = (
        await session.exec(
            select(ApiKey).where(col(ApiKey.user_id).in_([u.id for u in users])).order_by(col(ApiKey.created_at))
        )
    ).all()
    return [UserOut(**u.model_dump(), api_keys=[_key_out(k) for k in keys if k.user_id == u.id]) for u in users]


async def _user_out(session: SessionDep, user: User) -> UserOut:
    [out] = await _users_out(session, [user])
    return out


async def _user_or_404(session: SessionDep, user_id: str) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no user with id {user_id!r}")
    return user


@router.post("", status_code=status.HTTP_201_CREATED, response_model=UserOut, responses={409: {"description": "The name is taken"}}, summary="Create a user")
async def create_user(body: UserIn, response: Response, admin: AdminDep, session: SessionDep) -> UserOut:
    user = User(id=new_id(), name=body.name, email=body.email, role=body.role)
    session.add(user)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, f"a user named {body.name!r} exists") from None
    response.headers["Location"] = f"/v1/users/{user.id}"
    return await _user_out(session, user)


@router.get("", response_model=list[UserOut], summary="List users with their keys (never the keys themselves)")
async def list_users(admin: AdminDep, session: SessionDep) -> list[UserOut]:
    return await _users_out(session, list((await session.exec(select(User).order_by(col(User.created_at)))).all()))


@router.get("/{user_id}", response_model=UserOut, responses=NOT_FOUND, summary="A user with their keys")
async def get_user(user_id: UserId, admin: AdminDep, session: SessionDep) -> UserOut:
    return await _user_out(session, await _user_or_404(session, user_id))


@router.post("/{user_id}/api-keys", status_code=status.HTTP_201_CREATED, response_model=IssuedKeyOut, responses=NOT_FOUND,
             summary="Issue an API key (shown once)")
async def create_key(user_id: UserId, admin: AdminDep, session: SessionDep, body: KeyIn | None = None) -> IssuedKeyOut:
    user = await _user_or_404(session, user_id)
    issued = await issue_key(session, user, body.name if body else None)
    return IssuedKeyOut(**_key_out(issued.row).model_dump(), key=issued.key)


@router.delete("/{user_id}/api-keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND,
               summary="Revoke an API key (at once: its next request gets 401)")
async def revoke_key(user_id: UserId, key_id: KeyId, admin: AdminDep, session: SessionDep) -> Response:
    key = await session.get(ApiKey, key_id)
    if key is None or key.user_id != user_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"user {user_id!r} has no key {key_id!r}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.add(key)
        await session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
