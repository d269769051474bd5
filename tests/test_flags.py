"""Feature flags: set through the API with an audit row, evaluated through OpenFeature from each
process's cache, the same rollout in every process, a change reaching another API process, the
rate-limit flag's effect, and a database away at refresh."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from sqlmodel import col, select

from api.app import create_app
from api.services import flags as flag_service
from devstack.net import free_port
from mailqueue.config import Settings, settings_env
from mailqueue.db import create_engine, migrate, sessionmaker
from mailqueue.flags import FLAGS, Flags, FlagState, UnknownFlag
from mailqueue.models import FeatureFlag, FlagAudit
from tests.conftest import PG_ADMIN, TemporalDevServer, scratch_database
from tests.helpers import AUTH, ROOT, ApiProcess, eventually, fast_settings

LIMIT = 3  # requests a minute per key on the `limited` API process
# A change reaches every process within 5 s (MAILQUEUE_FLAGS_REFRESH_SECONDS 2 and one query); a deadline
# far above that only bounds how long a real failure takes to show on a busy machine.
PROPAGATES = 60.0
DEFAULT_JSON = {"enabled": True, "percentage": None, "senders": []}
# 1,000 sender ids, the same in every run (uuid5), so the rollout's count is a fact, not a draw.
SENDERS = [f"user:{uuid.uuid5(uuid.NAMESPACE_URL, f'mailqueue-flags-{i}')}" for i in range(1000)]


@pytest.fixture(scope="module")
def flag_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The flags are global to a database: this module's own, so no other test's mail sees its changes."""
    with scratch_database(tmp_path_factory.mktemp("flags-db")) as url:
        yield url


@pytest.fixture(scope="module")
def flag_sessions(flag_db: str):  # type: ignore[no-untyped-def]
    return sessionmaker(create_engine(flag_db))


@pytest.fixture(scope="module")
async def apis(
    flag_db: str, temporal_server: TemporalDevServer, tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[dict[str, ApiProcess]]:
    """API processes on the module's database: a and b without a rate limit; `limited` with LIMIT a minute."""
    logs = tmp_path_factory.mktemp("flags-api")

    def settings(**overrides: Any) -> Settings:
        return fast_settings(flag_db, temporal_server.address, free_port(), f"flags-{uuid.uuid4()}", **overrides)

    wanted = {"a": settings(), "b": settings(), "limited": settings(rate_limit_per_minute=LIMIT)}
    async with AsyncExitStack() as stack:
        started = await asyncio.gather(*(stack.enter_async_context(ApiProcess(s, logs / f"{n}.log")) for n, s in wanted.items()))
        yield dict(zip(wanted, started, strict=True))


def client(api: ApiProcess, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=api.url, headers=headers if headers is not None else AUTH, timeout=30)


async def user_key(admin: httpx.AsyncClient, role: str = "user") -> tuple[str, str]:
    """(a new user's id, an API key of theirs)."""
    made = await admin.post("/v1/users", json={"name": f"flags-{uuid.uuid4().hex[:10]}", "role": role})
    assert made.status_code == 201, made.text
    issued = await admin.post(f"/v1/users/{made.json()['id']}/api-keys")
    assert issued.status_code == 201, issued.text
    return made.json()["id"], issued.json()["key"]


async def audit_rows(sessions: Any, key: str) -> list[FlagAudit]:
    async with sessions() as s:
        return list((await s.exec(select(FlagAudit).where(col(FlagAudit.key) == key).order_by(col(FlagAudit.at)))).all())


# --- the API ----------------------------------------------------------------------------------


async def test_put_get_and_audit_through_the_api(apis: dict[str, ApiProcess], flag_sessions: Any) -> None:
    key = "templates.enabled"
    async with client(apis["a"]) as admin:
        listed = (await admin.get("/v1/flags")).json()
        assert [f["key"] for f in listed] == list(FLAGS)
        assert all(f["value"] == f["default"] == FLAGS[f["key"]].default and f["source"] == "cache" for f in listed), listed
        assert {f["key"]: f["default"] for f in listed}["sending.paused"] is False

        off = await admin.put(f"/v1/flags/{key}", json={"enabled": False, "reason": "templates break on the new relay"})
        assert off.status_code == 200, off.text
        assert off.json() | {"updated_at": None, "loaded_at": None} == {
            "key": key, "description": FLAGS[key].description, "default": True, "value": False, "sender": None,
            "reason": "STATIC", "enabled": False, "percentage": None, "senders": [], "updated_at": None, "updated_by": "admin",
            "source": "cache", "loaded_at": None, "stale": False,
        }
        assert (await admin.get(f"/v1/flags/{key}")).json()["value"] is False  # this process: at once

        targeted = SENDERS[0]
        rollout = await admin.put(f"/v1/flags/{key}", json={
            "enabled": False, "percentage": 0, "senders": [targeted], "reason": "only for one sender",
        })
        assert rollout.status_code == 200, rollout.text
        mine = (await admin.get(f"/v1/flags/{key}", params={"sender": targeted})).json()
        assert (mine["value"], mine["reason"], mine["sender"]) == (True, "TARGETING_MATCH", targeted)
        other = (await admin.get(f"/v1/flags/{key}", params={"sender": SENDERS[1]})).json()
        assert (other["value"], other["reason"]) == (False, "SPLIT")  # a 0 % rollout for everyone else
        assert (await admin.get(f"/v1/flags/{key}", params={"sender": "nobody"})).status_code == 422

        audit = (await admin.get(f"/v1/flags/{key}/audit")).json()
        assert audit["total"] == 2 and [i["reason"] for i in audit["items"]] == ["only for one sender", "templates break on the new relay"]
        first, second = audit["items"][1], audit["items"][0]
        assert first["old"] == DEFAULT_JSON and first["new"] == {"enabled": False, "percentage": None, "senders": []}
        assert second["old"] == first["new"] and second["new"] == {"enabled": False, "percentage": 0, "senders": [targeted]}
        assert first["actor"] == second["actor"] == "admin"
        everything = (await admin.get("/v1/audit", params={"page_size": 1})).json()
        assert everything["items"][0]["id"] == second["id"] and everything["total"] >= 2 and everything["page_size"] == 1

        # The table holds what the API said: the row, and one audit row per change.
        async with flag_sessions() as s:
            row = await s.get(FeatureFlag, key)
        assert row is not None and (row.enabled, row.percentage, row.senders, row.updated_by) == (False, 0, [targeted], "admin")
        assert [r.reason for r in await audit_rows(flag_sessions, key)] == ["templates break on the new relay", "only for one sender"]

        # A user's key is refused everywhere here, and changes nothing.
        user_id, key_of_user = await user_key(admin)
        async with client(apis["a"], {"Authorization": f"Bearer {key_of_user}"}) as user:
            for answer in (
                await user.get("/v1/flags"), await user.get(f"/v1/flags/{key}"), await user.get(f"/v1/flags/{key}/audit"),
                await user.get("/v1/audit"), await user.put(f"/v1/flags/{key}", json={"enabled": True, "reason": "mine now"}),
            ):
                assert answer.status_code == 403, answer.text
        # An admin user's changes name that user (their id), never their key.
        admin_id, admin_key = await user_key(admin, role="admin")
        async with client(apis["a"], {"Authorization": f"Bearer {admin_key}"}) as other_admin:
            back = await other_admin.put(f"/v1/flags/{key}", json={"enabled": True, "reason": "relay fixed"})
            assert back.status_code == 200 and back.json()["updated_by"] == admin_id, back.text
        newest = (await admin.get(f"/v1/flags/{key}/audit")).json()["items"][0]
        assert newest["actor"] == admin_id and admin_key not in json.dumps(newest) and newest["old"] == second["new"]

        # Unknown flags: 404; a change without a reason (or out of bounds): 422. Neither writes anything.
        before = len(await audit_rows(flag_sessions, key))
        for answer in (
            await admin.get("/v1/flags/no.such.flag"), await admin.get("/v1/flags/no.such.flag/audit"),
            await admin.put("/v1/flags/no.such.flag", json={"enabled": True, "reason": "typo"}),
        ):
            assert answer.status_code == 404, answer.text
        for body in (
            {"enabled": False}, {"enabled": False, "reason": ""}, {"enabled": False, "reason": "x" * 501},
            {"enabled": False, "reason": "r", "percentage": 101}, {"enabled": False, "reason": "r", "senders": ["ann@example.com"]},
            {"enabled": "maybe", "reason": "r"}, {"enabled": False, "reason": "r", "extra": 1},
        ):
            refused = await admin.put(f"/v1/flags/{key}", json=body)
            assert refused.status_code == 422, (body, refused.text)
        assert len(await audit_rows(flag_sessions, key)) == before
        async with flag_sessions() as s:
            assert await s.scalar(sa.select(sa.func.count()).select_from(FeatureFlag).where(FeatureFlag.key == "no.such.flag")) == 0


async def test_two_first_changes_at_once_both_land_and_chain_in_the_audit(apis: dict[str, ApiProcess], flag_sessions: Any) -> None:
    key = "driver.log.enabled"
    async with client(apis["a"]) as on_a, client(apis["b"]) as on_b:
        answers = await asyncio.gather(
            on_a.put(f"/v1/flags/{key}", json={"enabled": False, "percentage": 1, "reason": "one"}),
            on_b.put(f"/v1/flags/{key}", json={"enabled": False, "percentage": 2, "reason": "two"}),
        )
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    older, newer = await audit_rows(flag_sessions, key)
    assert older.old == DEFAULT_JSON and newer.old == older.new  # each saw the state the other left: nothing lost
    async with flag_sessions() as s:
        row = await s.get(FeatureFlag, key)
    assert row is not None and row.percentage == newer.new["percentage"]


async def test_a_change_reaches_another_api_process(apis: dict[str, ApiProcess]) -> None:
    """GET /v1/flags/{key} answers from the process's cache (`source: cache`, `loaded_at`): b learns of
    a change made through a by reloading the table, as every worker does."""
    key = "user_smtp.enabled"
    async with client(apis["a"]) as on_a, client(apis["b"]) as on_b:
        assert (await on_b.get(f"/v1/flags/{key}")).json()["value"] is True
        changed = await on_a.put(f"/v1/flags/{key}", json={"enabled": False, "reason": "a user's relay misbehaves"})
        assert changed.status_code == 200 and changed.json()["value"] is False, changed.text
        changed_at = datetime.fromisoformat(changed.json()["updated_at"])

        async def b_says(value: bool) -> dict[str, Any] | None:
            seen = (await on_b.get(f"/v1/flags/{key}")).json()
            return seen if seen["value"] is value else None

        seen = await eventually(lambda: b_says(False), timeout=PROPAGATES, what="process b never saw the flag turned off")
        assert seen["source"] == "cache" and datetime.fromisoformat(seen["loaded_at"]) >= changed_at and not seen["stale"]

        assert (await on_a.put(f"/v1/flags/{key}", json={"enabled": True, "reason": "relay fixed"})).status_code == 200
        await eventually(lambda: b_says(True), timeout=PROPAGATES, what="process b never saw the flag turned on again")


async def test_rate_limiting_off_lifts_the_per_key_limit(apis: dict[str, ApiProcess]) -> None:
    async with client(apis["a"]) as admin:
        _, key = await user_key(admin)
        async with client(apis["limited"], {"Authorization": f"Bearer {key}"}) as limited:

            async def burst() -> list[httpx.Response]:
                # Twice the limit and one: over it in at least one minute, even across a minute's edge.
                return [await limited.get("/v1/users/me") for _ in range(2 * LIMIT + 1)]

            answers = await burst()
            assert 429 in [r.status_code for r in answers] and all("RateLimit-Limit" in r.headers for r in answers)

            off = await admin.put("/v1/flags/rate_limiting.enabled", json={"enabled": False, "reason": "load test"})
            assert off.status_code == 200, off.text

            async def unlimited() -> list[httpx.Response] | None:
                answers = await burst()
                return answers if all(r.status_code == 200 for r in answers) else None

            answers = await eventually(unlimited, timeout=PROPAGATES, what="the limit still applied with rate_limiting.enabled off")
            assert not any("RateLimit-Limit" in r.headers for r in answers)  # not counted at all
            assert [r.status_code for r in await burst()] == [200] * (2 * LIMIT + 1)

            on = await admin.put("/v1/flags/rate_limiting.enabled", json={"enabled": True, "reason": "load test over"})
            assert on.status_code == 200, on.text

            async def limited_again() -> bool:
                return 429 in [r.status_code for r in await burst()]

            await eventually(limited_again, timeout=PROPAGATES, what="the limit never came back with rate_limiting.enabled on")


async def test_on_change_hooks_run_after_a_put_and_a_failing_one_changes_nothing(flag_db: str) -> None:
    """In this process (lifespan run), so the test can register hooks as the kill switch does."""
    settings = fast_settings(flag_db, f"127.0.0.1:{free_port()}", free_port(), f"flags-{uuid.uuid4()}")
    seen: list[tuple[str, str | None, FlagState]] = []

    async def broken(ctx: Any, key: str, state: FlagState) -> None:
        raise RuntimeError("a hook that fails")

    async def recording(ctx: Any, key: str, state: FlagState) -> None:
        seen.append((key, ctx.principal.id, state))

    flag_service.on_change.extend([broken, recording])
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api", headers=AUTH,
        ) as http:
            answer = await http.put("/v1/flags/driver.ses.enabled", json={"enabled": False, "reason": "ses outage"})
            assert answer.status_code == 200, answer.text
            refused = await http.put("/v1/flags/driver.ses.enabled", json={"enabled": True})
            assert refused.status_code == 422
    finally:
        flag_service.on_change.remove(broken)
        flag_service.on_change.remove(recording)
    assert [(key, who, state.enabled, state.updated_by) for key, who, state in seen] == [("driver.ses.enabled", None, False, "admin")]


# --- evaluation ---------------------------------------------------------------------------------


CHILD = """
import asyncio, json, sys
from mailqueue.config import Settings
from mailqueue.db import create_engine, sessionmaker
from mailqueue.flags import Flags

async def main():
    settings = Settings()
    flags = Flags.from_settings(settings, sessionmaker(create_engine(settings.database_url)))
    await flags.start()
    senders = json.load(sys.stdin)
    print(json.dumps(sorted(s for s in senders if flags.is_on(sys.argv[1], s))))
    await flags.aclose()

asyncio.run(main())
"""


async def test_a_10_percent_rollout_is_8_to_12_percent_and_the_same_in_another_process(flag_db: str, flag_sessions: Any) -> None:
    key = "scheduling.enabled"
    settings = Settings(database_url=flag_db, _env_file=None)  # type: ignore[call-arg]
    async with flag_sessions() as s:
        s.add(FeatureFlag(key=key, enabled=False, percentage=10, senders=[], updated_by="tests"))
        await s.commit()
    try:
        flags = Flags.from_settings(settings, flag_sessions)
        await flags.start()
        try:
            here = sorted(s for s in SENDERS if flags.is_on(key, s))
            reasons = {flags.evaluate(key, s).reason for s in SENDERS}
        finally:
            await flags.aclose()
        assert 80 <= len(here) <= 120, len(here)
        assert reasons == {"SPLIT"}

        child = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", CHILD, key], input=json.dumps(SENDERS), capture_output=True, text=True,
            cwd=ROOT, env=settings_env(settings), timeout=120,
        )
        assert child.returncode == 0, child.stderr
        assert json.loads(child.stdout.strip().splitlines()[-1]) == here
    finally:
        async with flag_sessions() as s:
            await s.exec(sa.delete(FeatureFlag).where(col(FeatureFlag.key) == key))  # type: ignore[call-overload]
            await s.commit()


async def test_a_targeted_sender_is_on_a_rollout_splits_the_rest_and_unknown_keys_are_bugs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'flags.db'}"
    migrate(url)
    sessions = sessionmaker(create_engine(url))
    flags = Flags(sessions, refresh_seconds=60)
    assert flags.is_on("sending.paused") is False and flags.is_on("rate_limiting.enabled") is True  # the defaults, before any load
    async with sessions() as s:
        s.add(FeatureFlag(key="sending.paused", enabled=False, percentage=10, senders=[SENDERS[0]], updated_by="tests"))
        s.add(FeatureFlag(key="templates.enabled", enabled=False, percentage=10, senders=[], updated_by="tests"))
        s.add(FeatureFlag(key="retired.flag", enabled=True, senders=[], updated_by="tests"))  # a flag no longer in the code
        await s.commit()
    await flags.start()
    try:
        paused = {s for s in SENDERS if flags.is_on("sending.paused", s)}
        templates = {s for s in SENDERS if flags.is_on("templates.enabled", s)}
        assert SENDERS[0] in paused and flags.evaluate("sending.paused", SENDERS[0]).reason == "TARGETING_MATCH"
        assert paused - {SENDERS[0]} and paused != templates  # each flag's rollout picks its own senders
        assert flags.is_on("sending.paused") is False and flags.evaluate("sending.paused").reason == "STATIC"  # no sender: `enabled`
        assert flags.evaluate("scheduling.enabled").reason == "DEFAULT"
        for wrong in ("retired.flag", "sending.pause", ""):
            with pytest.raises(UnknownFlag):
                flags.is_on(wrong)
    finally:
        await flags.aclose()


async def test_the_database_away_at_refresh_keeps_the_last_values(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mailqueue.flags")
    with scratch_database(tmp_path) as url:
        engine = create_engine(url)
        sessions = sessionmaker(engine)
        async with sessions() as s:
            s.add(FeatureFlag(key="sending.paused", enabled=True, senders=[], updated_by="tests"))
            await s.commit()
        flags = Flags(sessions, refresh_seconds=0.1)
        await flags.start()
        try:
            assert flags.is_on("sending.paused") and not flags.stale
            loaded = flags.loaded_at

            await away(url, engine)
            for _ in range(3):
                await flags.refresh()  # never raises
            await eventually(lambda: flags.stale, timeout=PROPAGATES, what="a refresh against no database did not notice")
            await asyncio.sleep(0.5)  # the background task tries a few more times meanwhile
            assert flags.is_on("sending.paused") and flags.state("sending.paused").enabled and flags.loaded_at == loaded
            warnings = [r for r in caplog.records if r.name == "mailqueue.flags" and "not loaded" in r.getMessage()]
            assert len(warnings) == 1, [r.getMessage() for r in caplog.records]

            # Back, with another value: the background task (still running) picks it up.
            await back(url)
            async with sessions() as s:
                s.add(FeatureFlag(key="sending.paused", enabled=False, senders=[], updated_by="tests"))
                await s.commit()
            await eventually(lambda: not flags.is_on("sending.paused"), timeout=PROPAGATES, what="the flags never loaded again")
            assert not flags.stale and flags.loaded_at is not None and loaded is not None and flags.loaded_at > loaded
        finally:
            await flags.aclose()
            await engine.dispose()


async def away(url: str, engine: Any) -> None:
    """The database gone: PostgreSQL's dropped (its connections cut), SQLite's file removed."""
    if url.startswith("sqlite"):
        database = Path(sa.make_url(url).database or "")
        for path in (database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")):
            path.unlink(missing_ok=True)
        await engine.dispose()  # the pooled connection would keep the removed file open; a new one finds no tables
        return
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{sa.make_url(url).database}" WITH (FORCE)')


async def back(url: str) -> None:
    if not url.startswith("sqlite"):
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{sa.make_url(url).database}"')
    await asyncio.to_thread(migrate, url)
