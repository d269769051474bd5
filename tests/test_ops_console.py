"""The ops console (/ops) in a real browser: Playwright driving Debian's chromium against the real stack
(an API process, a worker, an SMTP sink). Every page is screenshotted into test-artifacts/ops/, and every
page's console is watched: a JavaScript error, or a load that failed unexpectedly, fails the test."""

from __future__ import annotations

import base64
import json
import re
import uuid
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, async_playwright

from devstack.browser import BrowserMissing, ensure_chromium
from mailqueue.flags import SENDING_PAUSED
from tests.helpers import KEY, ROOT, Stack, delivered, email, eventually, new_user, wait_status

ARTIFACTS = ROOT / "test-artifacts" / "ops"
PAGE_LOADS = 60_000  # ms: how long a page or a click may take on a busy machine (Playwright's own waits end at once)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Debian's chromium (`make test` installs it when missing), never a downloaded browser, and never a skip."""
    try:
        executable = ensure_chromium()
    except BrowserMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(executable), headless=True)
        try:
            yield launched
        finally:
            await launched.close()


class Console:
    """One browser context (its own cookies: one operator), with every page's console errors and
    uncaught exceptions collected, and a screenshot of each page it is asked to keep."""

    def __init__(self, context: BrowserContext, base: str, name: str) -> None:
        self.context, self.base, self.name = context, base, name
        self.errors: list[str] = []
        self.page: Page

    async def open(self) -> Console:
        self.page = await self.context.new_page()
        self.page.set_default_timeout(PAGE_LOADS)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        return self

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"{message.text} ({message.location.get('url', '')})")

    def answered(self, status: int) -> None:
        """The page just shown was answered `status` on purpose (a refusal): the line the browser may log
        for it ("Failed to load resource: ... status of 409") is no error of the page's."""
        self.errors[:] = [e for e in self.errors if f"the server responded with a status of {status}" not in e]

    async def goto(self, path: str) -> Page:
        await self.page.goto(self.base + path)
        return self.page

    async def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    async def login(self, key: str) -> Page:
        page = await self.goto("/ops/login")
        await page.fill("#key", key)
        await page.click("#login")
        await page.wait_for_url(f"{self.base}/ops")
        return page

    async def csrf(self) -> str:
        token = await self.page.locator("input[name=csrf_token]").first.get_attribute("value")
        assert token, "the page has no CSRF token"
        return token


@pytest.fixture
async def console(browser: Browser, stack: Stack, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Opens operators' browsers (each its own context); after the test, no page of any had a console error."""
    opened: list[Console] = []

    async def open_one(name: str = "admin") -> Console:
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        one = await Console(context, str(stack.http.base_url).rstrip("/"), name).open()
        opened.append(one)
        return one

    yield open_one
    errors = {c.name: c.errors for c in opened if c.errors}
    for c in opened:
        await c.context.close()
    assert errors == {}, f"console errors: {errors}"


async def figures(page: Page) -> dict[str, Any]:
    """The overview's numbers as the page shows them."""
    rows = await page.locator("#by-status tbody tr[data-status]").all()
    by_status = {await r.get_attribute("data-status"): int(await r.locator("td.num").inner_text()) for r in rows}
    number = {name: int(await page.locator(f"#{name}").inner_text()) for name in ("queue-depth", "stuck", "sent-last-hour")}
    return {"by_status": by_status, **number}


def stats_figures(stats: dict[str, Any]) -> dict[str, Any]:
    return {"by_status": stats["by_status"], "queue-depth": stats["queue_depth"], "stuck": stats["stuck"],
            "sent-last-hour": stats["sent_last_hour"]}


async def overview_matches(ops: Console, http: httpx.AsyncClient) -> dict[str, Any]:
    """The overview shows what /v1/stats says (asked again until both were read between the same changes)."""
    seen: dict[str, Any] = {}

    async def same() -> bool:
        page = await ops.goto("/ops")
        seen["page"] = await figures(page)
        seen["api"] = stats_figures((await http.get("/v1/stats")).json())
        return seen["page"] == seen["api"]

    await eventually(same, timeout=60, interval=0.5, what=lambda: f"the overview {seen.get('page')} != /v1/stats {seen.get('api')}")
    return seen["page"]


async def test_an_admin_logs_in_and_the_overview_matches_the_stats(stack: Stack, console: Any) -> None:
    sent_id = (await stack.http.post("/v1/emails", json=email(subject="overview"))).json()["id"]
    await wait_status(stack.http, sent_id, "sent")
    ops = await console()
    page = await ops.goto("/ops")
    assert page.url == f"{ops.base}/ops/login", "without a login, the console sends the browser to the login page"
    await ops.shot("login")
    # The watch can fail: an error thrown in the page is caught (and then set aside, being the test's own).
    await page.evaluate("setTimeout(() => { throw new Error('the watch works') })")
    await eventually(lambda: any("the watch works" in e for e in ops.errors), timeout=30, what=f"no page error seen: {ops.errors}")
    ops.errors.clear()
    page = await ops.login(KEY)
    assert await page.locator("#who").inner_text() == "bootstrap admin"
    shown = await overview_matches(ops, stack.http)
    assert shown["by_status"].get("sent", 0) >= 1 and shown["sent-last-hour"] >= 1
    # The chart: an SVG drawn by the server, a bar for each minute that sent something, the last hour's total in its label.
    label = await page.locator("#sends-chart").get_attribute("aria-label")
    assert label is not None and re.match(r"\d+ sent in the last hour", label) and int(label.split()[0]) >= 1
    assert await page.locator("#sends-chart rect.bar").count() >= 1
    assert await page.locator("#kill-switch").inner_text() in ("sending", "paused")
    await ops.shot("overview")
    for path, name in (("/ops/emails", "emails"), ("/ops/users", "users"), ("/ops/flags", "flags"), ("/ops/audit", "audit")):
        await ops.goto(path)
        await ops.shot(name)


async def test_a_failed_email_is_retried_from_its_page_and_then_sent(stack: Stack, console: Any) -> None:
    stack.sink.handler.data_replies.append("550 5.7.1 Rejected")
    pdf = {"filename": "Lieferschein März.pdf", "content": base64.b64encode(b"%PDF-1.7\nops\n").decode()}
    email_id = (await stack.http.post("/v1/emails", json=email(subject="fails once", html="<p>Retried <b>body</b></p>",
                                                                attachments=[pdf]))).json()["id"]
    await wait_status(stack.http, email_id, "failed")
    ops = await console()
    await ops.login(KEY)
    page = await ops.goto("/ops/emails?status=failed")
    assert await page.locator(f"#emails tr[data-id='{email_id}']").count() == 1
    assert set(await page.locator("#emails tr[data-id]").evaluate_all("rows => rows.map(r => r.dataset.status)")) == {"failed"}
    await page.click(f"#emails tr[data-id='{email_id}'] a")
    await page.wait_for_url(f"{ops.base}/ops/emails/{email_id}")
    assert await page.locator("#status").inner_text() == "failed"
    assert "550 5.7.1 Rejected" in await page.locator("table.facts").inner_text()
    assert "Lieferschein März.pdf\tapplication/pdf\t13 bytes" in await page.locator("#attachments").inner_text()
    assert await page.locator("#timeline li").evaluate_all("items => items.map(i => i.dataset.event)") == ["queued", "sending", "failed"]
    link = await page.locator("#temporal-link").get_attribute("href")
    assert link == f"http://localhost:8233/namespaces/default/workflows/email-{email_id}"
    # The mail as sent, in a sandboxed frame (no scripts, an origin of its own).
    assert await page.locator("#mail").get_attribute("sandbox") == ""
    assert (await page.frame_locator("#mail").locator("body").inner_text()).strip() == "Retried body"
    await ops.shot("email-failed")

    await page.click("#retry")
    await page.wait_for_url(f"{ops.base}/ops/emails/{email_id}?done=retried")
    assert "Queued again" in await page.locator("#done").inner_text()
    await delivered(stack.sink, email_id)

    async def shows_sent() -> bool:
        await page.reload()
        return await page.locator("#status").inner_text() == "sent"

    await eventually(shows_sent, timeout=60, interval=0.5, what=f"the page of {email_id} never said sent")
    events = await page.locator("#timeline li").evaluate_all("items => items.map(i => i.dataset.event)")
    assert events == ["queued", "sending", "failed", "queued", "sending", "sent"]
    assert await page.locator("#retry").count() == 0, "a sent email offers no retry"
    await ops.shot("email-sent")


async def test_a_scheduled_email_is_rescheduled_and_cancelled_from_its_page(stack: Stack, console: Any) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    email_id = (await stack.http.post("/v1/emails", json=email(send_at=later.isoformat()))).json()["id"]
    await wait_status(stack.http, email_id, "scheduled")
    ops = await console()
    await ops.login(KEY)
    page = await ops.goto(f"/ops/emails/{email_id}")
    assert await page.locator("#retry").count() == 0, "only failed emails offer a retry"
    new_time = (datetime.now(UTC) + timedelta(hours=2)).replace(second=0, microsecond=0)
    await page.fill("#send-at", new_time.strftime("%Y-%m-%dT%H:%M"))
    await page.click("#reschedule")
    await page.wait_for_url(f"{ops.base}/ops/emails/{email_id}?done=rescheduled")
    api = (await stack.http.get(f"/v1/emails/{email_id}")).json()
    assert datetime.fromisoformat(api["scheduled_for"]) == new_time and api["events"][-1]["event"] == "rescheduled"

    await page.fill("#cancel-form input[name=reason]", "the order was withdrawn")
    await page.click("#cancel")
    await page.wait_for_url(f"{ops.base}/ops/emails/{email_id}?done=cancelled")
    assert await page.locator("#status").inner_text() == "cancelled"
    assert await page.locator("#timeline li").last.get_attribute("data-event") == "cancelled"
    assert "the order was withdrawn" in await page.locator("#timeline li").last.inner_text()
    assert (await stack.http.get(f"/v1/emails/{email_id}")).json()["status"] == "cancelled"
    assert await page.locator("#cancel").count() == 0
    await ops.shot("email-cancelled")


async def test_a_refused_change_shows_the_apis_own_words(stack: Stack, console: Any) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    email_id = (await stack.http.post("/v1/emails", json=email(send_at=later.isoformat()))).json()["id"]
    await wait_status(stack.http, email_id, "scheduled")
    ops = await console()
    await ops.login(KEY)
    page = await ops.goto(f"/ops/emails/{email_id}")  # the page still offers Cancel ...
    assert (await stack.http.post(f"/v1/emails/{email_id}/cancel")).status_code == 200  # ... but someone else was first
    refusal = await stack.http.post(f"/v1/emails/{email_id}/cancel")
    assert refusal.status_code == 409
    await page.click("#cancel")
    assert await page.locator("#error").inner_text() == refusal.json()["detail"]
    ops.answered(409)
    assert await page.locator("#status").inner_text() == "cancelled"
    await ops.shot("email-refused")


async def test_the_kill_switch_is_toggled_with_a_reason_and_audited(stack: Stack, console: Any) -> None:
    reason = f"drill {uuid.uuid4().hex[:8]}: <the relay> drops mail"
    ops = await console()
    await ops.login(KEY)
    try:
        page = await ops.goto("/ops/flags")
        row = page.locator(f"#flags tr[data-key='{SENDING_PAUSED}']")
        assert await row.get_attribute("data-value") == "off"
        await row.locator("input[name=reason]").fill(reason)
        await row.locator("button").click()
        await page.wait_for_url(f"{ops.base}/ops/flags?done=flag")
        assert await page.locator(f"#flags tr[data-key='{SENDING_PAUSED}']").get_attribute("data-value") == "on"
        flag = (await stack.http.get(f"/v1/flags/{SENDING_PAUSED}")).json()
        assert flag["value"] is True and flag["updated_by"] == "admin"
        await ops.shot("flags-paused")
        await ops.goto("/ops")
        assert await page.locator("#kill-switch").inner_text() == "paused"
        assert await page.locator("#kill-switch-badge").is_visible()
        await ops.shot("overview-paused")

        page = await ops.goto("/ops/flags")
        row = page.locator(f"#flags tr[data-key='{SENDING_PAUSED}']")
        await row.locator("input[name=reason]").fill(f"{reason}, over")
        await row.locator("button").click()
        await page.wait_for_url(f"{ops.base}/ops/flags?done=flag")
        assert (await stack.http.get(f"/v1/flags/{SENDING_PAUSED}")).json()["value"] is False

        page = await ops.goto("/ops/audit")
        rows = page.locator("#audit tbody tr[data-key]")
        newest = [await rows.nth(i).locator("td.reason").inner_text() for i in range(2)]
        assert newest == [f"{reason}, over", reason], "both changes, newest first, with their reasons (shown as text)"
        assert await rows.nth(1).locator("td").nth(2).inner_text() == "admin"
        api = (await stack.http.get("/v1/audit")).json()["items"]
        assert [a["reason"] for a in api[:2]] == newest
        await ops.shot("audit")
    finally:
        await stack.http.put(f"/v1/flags/{SENDING_PAUSED}", json={"enabled": False, "reason": "test cleanup"})


async def test_a_post_without_the_sessions_csrf_token_is_refused(stack: Stack, console: Any) -> None:
    audited = (await stack.http.get("/v1/audit")).json()["total"]
    ops = await console()
    await ops.login(KEY)
    page = await ops.goto("/ops/flags")
    token = await ops.csrf()
    target = f"{ops.base}/ops/flags/{SENDING_PAUSED}"
    change = {"enabled": "true", "reason": "forged"}
    other = await console("other")
    await other.goto("/ops/login")
    foreign = await other.csrf()  # a real token, of another browser's session
    for form in (change, {**change, "csrf_token": "forged"}, {**change, "csrf_token": foreign}):
        answer = await page.request.post(target, form=form, max_redirects=0)
        assert answer.status == 403, await answer.text()
        assert "CSRF token" in await answer.text()
    answer = await page.request.post(f"{ops.base}/ops/emails/{uuid.uuid4()}/cancel", form={})
    assert answer.status == 403
    # The login form too: a key posted from elsewhere logs nobody in.
    login = await other.page.request.post(f"{ops.base}/ops/login", form={"key": KEY}, max_redirects=0)
    assert login.status == 403
    assert (await stack.http.get(f"/v1/flags/{SENDING_PAUSED}")).json()["value"] is False
    assert (await stack.http.get("/v1/audit")).json()["total"] == audited
    # With the token, the same request goes through: the refusals above were the token's doing.
    answer = await page.request.post(target, form={"enabled": "false", "reason": "csrf test: unchanged", "csrf_token": token},
                                     max_redirects=0)
    assert answer.status == 303
    assert (await stack.http.get("/v1/audit")).json()["total"] == audited + 1


async def test_logging_out_ends_the_session(stack: Stack, console: Any) -> None:
    ops = await console()
    page = await ops.login(KEY)
    token = await ops.csrf()
    cookies = [c for c in await ops.context.cookies() if c["name"] == "mailqueue_ops"]
    assert len(cookies) == 1 and cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict" and cookies[0]["path"] == "/ops"
    value = cookies[0]["value"]
    payload = value.lstrip(".").split(".")[0]  # itsdangerous: [.]base64(json, zlib'd when the dot leads).timestamp.signature
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    held = json.loads(zlib.decompress(raw) if value.startswith(".") else raw)
    assert held["key"] == "bootstrap" and KEY not in json.dumps(held), "the cookie names the key, never holds it"
    await page.click("#logout")
    await page.wait_for_url(f"{ops.base}/ops/login")
    await ops.goto("/ops/emails")
    assert page.url == f"{ops.base}/ops/login"
    # The form of the ended session, token and all, changes nothing: there is no session to act for.
    answer = await page.request.post(f"{ops.base}/ops/flags/{SENDING_PAUSED}", form={"enabled": "true", "reason": "x", "csrf_token": token},
                                     max_redirects=0)
    assert answer.status == 303 and answer.headers["location"] == "/ops/login"
    assert (await stack.http.get(f"/v1/flags/{SENDING_PAUSED}")).json()["value"] is False


async def test_a_users_login_sees_only_their_own_emails(stack: Stack, sessions: Any, console: Any) -> None:
    async with new_user(stack, sessions) as user:
        theirs = (await user.http.post("/v1/emails", json=user.mail(subject="the user's own"))).json()["id"]
        others = (await stack.http.post("/v1/emails", json=email(subject="the system's"))).json()["id"]
        await wait_status(user.http, theirs, "sent")
        await wait_status(stack.http, others, "sent")
        ops = await console("user")
        page = await ops.login(user.key)
        assert user.id in await page.locator("#who").inner_text()
        assert await page.locator("header nav a[data-page=users]").count() == 0
        await overview_matches(ops, user.http)
        await ops.shot("user-overview")

        page = await ops.goto("/ops/emails")
        listed = await page.locator("#emails tr[data-id]").evaluate_all("rows => rows.map(r => r.dataset.id)")
        mine = [e["id"] for e in (await user.http.get("/v1/emails", params={"page_size": 100})).json()["items"]]
        assert listed == mine and theirs in listed and others not in listed
        await ops.shot("user-emails")
        await ops.goto(f"/ops/emails/{others}")
        ops.answered(404)
        assert await page.locator("h1").inner_text() == "Not found"
        assert (await page.request.get(f"{ops.base}/ops/emails/{others}/mail")).status == 404
        await ops.goto("/ops/users")
        ops.answered(403)
        assert "needs an admin key" in await page.locator("#error").inner_text()

        # Revoking the key the session was opened with ends the session at the next page.
        keys = (await stack.http.get(f"/v1/users/{user.id}")).json()["api_keys"]
        admin = await console()
        await admin.login(KEY)
        page_admin = await admin.goto("/ops/users")
        await page_admin.locator(f"li[data-key-id='{keys[0]['id']}'] button.revoke").click()
        await page_admin.wait_for_url(f"{admin.base}/ops/users?done=revoked")
        assert "revoked" in await page_admin.locator(f"li[data-key-id='{keys[0]['id']}']").inner_text()
        await ops.goto("/ops")
        assert ops.page.url == f"{ops.base}/ops/login"


async def test_an_admin_issues_a_key_shown_once_and_revokes_it(stack: Stack, sessions: Any, console: Any) -> None:
    async with new_user(stack, sessions) as user:
        ops = await console()
        await ops.login(KEY)
        page = await ops.goto("/ops/users")
        row = page.locator(f"#users tr[data-id='{user.id}']")
        await row.locator("input[name=name]").fill("deploy bot")
        await row.locator("button.issue-key").click()
        key = await page.locator("#issued-key").inner_text()
        await ops.shot("users-key-issued")
        async with httpx.AsyncClient(base_url=str(stack.http.base_url), headers={"Authorization": f"Bearer {key}"}) as http:
            assert (await http.get("/v1/users/me")).json()["id"] == user.id
            await ops.goto("/ops/users")
            assert await page.locator("#issued-key").count() == 0, "a key is shown once"
            assert key not in await page.content()
            issued = [k for k in (await stack.http.get(f"/v1/users/{user.id}")).json()["api_keys"] if k["name"] == "deploy bot"]
            await page.locator(f"li[data-key-id='{issued[0]['id']}'] button.revoke").click()
            await page.wait_for_url(f"{ops.base}/ops/users?done=revoked")
            assert (await http.get("/v1/users/me")).status_code == 401


async def test_templates_show_their_versions_and_a_preview_per_locale(stack: Stack, console: Any) -> None:
    assert (await stack.http.post("/v1/templates/reload")).status_code == 200
    every = (await stack.http.get("/v1/templates", params={"include_inactive": "true"})).json()
    active = (await stack.http.get("/v1/templates")).json()
    locales = sorted(t["locale"] for t in active if t["name"] == "PasswordReset")
    assert "de" in locales and "" in locales, "the templates folder has PasswordReset in English and German"
    ops = await console()
    await ops.login(KEY)
    page = await ops.goto("/ops/templates")
    assert await page.locator("#templates tr[data-name='PasswordReset']").count() == sum(t["name"] == "PasswordReset" for t in every)
    await ops.shot("templates")
    for locale in locales:
        page = await ops.goto(f"/ops/templates/PasswordReset?locale={locale}")
        preview = (await stack.http.post("/v1/templates/PasswordReset/preview", json={"locale": locale or None})).json()
        assert await page.locator("#preview-subject").inner_text() == preview["subject"]
        assert await page.locator("#preview-html").get_attribute("sandbox") == ""
        frame_text = await page.frame_locator("#preview-html").locator("body").inner_text()
        assert frame_text.strip(), f"the {locale or 'default'} preview rendered nothing"
        versions = (await stack.http.get("/v1/templates/PasswordReset/versions", params={"locale": locale})).json()
        assert await page.locator("#versions tbody tr").count() == len(versions)
        await ops.shot(f"template-{locale or 'default'}")
