"""The HTTP API over real HTTP: uvicorn in a child process, a real worker, SMTP and database."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from temporalio.client import Client

from api.app import file_body_limits
from devstack.net import free_port
from tests.helpers import (
    AUTH,
    UNREACHABLE_DATABASE,
    ApiProcess,
    Stack,
    closed_run,
    delivered,
    email,
    sends_scheduled,
    total_emails,
    wait_status,
)

# --- auth and probes ---------------------------------------------------------------


async def test_requests_without_a_valid_key_get_401(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=str(stack.http.base_url)) as anon:
        assert (await anon.get("/v1/emails")).status_code == 401
        wrong = await anon.post("/v1/emails", json=email(), headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
        assert (await anon.get("/v1/emails/x", headers={"Authorization": "Basic abc"})).status_code == 401


async def test_probes_and_docs_are_open(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=str(stack.http.base_url)) as anon:
        assert (await anon.get("/healthz")).json() == {"status": "ok"}
        ready = await anon.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "temporal": "ok"}
        assert (await anon.get("/docs")).status_code == 200
        schema = (await anon.get("/openapi.json")).json()
        request_schema = schema["components"]["schemas"]["EmailRequest"]
        assert request_schema["examples"] and "/v1/emails/{email_id}/cancel" in schema["paths"]


# --- send, read, list -----------------------------------------------------------------


async def test_post_queues_and_delivers_an_email(stack: Stack) -> None:
    resp = await stack.http.post("/v1/emails", json=email(related_entity={"type": "Order", "id": "A-1"}, tags=["t1"]))
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["status"] == "queued" and body["workflow_id"] == f"email-{body['id']}"
    assert resp.headers["Location"] == f"/v1/emails/{body['id']}"
    assert uuid.UUID(body["id"]).version == 7

    [caught] = await delivered(stack.sink, body["id"])
    assert caught.message["Subject"] == "Hello" and caught.rcpt_tos == ["ann@example.com"]
    got = await wait_status(stack.http, body["id"], "sent")
    assert [e["event"] for e in got["events"]] == ["queued", "sending", "sent"]
    assert got["from"] == "mailqueue <noreply@example.com>" and got["to"] == ["Ann Smith <ann@example.com>"]
    assert got["message_id"] == caught.message["Message-ID"] and got["attempts"] == 1
    assert got["related_entity"] == {"type": "Order", "id": "A-1"} and got["sent_at"]


async def test_get_unknown_email_is_404(stack: Stack) -> None:
    resp = await stack.http.get(f"/v1/emails/{uuid.uuid4()}")
    assert resp.status_code == 404 and "no email" in resp.json()["detail"]


async def test_list_filters_and_paginates(stack: Stack) -> None:
    marker = uuid.uuid4().hex[:10]
    rcpt = f"list-{marker}@example.com"
    ids = []
    for _ in range(3):
        r = await stack.http.post(
            "/v1/emails", json=email(to=[rcpt], cc=["other@example.com"], related_entity={"type": "Batch", "id": marker})
        )
        ids.append(r.json()["id"])
    scheduled = await stack.http.post(
        "/v1/emails",
        json=email(to=[rcpt], send_at=(datetime.now(UTC) + timedelta(hours=2)).isoformat(), related_entity={"type": "Batch", "id": marker}),
    )
    for i in ids:
        await wait_status(stack.http, i, "sent")
    await wait_status(stack.http, scheduled.json()["id"], "scheduled")

    by_entity = (await stack.http.get("/v1/emails", params={"related_entity_type": "Batch", "related_entity_id": marker})).json()
    assert by_entity["total"] == 4
    by_recipient = (await stack.http.get("/v1/emails", params={"recipient": rcpt.upper()})).json()
    assert by_recipient["total"] == 4
    sent = (await stack.http.get("/v1/emails", params={"recipient": rcpt, "status": "sent"})).json()
    assert sent["total"] == 3 and {e["id"] for e in sent["items"]} == set(ids)
    both = (await stack.http.get("/v1/emails", params=[("recipient", rcpt), ("status", "sent"), ("status", "scheduled")])).json()
    assert both["total"] == 4
    page2 = (await stack.http.get("/v1/emails", params={"recipient": rcpt, "page_size": 3, "page": 2})).json()
    assert page2["total"] == 4 and len(page2["items"]) == 1 and page2["items"][0]["id"] == ids[0]  # newest first
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert (await stack.http.get("/v1/emails", params={"recipient": rcpt, "created_after": future})).json()["total"] == 0
    assert (await stack.http.get("/v1/emails", params={"recipient": rcpt, "created_before": future})).json()["total"] == 4
    bad = await stack.http.get("/v1/emails", params={"status": "lost"})
    assert bad.status_code == 422
    await stack.http.post(f"/v1/emails/{scheduled.json()['id']}/cancel")


async def test_templated_email_is_rendered_and_pinned(stack: Stack) -> None:
    name = f"welcome-{uuid.uuid4().hex[:8]}"
    created = await stack.http.post(
        "/v1/templates",
        json={"name": name, "subject": "Welcome {{ name }}", "html": "<p>Hello {{ name }}</p>", "text": "Hello {{ name }}",
              "default_from": "Team <team@example.com>"},
    )
    assert created.status_code == 201 and created.json()["version"] == 1
    resp = await stack.http.post("/v1/emails", json={"to": ["bob@example.com"], "template": name, "template_data": {"name": "<b>Bob</b>"}})
    assert resp.status_code == 202, resp.text
    [caught] = await delivered(stack.sink, resp.json()["id"])
    assert caught.message["Subject"] == "Welcome <b>Bob</b>"
    assert caught.message["From"] == "Team <team@example.com>"
    assert "&lt;b&gt;Bob&lt;/b&gt;" in caught.message.get_body(("html",)).get_content()
    got = await wait_status(stack.http, resp.json()["id"], "sent")
    assert got["template"] == {"name": name, "version": 1, "locale": None, "requested_locale": None, "dependencies": []} and got["template_data"] == {"name": "<b>Bob</b>"}
    listed = (await stack.http.get("/v1/emails", params={"template": name})).json()
    assert listed["total"] == 1
    assert (await stack.http.get(f"/v1/templates/{name}")).json()["subject"] == "Welcome {{ name }}"


async def test_template_with_bad_syntax_is_422_with_line(stack: Stack) -> None:
    resp = await stack.http.post("/v1/templates", json={"name": "broken", "subject": "Hi", "html": "<p>\n{% if x %}oops</p>"})
    assert resp.status_code == 422
    [err] = resp.json()["detail"]
    assert err["loc"] == ["body", "html"] and "line" in err["msg"]


# --- cancel, retry, reschedule ------------------------------------------------------------


async def test_cancel_scheduled_email(stack: Stack, client: Client) -> None:
    send_at = datetime.now(UTC) + timedelta(seconds=3)
    resp = await stack.http.post("/v1/emails", json=email(send_at=send_at.isoformat()))
    assert resp.json()["status"] == "scheduled"
    email_id = resp.json()["id"]
    await wait_status(stack.http, email_id, "scheduled")

    cancelled = await stack.http.post(f"/v1/emails/{email_id}/cancel", json={"reason": "order withdrawn"})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["events"][-1] == {**cancelled.json()["events"][-1], "event": "cancelled", "detail": "order withdrawn"}
    again = await stack.http.post(f"/v1/emails/{email_id}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    assert "only queued, scheduled, deferred or paused emails can be cancelled" in again.json()["detail"]
    history = await closed_run(client, email_id)  # ended: nothing of it can happen later
    assert sends_scheduled(history) == 0
    assert not [m for m in stack.sink.messages if email_id in str(m.message["Message-ID"])]


async def test_cancel_sent_email_is_409_and_unknown_is_404(stack: Stack) -> None:
    email_id = (await stack.http.post("/v1/emails", json=email())).json()["id"]
    await wait_status(stack.http, email_id, "sent")
    late = await stack.http.post(f"/v1/emails/{email_id}/cancel", json={})
    assert late.status_code == 409 and "already sent" in late.json()["detail"]
    assert (await stack.http.post(f"/v1/emails/{uuid.uuid4()}/cancel")).status_code == 404


async def test_cancel_while_sending_is_409(stack: Stack) -> None:
    stack.sink.handler.data_replies.extend(["451 4.3.0 busy"] * 4)
    email_id = (await stack.http.post("/v1/emails", json=email(max_attempts=6))).json()["id"]
    await wait_status(stack.http, email_id, "retrying")
    resp = await stack.http.post(f"/v1/emails/{email_id}/cancel")
    assert resp.status_code == 409 and "sending" in resp.json()["detail"]
    await wait_status(stack.http, email_id, "sent")


async def test_retry_failed_email(stack: Stack) -> None:
    stack.sink.handler.data_replies.append("550 5.7.1 Rejected")
    email_id = (await stack.http.post("/v1/emails", json=email())).json()["id"]
    failed = await wait_status(stack.http, email_id, "failed")
    assert failed["attempts"] == 1 and "550 5.7.1 Rejected" in failed["last_error"]

    resp = await stack.http.post(f"/v1/emails/{email_id}/retry")
    assert resp.status_code == 202, resp.text
    assert resp.json() == {"id": email_id, "status": "queued", "workflow_id": f"email-{email_id}"}
    [caught] = await delivered(stack.sink, email_id)
    got = await wait_status(stack.http, email_id, "sent")
    assert [e["event"] for e in got["events"]] == ["queued", "sending", "failed", "queued", "sending", "sent"]
    again = await stack.http.post(f"/v1/emails/{email_id}/retry")
    assert again.status_code == 409 and "only failed" in again.json()["detail"]
    assert (await stack.http.post(f"/v1/emails/{uuid.uuid4()}/retry")).status_code == 404


async def test_reschedule_scheduled_email(stack: Stack) -> None:
    email_id = (await stack.http.post("/v1/emails", json=email(send_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat()))).json()["id"]
    await wait_status(stack.http, email_id, "scheduled")
    new_time = datetime.now(UTC) + timedelta(seconds=2)
    resp = await stack.http.patch(f"/v1/emails/{email_id}", json={"send_at": new_time.isoformat()})
    assert resp.status_code == 200, resp.text
    assert datetime.fromisoformat(resp.json()["scheduled_for"]) == new_time
    assert resp.json()["events"][-1]["event"] == "rescheduled"
    [caught] = await delivered(stack.sink, email_id)
    assert caught.received_at >= new_time.timestamp()

    late = await stack.http.patch(f"/v1/emails/{email_id}", json={"send_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat()})
    assert late.status_code == 409
    past = await stack.http.patch(f"/v1/emails/{email_id}", json={"send_at": "2001-01-01T00:00:00Z"})
    assert past.status_code == 422
    assert (await stack.http.patch(f"/v1/emails/{uuid.uuid4()}", json={"send_at": new_time.isoformat()})).status_code == 404


# --- idempotency ------------------------------------------------------------------------------


async def test_idempotency_key_gives_one_email_and_one_delivery(stack: Stack, client: Client) -> None:
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    body = email(subject=f"once {key['Idempotency-Key']}")
    answers = await asyncio.gather(*(stack.http.post("/v1/emails", json=body, headers=key) for _ in range(5)))
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["id"] for a in answers}) == 1
    email_id = answers[0].json()["id"]
    await wait_status(stack.http, email_id, "sent")
    later = await stack.http.post("/v1/emails", json=body, headers=key)
    assert later.status_code == 202 and later.json()["id"] == email_id
    history = await closed_run(client, email_id)  # one run, ended: no copy can come later
    assert sends_scheduled(history) == 1
    assert len([m for m in stack.sink.messages if email_id in str(m.message["Message-ID"])]) == 1

    other = await stack.http.post("/v1/emails", json=email(subject="something else"), headers=key)
    assert other.status_code == 409 and "different request body" in other.json()["detail"]


# --- bad input: 422 with the field, and nothing queued --------------------------------------------

PAST = "2020-01-01T00:00:00Z"
BAD_INPUT = {
    "no recipient": ({"to": [], "subject": "x", "text": "x"}, ["body"], "at least one recipient"),
    "invalid address": (email(to=["not-an-address"]), ["body", "to"], "not a valid email address"),
    "invalid domain": (email(cc=["ann@exa mple.com"]), ["body", "cc"], "not a valid email address"),
    "two addresses in one": (email(to=["a@example.com, b@example.com"]), ["body", "to"], "not one email address"),
    "CR/LF in subject": (email(subject="Hi\r\nBcc: victim@example.com"), ["body", "subject"], "CR or LF"),
    "CR/LF in display name": (email(to=["Ann\r\nBcc: x@example.com <ann@example.com>"]), ["body", "to"], "CR or LF"),
    "CR/LF in header value": (email(headers={"X-Campaign": "a\nBcc: x@example.com"}), ["body", "headers"], "CR or LF"),
    "reserved header": (email(headers={"Message-ID": "<x@y>"}), ["body", "headers"], "set by mailqueue"),
    "bad header name": (email(headers={"X Bad": "1"}), ["body", "headers"], "not a valid field name"),
    "unknown template": ({"to": ["a@example.com"], "template": "no-such-template"}, ["body", "template"], "unknown or inactive template"),
    "html too large": (email(html="x" * 1_000_001), ["body", "html"], "larger than"),
    "template data too large": (
        {"to": ["a@example.com"], "template": "no-such", "template_data": {"blob": "x" * 1_000_001}},
        ["body", "template_data"], "limit",
    ),
    "send_at in the past": (email(send_at=PAST), ["body", "send_at"], "in the past"),
    "send_at without zone": (email(send_at="2030-01-01T09:00:00"), ["body", "send_at"], "timezone"),
    "unknown field": (email(colour="blue"), ["body", "colour"], "Extra inputs"),
    "template and html": ({"to": ["a@example.com"], "template": "t", "html": "x"}, ["body"], "either a template"),
    "no subject": ({"to": ["a@example.com"], "text": "x"}, ["body"], "subject is required"),
    "no body": ({"to": ["a@example.com"], "subject": "x"}, ["body"], "html or text is required"),
    "too many attempts": (email(max_attempts=99), ["body", "max_attempts"], "less than or equal"),
    "bad priority": (email(priority="urgent"), ["body", "priority"], ""),
    "wrong type": (email(to="ann@example.com"), ["body", "to"], "valid list"),
    "too many recipients": (email(to=[f"r{i}@example.com" for i in range(51)]), ["body", "to"], "at most 50"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
async def test_bad_input_is_422_with_the_field_and_queues_nothing(stack: Stack, case: str) -> None:
    body, loc, message = BAD_INPUT[case]
    before = await total_emails(stack.http)
    resp = await stack.http.post("/v1/emails", json=body)
    assert resp.status_code == 422, resp.text
    errors = resp.json()["detail"]
    assert any(e["loc"][: len(loc)] == loc and message in e["msg"] for e in errors), errors
    assert await total_emails(stack.http) == before


async def test_missing_template_variable_is_422_naming_it(stack: Stack) -> None:
    name = f"vars-{uuid.uuid4().hex[:8]}"
    await stack.http.post("/v1/templates", json={"name": name, "subject": "Hi {{ first }}", "text": "{{ first }} {{ last }}"})
    before = await total_emails(stack.http)
    resp = await stack.http.post("/v1/emails", json={"to": ["a@example.com"], "template": name, "template_data": {"first": "A"}})
    assert resp.status_code == 422
    [err] = resp.json()["detail"]
    assert err["loc"] == ["body", "template_data"] and "missing template variables: last" in err["msg"]
    assert await total_emails(stack.http) == before


async def test_malformed_requests_never_500(stack: Stack) -> None:
    raw = {"content": b"{not json", "headers": {"Content-Type": "application/json"}}
    assert (await stack.http.post("/v1/emails", **raw)).status_code == 422
    assert (await stack.http.post("/v1/emails", content=b"\xff\xfe", headers={"Content-Type": "application/json"})).status_code == 422
    assert (await stack.http.post("/v1/emails", json=[1, 2])).status_code == 422
    assert (await stack.http.post("/v1/emails", json=email(), headers={"Idempotency-Key": "x" * 300})).status_code == 422
    assert (await stack.http.get("/v1/emails", params={"page": 0})).status_code == 422
    assert (await stack.http.get("/v1/emails", params={"created_after": "yesterday"})).status_code == 422
    assert (await stack.http.get("/v1/emails/%00%ff")).status_code == 404
    assert (await stack.http.get("/v1/emails", params={"template": "a\x00b"})).status_code == 422
    assert (await stack.http.post("/v1/emails", json=email(subject="nul \x00 byte"))).status_code == 422
    assert (await stack.http.patch("/v1/emails/abc", json={"send_at": "soon"})).status_code == 422
    big = await stack.http.post("/v1/templates", content=b"x" * 5_000_000, headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "4000000 bytes" in big.text
    # Bodies that may carry attachments may be larger: up to the limit plus the files in base64, and no more.
    with_files = file_body_limits(stack.settings)["/v1/emails"]
    assert with_files > 30_000_000
    big = await stack.http.post("/v1/emails", content=b"x" * (with_files + 1), headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and f"{with_files} bytes" in big.text


async def test_temporal_down_gives_503_and_records_nothing(stack: Stack) -> None:
    dead = stack.settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})
    async with ApiProcess(dead, stack.tmp / "api-no-temporal.log") as api:
        async with httpx.AsyncClient(base_url=api.url, headers=AUTH, timeout=60) as http:
            before = await total_emails(http)
            resp = await http.post("/v1/emails", json=email())
            assert resp.status_code == 503, resp.text
            assert resp.headers["Retry-After"] == "5" and "Temporal" in resp.json()["detail"]
            assert await total_emails(http) == before
            assert (await http.get("/readyz")).status_code == 503


async def test_database_down_gives_503_never_500(stack: Stack) -> None:
    """The door's choice (README, "When something is down"): 503 with Retry-After, nothing accepted."""
    dead = stack.settings.model_copy(update={"database_url": UNREACHABLE_DATABASE})
    async with ApiProcess(dead, stack.tmp / "api-no-db.log") as api:
        async with httpx.AsyncClient(base_url=api.url, headers=AUTH, timeout=60) as http:
            for method, path, body in (
                ("POST", "/v1/emails", email()),
                ("POST", "/v1/emails/batch", {"emails": [email()]}),
                ("GET", "/v1/emails", None),
                ("GET", "/v1/stats", None),
                ("GET", "/v1/templates", None),
            ):
                resp = await http.request(method, path, json=body)
                assert resp.status_code == 503, (path, resp.status_code, resp.text)
                assert resp.headers["Retry-After"] == "5" and "database" in resp.json()["detail"], path
            assert (await http.get("/readyz")).status_code == 503


async def test_inputs_json_cannot_echo_are_422_not_500(stack: Stack) -> None:
    """FastAPI's 422 echoes the input; an unpaired surrogate or NaN in it used to make that a 500."""
    http = stack.http
    raw = {"Content-Type": "application/json"}
    for path, body in (
        ("/v1/emails", '{"to": ["a@example.com"], "subject": "s", "html": "\\ud800"}'),
        ("/v1/emails", '{"to": ["a@example.com"], "subject": "s", "text": "t", "max_attempts": NaN}'),
        ("/v1/users", '{"name": "u\\ud800"}'),
    ):
        resp = await http.post(path, content=body, headers=raw)
        assert resp.status_code == 422, (path, body, resp.status_code, resp.text)
        assert resp.json()["detail"]
    for name, value in (("created_after", "0001-01-01T00:00:00+23:59"), ("created_before", "9999-12-31T23:59:59-23:59")):
        resp = await http.get("/v1/emails", params={name: value})
        assert resp.status_code == 422 and "out of range" in resp.text, resp.text
