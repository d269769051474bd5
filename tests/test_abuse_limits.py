"""Abuse limits over real HTTP (uvicorn child, worker, PostgreSQL): admin-owned quota ceilings, a
recipients-per-hour cap, a priority ceiling, deactivation; and the small hardening items (the
preview's CSP, SQL parameters kept out of DEBUG logs, the bootstrap key's strength)."""

from __future__ import annotations

import asyncio
import logging
import math
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.net import free_port
from devstack.supervisor import api_command
from mailqueue.config import settings_env
from mailqueue.db import create_engine, migrate, sessionmaker
from mailqueue.logs import SQL_LOGGER_CAPS, configure_logging
from mailqueue.models import User
from tests.conftest import scratch_database
from tests.helpers import KEY, PROCESS_STARTS, ApiProcess, Stack, email, new_user, wait_status

HOUR = 3600


async def patch_user(stack: Stack, user_id: str, **fields: Any) -> dict[str, Any]:
    resp = await stack.http.patch(f"/v1/users/{user_id}", json=fields)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def in_one_window(scenario: Callable[[], Awaitable[None]], seconds: int = HOUR) -> None:
    """Run a scenario that counts in the current hour's (day's) window. Should the window turn
    while it runs (a few seconds in an hour), its counts restart: a failure then is run once more,
    with fresh users, and a window cannot turn twice in that time. A failure within one window fails."""
    start = int(time.time() // seconds)
    try:
        await scenario()
    except AssertionError:
        if int(time.time() // seconds) == start:
            raise
        await scenario()


def recipients(n: int, tag: str) -> list[str]:
    return [f"r{i}-{tag}@example.com" for i in range(n)]


# --- quota ceilings ---------------------------------------------------------------------


async def test_a_user_cannot_raise_their_limits_above_the_admins_ceiling(stack: Stack, sessions: Any) -> None:
    async with new_user(stack, sessions) as user:
        # Before any ceiling: the user's own settings take any limit (as before).
        assert (await user.http.put("/v1/settings/mail", json={"hourly_limit": 500})).status_code == 200
        me = (await user.http.get("/v1/users/me")).json()
        assert (me["hourly_limit"], me["daily_limit"], me["recipients_per_hour"], me["max_priority"]) == (
            None, None, stack.settings.user_recipients_per_hour, stack.settings.user_max_priority,
        )

        shown = await patch_user(stack, user.id, hourly_limit=50, daily_limit=200)
        assert (shown["hourly_limit"], shown["daily_limit"]) == (50, 200)
        for field, value, ceiling in (("hourly_limit", 100, 50), ("daily_limit", 201, 200)):
            refused = await user.http.put("/v1/settings/mail", json={field: value})
            assert refused.status_code == 422, refused.text
            [error] = refused.json()["detail"]
            assert error["loc"] == ["body", field] and f"at most {ceiling}" in error["msg"] and error["ceiling"] == ceiling
        # An admin writing the user's settings is held to the same ceiling; raising it is the way.
        by_admin = await stack.http.put("/v1/settings/mail", params={"user_id": user.id}, json={"hourly_limit": 100})
        assert by_admin.status_code == 422 and by_admin.json()["detail"][0]["loc"] == ["body", "hourly_limit"]

        lower = await user.http.put("/v1/settings/mail", json={"hourly_limit": 40, "daily_limit": 200})
        assert lower.status_code == 200 and lower.json()["hourly_limit"] == 40
        # The user sees their ceilings, read-only: the users API is for admins.
        assert (await user.http.get("/v1/users/me")).json()["hourly_limit"] == 50
        assert (await user.http.patch(f"/v1/users/{user.id}", json={"hourly_limit": 1000})).status_code == 403
        assert (await user.http.get(f"/v1/users/{user.id}")).status_code == 403
    assert (await stack.http.get("/v1/users/me")).status_code == 404  # the bootstrap key is nobody


async def test_the_ceiling_is_the_quota_at_send_when_lower_than_the_users_own(stack: Stack, sessions: Any) -> None:
    async def scenario() -> None:
        async with new_user(stack, sessions) as user:
            assert (await user.http.put("/v1/settings/mail", json={"daily_limit": 100})).status_code == 200
            await patch_user(stack, user.id, daily_limit=1)  # lowered after the user set theirs
            first = await user.http.post("/v1/emails", json=user.mail())
            assert first.status_code == 202, first.text
            await wait_status(stack.http, first.json()["id"], "sent")
            second = await user.http.post("/v1/emails", json=user.mail())
            assert second.status_code == 202, second.text
            waiting = await wait_status(stack.http, second.json()["id"], "deferred")
            assert any("daily limit of 1 " in (e.get("detail") or "") for e in waiting["events"]), waiting["events"]
            cancelled = await user.http.post(f"/v1/emails/{second.json()['id']}/cancel")
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    await in_one_window(scenario, seconds=24 * HOUR)


# --- recipients per hour ------------------------------------------------------------------


async def test_recipients_over_the_hourly_cap_get_429_and_a_replay_counts_nothing(stack: Stack, sessions: Any) -> None:
    async def scenario() -> None:
        async with new_user(stack, sessions, recipients_per_hour=5) as user:
            tag = uuid.uuid4().hex[:6]
            body = user.mail(to=recipients(2, tag), cc=[f"cc-{tag}@example.com"])
            first = await user.http.post("/v1/emails", json=body, headers={"Idempotency-Key": f"k-{tag}"})
            assert first.status_code == 202, first.text
            # A scheduled email counts when it is queued, not when it goes out.
            later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
            scheduled = await user.http.post("/v1/emails", json=user.mail(to=recipients(1, tag + "s"), bcc=[f"bcc-{tag}@example.com"], send_at=later))
            assert scheduled.status_code == 202 and scheduled.json()["status"] == "scheduled", scheduled.text

            before = time.time()
            over = await user.http.post("/v1/emails", json=user.mail(to=recipients(1, tag + "o")))
            after = time.time()
            assert over.status_code == 429, over.text
            assert "5 recipients" in over.json()["detail"] and "5 have been" in over.json()["detail"]
            wait = int(over.headers["Retry-After"])  # to the end of the hour's window
            assert math.ceil((before // HOUR + 1) * HOUR - after) <= wait <= math.ceil((after // HOUR + 1) * HOUR - before)

            # The same Idempotency-Key is the same email: answered again, counted once (the cap is full).
            replay = await user.http.post("/v1/emails", json=body, headers={"Idempotency-Key": f"k-{tag}"})
            assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"], replay.text
            # The system (the bootstrap key) has no cap; other users have their own.
            assert (await stack.http.post("/v1/emails", json=email(to=recipients(10, tag)))).status_code == 202
            assert (await user.http.post(f"/v1/emails/{scheduled.json()['id']}/cancel")).status_code == 200

    await in_one_window(scenario)


async def test_a_batch_over_the_cap_refuses_the_emails_beyond_it(stack: Stack, sessions: Any) -> None:
    async def scenario() -> None:
        async with new_user(stack, sessions, recipients_per_hour=5) as user:
            tag = uuid.uuid4().hex[:6]
            # all_or_nothing: a batch that would pass the cap is refused whole, and counts nothing.
            whole = await user.http.post("/v1/emails/batch", json={
                "all_or_nothing": True, "emails": [user.mail(to=recipients(3, tag + "a")), user.mail(to=recipients(3, tag + "b"))],
            })
            assert whole.status_code == 429 and "this would add 6" in whole.json()["detail"], whole.text
            assert int(whole.headers["Retry-After"]) > 0

            sizes = [2, 2, 2, 1, 1]
            batch = await user.http.post("/v1/emails/batch", json={
                "emails": [user.mail(to=recipients(n, f"{tag}{i}")) for i, n in enumerate(sizes)],
            })
            assert batch.status_code == 200, batch.text
            items = batch.json()["items"]
            assert [i["status"] for i in items] == [202, 202, 429, 202, 429], items
            assert "recipient limit reached" in items[2]["detail"][0]["msg"] and items[2]["detail"][0]["retry_after"] > 0
            assert (batch.json()["accepted"], batch.json()["rejected"]) == (3, 2)
            listed = (await user.http.get("/v1/emails", params={"page_size": 100})).json()
            assert listed["total"] == 3 and sum(len(e["to"]) for e in listed["items"]) == 5

    await in_one_window(scenario)


async def test_racing_requests_on_two_api_processes_never_pass_the_cap(stack: Stack, sessions: Any) -> None:
    """The count lives in the database: two API processes, 24 requests at once, a cap of 10."""
    async with ApiProcess(stack.settings, stack.tmp / "api-2.log") as second:

        async def scenario() -> None:
            async with new_user(stack, sessions, recipients_per_hour=10) as user:
                tag = uuid.uuid4().hex[:6]
                later = (datetime.now(UTC) + timedelta(days=30)).isoformat()  # nothing needs to go out
                headers = {"Authorization": f"Bearer {user.key}"}
                async with httpx.AsyncClient(base_url=second.url, headers=headers, timeout=60) as other:
                    clients = [user.http, other]
                    answers = await asyncio.gather(*(
                        clients[i % 2].post("/v1/emails", json=user.mail(to=recipients(1, f"{tag}{i}"), send_at=later))
                        for i in range(24)
                    ))
                codes = sorted(a.status_code for a in answers)
                assert codes == [202] * 10 + [429] * 14, [a.text for a in answers if a.status_code not in (202, 429)]
                for a in answers:
                    if a.status_code == 202:
                        assert (await user.http.post(f"/v1/emails/{a.json()['id']}/cancel")).status_code == 200

        await in_one_window(scenario)


# --- priority ceiling -------------------------------------------------------------------


async def test_priority_above_the_users_ceiling_is_refused_and_admins_are_not_limited(stack: Stack, sessions: Any) -> None:
    assert stack.settings.user_max_priority == "normal"
    async with new_user(stack, sessions) as user:
        for asked in ("high", 1, 4):
            refused = await user.http.post("/v1/emails", json=user.mail(priority=asked))
            assert refused.status_code == 422, refused.text
            [error] = refused.json()["detail"]
            assert error["loc"] == ["body", "priority"] and "ceiling of normal" in error["msg"] and "5 to 10" in error["msg"]
        for allowed in ("normal", "low", 5, 10):
            assert (await user.http.post("/v1/emails", json=user.mail(priority=allowed))).status_code == 202

        assert (await patch_user(stack, user.id, max_priority="high"))["max_priority"] == "high"
        high = await user.http.post("/v1/emails", json=user.mail(priority="high"))
        assert high.status_code == 202, high.text
        assert (await user.http.get(f"/v1/emails/{high.json()['id']}")).json()["priority"] == "high"

        assert (await patch_user(stack, user.id, max_priority="low"))["max_priority"] == "low"
        assert (await user.http.post("/v1/emails", json=user.mail(priority="normal"))).status_code == 422
        assert (await patch_user(stack, user.id, max_priority=None))["max_priority"] == "normal"  # back to the default

    assert (await stack.http.post("/v1/emails", json=email(priority="high"))).status_code == 202  # the bootstrap key
    async with new_user(stack, sessions, role="admin") as admin:
        assert (await admin.http.post("/v1/emails", json=admin.mail(priority=1))).status_code == 202


# --- deactivation --------------------------------------------------------------------------


async def test_a_deactivated_users_every_key_is_refused_at_once_and_reactivation_restores_them(stack: Stack, sessions: Any) -> None:
    async with new_user(stack, sessions) as user:
        second = (await stack.http.post(f"/v1/users/{user.id}/api-keys")).json()["key"]
        keys = [user.key, second]

        async def answers() -> list[int]:
            async with httpx.AsyncClient(base_url=str(stack.http.base_url), timeout=30) as anon:
                codes = [(await anon.get("/v1/users/me", headers={"Authorization": f"Bearer {k}"})).status_code for k in keys]
                codes.append((await anon.post("/v1/emails", json=user.mail(), headers={"Authorization": f"Bearer {keys[1]}"})).status_code)
                codes.append((await anon.get("/v1/templates/x/preview", auth=("me", keys[0]))).status_code)  # Basic, for browsers
                return codes

        assert (await answers())[:3] == [200, 200, 202]
        assert (await patch_user(stack, user.id, is_active=False))["is_active"] is False
        assert await answers() == [401, 401, 401, 401]  # the very next request of each key
        assert (await stack.http.get(f"/v1/users/{user.id}")).json()["is_active"] is False
        assert (await stack.http.patch(f"/v1/users/{user.id}", json={"is_active": None})).status_code == 422

        assert (await patch_user(stack, user.id, is_active=True))["is_active"] is True
        assert (await answers())[:3] == [200, 200, 202]


async def test_nobody_deactivates_themselves_or_the_last_active_admin(stack: Stack, tmp_path: Path) -> None:
    """In a database of its own: "the last active admin" is about every user there is."""
    with scratch_database(tmp_path) as url:
        settings = stack.settings.model_copy(update={"database_url": url})
        async with ApiProcess(settings, tmp_path / "api.log") as api:

            def client(key: str) -> httpx.AsyncClient:
                return httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

            async with client(KEY) as root:

                async def admin() -> tuple[str, str]:
                    made = (await root.post("/v1/users", json={"name": f"admin-{uuid.uuid4().hex[:8]}", "role": "admin"})).json()
                    return made["id"], (await root.post(f"/v1/users/{made['id']}/api-keys")).json()["key"]

                first_id, first_key = await admin()
                async with client(first_key) as first:
                    itself = await first.patch(f"/v1/users/{first_id}", json={"is_active": False})
                    assert itself.status_code == 409 and "yourself" in itself.json()["detail"]
                    last = await root.patch(f"/v1/users/{first_id}", json={"is_active": False})
                    assert last.status_code == 409 and "last active admin" in last.json()["detail"]
                    # An ordinary user can always be deactivated, by any admin.
                    plain = (await root.post("/v1/users", json={"name": f"plain-{uuid.uuid4().hex[:8]}"})).json()
                    assert (await first.patch(f"/v1/users/{plain['id']}", json={"is_active": False})).status_code == 200

                # Two admins deactivating each other at the same moment: one of them stays active.
                keys, remaining = {first_id: first_key}, first_id
                for _ in range(5):
                    other_id, keys[other_id] = await admin()
                    async with client(keys[remaining]) as mine, client(keys[other_id]) as other:
                        a, b = await asyncio.gather(
                            mine.patch(f"/v1/users/{other_id}", json={"is_active": False}),
                            other.patch(f"/v1/users/{remaining}", json={"is_active": False}),
                        )
                    # The loser's request found itself refused: 409 (the last admin), or 401 (already deactivated).
                    assert sorted([a.status_code, b.status_code]) in ([200, 401], [200, 409]), (a.text, b.text)
                    active = [u["id"] for u in (await root.get("/v1/users")).json() if u["role"] == "admin" and u["is_active"]]
                    assert len(active) == 1, active
                    remaining = active[0]


# --- smaller hardening ----------------------------------------------------------------------


async def test_the_preview_loads_nothing_remote_and_cannot_be_framed(stack: Stack) -> None:
    name = f"Csp{uuid.uuid4().hex[:8]}"
    made = await stack.http.post("/v1/templates", json={
        "name": name, "subject": "Hi", "html": '<p>Hi <img src="https://tracker.example/pixel.gif"></p>',
    })
    assert made.status_code == 201, made.text
    page = await stack.http.get(f"/v1/templates/{name}/preview")
    assert page.status_code == 200
    csp = [d.strip() for d in page.headers["Content-Security-Policy"].split(";")]
    assert csp == ["sandbox", "default-src 'none'", "img-src data:", "style-src 'unsafe-inline'", "font-src data:", "frame-ancestors 'none'"]
    assert page.headers["X-Content-Type-Options"] == "nosniff" and page.headers["Referrer-Policy"] == "no-referrer"


@pytest.fixture
def restore_logging() -> Any:
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {name: logging.getLogger(name).level for name in SQL_LOGGER_CAPS}
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


async def test_sql_parameters_stay_out_of_debug_logs(tmp_path: Path, capfd: pytest.CaptureFixture[str], restore_logging: Any) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    migrate(url)
    engine = create_engine(url)
    sessions = sessionmaker(engine)

    async def insert(address: str) -> str:
        async with sessions() as s:
            s.add(User(id=str(uuid.uuid4()), name=address, email=address))
            await s.commit()
        return capfd.readouterr().err

    try:
        configure_logging("DEBUG")
        logging.getLogger("mailqueue.tests").debug("debug is on")
        logged = await insert("secret-ann@example.com")
        assert "debug is on" in logged  # the level is DEBUG indeed
        assert "secret-ann@example.com" not in logged

        # The check can fail: uncapped, aiosqlite writes the parameters at DEBUG.
        logging.getLogger("aiosqlite").setLevel(logging.DEBUG)
        assert "secret-bob@example.com" in await insert("secret-bob@example.com")
    finally:
        logging.getLogger("aiosqlite").setLevel(logging.INFO)  # quiet before its thread says goodbye
        await engine.dispose()


@pytest.mark.parametrize("weak", ["test-admin-key", "ab" * 20], ids=["short", "few-distinct-characters"])
async def test_the_api_refuses_to_start_with_a_weak_bootstrap_key(stack: Stack, tmp_path: Path, weak: str) -> None:
    settings = stack.settings.model_copy(update={"bootstrap_api_key": weak})
    port = free_port()
    finished = await asyncio.to_thread(
        subprocess.run, api_command("127.0.0.1", port), env=settings_env(settings), capture_output=True, text=True,
        timeout=PROCESS_STARTS, cwd=Path(__file__).resolve().parents[1],
    )
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0, output
    assert "MAILQUEUE_BOOTSTRAP_API_KEY is too weak" in output and "secrets.token_urlsafe(32)" in output, output
    assert weak not in output  # the refusal never quotes the key
    assert "Application startup failed" in output


async def test_the_api_refuses_to_start_with_a_malformed_system_domain(stack: Stack) -> None:
    """A typo in the reserved domains is found at start, not as a 500 on some user's first email."""
    settings = stack.settings.model_copy(update={"system_domains": ["not a domain"]})
    finished = await asyncio.to_thread(
        subprocess.run, api_command("127.0.0.1", free_port()), env=settings_env(settings), capture_output=True, text=True,
        timeout=PROCESS_STARTS, cwd=Path(__file__).resolve().parents[1],
    )
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0, output
    assert "MAILQUEUE_SYSTEM_DOMAINS" in output and "'not a domain' is not a valid domain name" in output, output
    assert "Application startup failed" in output
