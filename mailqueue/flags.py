"""Feature flags: the known flags and their defaults, and their evaluation through OpenFeature over
our own table (feature_flags), cached in every process.

Design, for reviewers:
- FLAGS is the one list of flags. A key not in it is refused by the API (404) and is a bug when
  evaluated (UnknownFlag): a typo must fail loudly, not read as a silent default.
- Each process (API, worker) holds one `Flags`: a snapshot of the table that a background task
  reloads every MAILQUEUE_FLAGS_REFRESH_SECONDS (2 s), so a change reaches every process within
  that and one query; the process that took a PUT reloads at once. `is_on` reads the snapshot
  only: no I/O on the paths that ask (every request's rate limit, every send).
- Evaluation goes through the OpenFeature SDK (`openfeature-sdk`): `TableProvider` resolves a flag
  over the snapshot, with the sender key (mailqueue.senders.sender_key) as the targeting key. On
  for a sender listed in `senders`; else, with a percentage, for the senders whose stable hash
  falls below it; else `enabled`. The hash is sha256 of "<flag>:<sender>", so a 10 % rollout picks
  the same senders in every process and after every restart, and another flag's 10 % picks others.
- A database that does not answer leaves the last snapshot in place (one warning per outage; the
  provider reports STALE meanwhile): a flag read is never an outage of its own. A process that
  starts while the database is away runs on the defaults until its first load.
- Each Flags registers its provider under its own OpenFeature domain: tests (and the dev stack)
  run several APIs and workers in one process, each with its own database.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from openfeature import api as openfeature
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEventDetails
from openfeature.exception import FlagNotFoundError, TypeMismatchError
from openfeature.flag_evaluation import FlagResolutionDetails, Reason
from openfeature.provider import AbstractProvider, Metadata
from openfeature.provider.no_op_provider import NoOpProvider
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from mailqueue.config import Settings
from mailqueue.db import STORE_ERRORS
from mailqueue.drivers.base import DriverName
from mailqueue.models import FeatureFlag, utcnow

log = logging.getLogger("mailqueue.flags")


@dataclass(frozen=True)
class FlagSpec:
    key: str
    default: bool
    description: str


def driver_flag(driver: DriverName | str) -> str:
    """The flag that turns one driver off (its emails wait, paused)."""
    return f"driver.{DriverName(driver).value}.enabled"


SENDING_PAUSED = "sending.paused"
TEMPLATES_ENABLED = "templates.enabled"
SCHEDULING_ENABLED = "scheduling.enabled"
USER_SMTP_ENABLED = "user_smtp.enabled"
RATE_LIMITING_ENABLED = "rate_limiting.enabled"

# Every flag there is, with its default (the value while no admin has set it).
FLAGS: Mapping[str, FlagSpec] = {
    spec.key: spec
    for spec in (
        FlagSpec(SENDING_PAUSED, False, "The kill switch: on, emails reaching their send step wait (paused) instead of going out"),
        *(FlagSpec(driver_flag(d), True, f"Emails that would leave through the {d.value} driver go out (off: they wait, paused)") for d in DriverName),
        FlagSpec(TEMPLATES_ENABLED, True, "Emails may be sent from stored templates"),
        FlagSpec(SCHEDULING_ENABLED, True, "Emails may be scheduled for later (send_at)"),
        FlagSpec(USER_SMTP_ENABLED, True, "Users' own SMTP servers are used (off: those emails wait, paused)"),
        FlagSpec(RATE_LIMITING_ENABLED, True, "The per-key request rate limit (MAILQUEUE_RATE_LIMIT_PER_MINUTE) applies"),
    )
}

MAX_SENDERS = 1000  # targeted senders per flag: a rollout to more is a percentage
SENDER_KEY = re.compile(r"^(system:|user:[A-Za-z0-9-]{1,64})$")  # mailqueue.senders.sender_key's answers


class UnknownFlag(LookupError):
    """A flag key that is not in FLAGS: a bug in the caller, never a default."""


def spec_of(key: str) -> FlagSpec:
    try:
        return FLAGS[key]
    except KeyError:
        raise UnknownFlag(f"no feature flag {key!r}; known: {sorted(FLAGS)}") from None


def in_rollout(key: str, sender: str, percentage: int) -> bool:
    """Whether `sender` is among the `percentage` % of senders a rollout of flag `key` reaches: the same
    answer in every process, after every restart."""
    bucket = int.from_bytes(hashlib.sha256(f"{key}:{sender}".encode()).digest()[:8], "big") % 100
    return bucket < percentage


@dataclass(frozen=True)
class FlagState:
    """One flag as stored (or its default, when no admin has set it: updated_at None)."""

    key: str
    enabled: bool
    percentage: int | None = None
    senders: tuple[str, ...] = ()
    updated_at: datetime | None = None
    updated_by: str | None = None

    @classmethod
    def default(cls, key: str) -> FlagState:
        return cls(key=key, enabled=spec_of(key).default)

    @classmethod
    def of(cls, row: FeatureFlag) -> FlagState:
        return cls(
            key=row.key, enabled=row.enabled, percentage=row.percentage, senders=tuple(row.senders or ()),
            updated_at=row.updated_at, updated_by=row.updated_by,
        )

    @property
    def is_default(self) -> bool:
        return self.updated_at is None

    def as_json(self) -> dict[str, Any]:
        """What the audit log keeps of it (before and after a change)."""
        return {"enabled": self.enabled, "percentage": self.percentage, "senders": list(self.senders)}

    def resolve(self, sender: str | None) -> tuple[bool, Reason]:
        """(its value for this sender, why). Without a sender, a rollout does not apply: `enabled`."""
        if sender is not None and sender in self.senders:
            return True, Reason.TARGETING_MATCH
        if sender is not None and self.percentage is not None:
            return in_rollout(self.key, sender, self.percentage), Reason.SPLIT
        return self.enabled, Reason.DEFAULT if self.is_default else Reason.STATIC


def defaults() -> dict[str, FlagState]:
    return {key: FlagState.default(key) for key in FLAGS}


class TableProvider(AbstractProvider):
    """An OpenFeature provider over a snapshot of the feature_flags table (booleans only)."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshot: dict[str, FlagState] = defaults()

    def get_metadata(self) -> Metadata:
        return Metadata(name="mailqueue feature_flags")

    def replace(self, snapshot: dict[str, FlagState]) -> None:
        changed = [key for key, state in snapshot.items() if self.snapshot.get(key) != state]
        self.snapshot = snapshot  # one assignment: an evaluation sees the old snapshot or the new, never a mix
        if changed:
            self.emit_provider_configuration_changed(ProviderEventDetails(flags_changed=changed))

    def resolve_boolean_details(
        self, flag_key: str, default_value: bool, evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        state = self.snapshot.get(flag_key)
        if state is None:
            raise FlagNotFoundError(f"no feature flag {flag_key!r}")
        sender = evaluation_context.targeting_key if evaluation_context is not None else None
        value, reason = state.resolve(sender or None)
        metadata = {"percentage": state.percentage} if state.percentage is not None else {}
        return FlagResolutionDetails(value=value, reason=reason, variant="on" if value else "off", flag_metadata=metadata)

    def _not_boolean(self, flag_key: str, *args: Any) -> Any:
        raise TypeMismatchError(f"feature flag {flag_key!r} is a boolean")

    resolve_string_details = _not_boolean
    resolve_integer_details = _not_boolean
    resolve_float_details = _not_boolean
    resolve_object_details = _not_boolean


@dataclass(frozen=True)
class Evaluation:
    """A flag's value for one sender (or none), and why: OpenFeature's reason (DEFAULT, STATIC, SPLIT, TARGETING_MATCH)."""

    key: str
    value: bool
    reason: str
    sender: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


class Flags:
    """The feature flags as this process sees them: one per process (API, worker)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], refresh_seconds: float) -> None:
        self._sessions = sessions
        self._refresh_seconds = refresh_seconds
        self._provider = TableProvider()
        self._domain = f"mailqueue-flags-{uuid.uuid4()}"
        openfeature.set_provider_and_wait(self._provider, self._domain)
        self._client = openfeature.get_client(self._domain)
        self._lock = asyncio.Lock()
        self._loads_started = 0
        self._task: asyncio.Task[None] | None = None
        self.loaded_at: datetime | None = None  # the last load that succeeded (None: on the defaults)
        self.stale = False  # the last load failed: the snapshot is the one before

    @classmethod
    def from_settings(cls, settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> Flags:
        return cls(sessions, settings.flags_refresh_seconds)

    async def start(self) -> None:
        """The first load (the defaults stay, with a warning, if the database is away), then the refresh task."""
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._refreshing(), name="feature flags refresh")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        openfeature.set_provider(NoOpProvider(), self._domain)  # the domain's provider let go (its snapshot with it)

    def is_on(self, key: str, sender: str | None = None) -> bool:
        """Whether flag `key` is on for `sender` (a sender key: "system:" or "user:<id>"; None: the flag as
        a whole), from this process's snapshot through the OpenFeature client. No I/O."""
        return self.evaluate(key, sender).value

    def evaluate(self, key: str, sender: str | None = None) -> Evaluation:
        spec = spec_of(key)
        details = self._client.get_boolean_details(key, spec.default, EvaluationContext(targeting_key=sender))
        if details.error_code is not None:  # cannot happen for a known flag with our provider in place
            log.error("feature flag %s evaluated to its default: %s %s", key, details.error_code, details.error_message)
        return Evaluation(key, details.value, str(details.reason), sender, dict(details.flag_metadata))

    def state(self, key: str) -> FlagState:
        """The flag as this process last loaded it."""
        spec_of(key)
        return self._provider.snapshot[key]

    def states(self) -> list[FlagState]:
        snapshot = self._provider.snapshot
        return [snapshot[key] for key in FLAGS]

    async def refresh(self) -> None:
        """Load the table now. Callers at the same moment share one load that began after they asked;
        a database that does not answer leaves the snapshot as it was."""
        asked = self._loads_started
        async with self._lock:
            if self._loads_started > asked:
                return  # a load that began after this call has just finished: as fresh as one of our own
            self._loads_started += 1
            try:
                async with asyncio.timeout(max(10.0, self._refresh_seconds)):
                    async with self._sessions() as session:
                        rows = (await session.exec(select(FeatureFlag))).all()
            except STORE_ERRORS as exc:
                if not self.stale:
                    log.warning(
                        "feature flags not loaded (%s): keeping the values of %s until the database answers",
                        type(exc).__name__, self.loaded_at.isoformat() if self.loaded_at else "the defaults",
                    )
                    self._provider.emit_provider_stale(ProviderEventDetails(message=type(exc).__name__))
                self.stale = True
                return
            snapshot = defaults()
            snapshot.update({row.key: FlagState.of(row) for row in rows if row.key in FLAGS})  # a retired flag's row is ignored
            self._provider.replace(snapshot)
            self.loaded_at = utcnow()
            if self.stale:
                log.warning("feature flags loaded again")
                self._provider.emit_provider_ready(ProviderEventDetails())
            self.stale = False

    async def _refreshing(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self.refresh()
            except Exception:  # a bug, not an outage (refresh handles those): logged, and the next round tries again
                log.exception("feature flags refresh failed")
