"""/graphql over HTTP, with a real GraphQL client (gql + httpx) against the real stack (uvicorn in a
child process, a real worker, SMTP sink and database): every REST behaviour that has a GraphQL twin
does the same through GraphQL. Emails sent through GraphQL are queued, delivered and readable with
their history; idempotency, templates, batches, cancel, retry and reschedule behave as their REST
routes; the `emails` connection filters as GET /v1/emails does and its pages walk every email once;
settings keep secrets write-only; templates, previews and stats agree with their REST twins; one
user never sees (or learns of) another's emails; refusals carry `extensions.code` (and the field's
path for bad input), never a stack trace; and an outage of Temporal is UNAVAILABLE with retryAfter.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from gql import Client, GraphQLRequest
from gql.client import AsyncClientSession
from gql.transport.exceptions import TransportQueryError
from gql.transport.httpx import HTTPXAsyncTransport
from temporalio.client import Client as TemporalClient

from devstack.net import free_port
from tests.helpers import (
    AUTH,
    KEY,
    ApiProcess,
    Sender,
    Stack,
    closed_run,
    delivered,
    new_user,
    sends_scheduled,
    total_emails,
    wait_status,
)

# --- a GraphQL client ---------------------------------------------------------------------------


@asynccontextmanager
async def graphql(base_url: str, key: str | None = KEY) -> AsyncIterator[AsyncClientSession]:
    """A gql session on /graphql with this key (None: no Authorization header)."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    transport = HTTPXAsyncTransport(url=f"{base_url.rstrip('/')}/graphql", headers=headers, timeout=60)
    async with Client(transport=transport, fetch_schema_from_transport=False) as session:
        yield session


async def run(session: AsyncClientSession, query: str, **variables: Any) -> dict[str, Any]:
    return await session.execute(GraphQLRequest(query, variable_values=variables or None))


async def refused(session: AsyncClientSession, query: str, code: str, **variables: Any) -> list[dict[str, Any]]:
    """The errors of an operation refused with `code` (every error carries it)."""
    with pytest.raises(TransportQueryError) as caught:
        await run(session, query, **variables)
    errors = caught.value.errors or []
    assert errors and all(e.get("extensions", {}).get("code") == code for e in errors), errors
    assert "Traceback" not in json.dumps(errors)
    return errors


@pytest.fixture(scope="module")
async def gq(stack: Stack) -> AsyncIterator[AsyncClientSession]:
    """The admin's GraphQL session, shared by the module."""
    async with graphql(str(stack.http.base_url)) as session:
        yield session


@asynccontextmanager
async def user_session(stack: Stack, user: Sender) -> AsyncIterator[AsyncClientSession]:
    async with graphql(str(stack.http.base_url), user.key) as session:
        yield session


SEND = "mutation($input: SendEmailInput!) { sendEmail(input: $input) { id status workflowId } }"
SEND_TEMPLATED = "mutation($input: SendTemplatedEmailInput!) { sendTemplatedEmail(input: $input) { id status workflowId } }"
EVENTS = "{ event status attempt detail at }"
EMAIL = f"query($id: ID!) {{ email(id: $id) {{ id status workflowId from to subject attempts messageId sentAt scheduledFor lastError tags relatedEntity {{ type id }} template {{ name version }} templateData events {EVENTS} }} }}"
STATUS = "query($id: ID!) { emailStatus(id: $id) { id status attempts lastError scheduledFor sentAt updatedAt } }"
HISTORY = f"query($id: ID!) {{ emailHistory(id: $id) {EVENTS} }}"
CANCEL = f"mutation($id: ID!, $reason: String) {{ cancelScheduledEmail(id: $id, reason: $reason) {{ id status events {EVENTS} }} }}"
RETRY = "mutation($id: ID!) { retryFailedEmail(id: $id) { id status workflowId } }"
RESCHEDULE = f"mutation($id: ID!, $sendAt: DateTime!) {{ rescheduleEmail(id: $id, sendAt: $sendAt) {{ id status scheduledFor events {EVENTS} }} }}"
LIST = """query($filter: EmailFilter, $first: Int!, $after: String) {
  emails(filter: $filter, first: $first, after: $after) {
    totalCount edges { cursor node { id status } } pageInfo { hasNextPage hasPreviousPage startCursor endCursor }
  }
}"""
SETTINGS_FIELDS = """userId driver smtpHost smtpPort smtpUsername smtpSecurity smtpPasswordSet apiKeySet apiSecretSet
  mailgunDomain mailgunRegion sesRegion defaultFrom hourlyLimit dailyLimit updatedAt snsTopicArns sendgridWebhookPublicKey
  mailgunWebhookSigningKeySet"""
TEMPLATE_FIELDS = "name locale version subject html text defaultFrom defaultFromName description sampleData isActive isCurrent createdBy"


def mail(**overrides: Any) -> dict[str, Any]:
    """SendEmailInput (tests.helpers.email's body, in GraphQL's names)."""
    return {"to": ["Ann Smith <ann@example.com>"], "subject": "Hello", "text": "Hi", "html": "<p>Hi</p>"} | overrides


async def send(session: AsyncClientSession, **overrides: Any) -> str:
    accepted = (await run(session, SEND, input=mail(**overrides)))["sendEmail"]
    return accepted["id"]


def in_seconds(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


# --- send, read ------------------------------------------------------------------------------------


async def test_send_email_is_queued_delivered_and_readable(stack: Stack, gq: AsyncClientSession) -> None:
    accepted = (await run(gq, SEND, input=mail(relatedEntity={"type": "Order", "id": "G-1"}, tags=["gql"])))["sendEmail"]
    email_id = accepted["id"]
    assert accepted == {"id": email_id, "status": "QUEUED", "workflowId": f"email-{email_id}"}

    [caught] = await delivered(stack.sink, email_id)
    assert caught.message["Subject"] == "Hello" and caught.rcpt_tos == ["ann@example.com"]
    rest = await wait_status(stack.http, email_id, "sent")

    got = (await run(gq, EMAIL, id=email_id))["email"]
    assert got["status"] == "SENT" and got["attempts"] == 1 and got["sentAt"]
    assert got["messageId"] == caught.message["Message-ID"] == rest["message_id"]
    assert got["to"] == ["Ann Smith <ann@example.com>"] and got["from"] == rest["from"]
    assert got["relatedEntity"] == {"type": "Order", "id": "G-1"} and got["tags"] == ["gql"]
    assert [e["event"] for e in got["events"]] == ["queued", "sending", "sent"]
    assert [e["event"] for e in got["events"]] == [e["event"] for e in rest["events"]]

    status = (await run(gq, STATUS, id=email_id))["emailStatus"]
    assert status["id"] == email_id and status["status"] == "SENT" and status["attempts"] == 1
    assert status["sentAt"] == got["sentAt"] and status["lastError"] is None
    history = (await run(gq, HISTORY, id=email_id))["emailHistory"]
    assert history == got["events"]


async def test_idempotency_key_gives_one_email_and_other_input_conflicts(
    stack: Stack, gq: AsyncClientSession, client: TemporalClient,
) -> None:
    key = f"gql-order-{uuid.uuid4()}"
    body = mail(subject=f"once {key}", idempotencyKey=key)
    first = (await run(gq, SEND, input=body))["sendEmail"]
    again = (await run(gq, SEND, input=body))["sendEmail"]
    assert again["id"] == first["id"]
    email_id = first["id"]
    await wait_status(stack.http, email_id, "sent")
    later = (await run(gq, SEND, input=body))["sendEmail"]
    assert later["id"] == email_id
    assert sends_scheduled(await closed_run(client, email_id)) == 1  # one run, ended: no copy can come later
    assert len([m for m in stack.sink.messages if email_id in str(m.message["Message-ID"])]) == 1

    before = await total_emails(stack.http)
    [error] = await refused(gq, SEND, "CONFLICT", input=mail(subject="something else", idempotencyKey=key))
    assert "different request body" in error["message"]
    assert await total_emails(stack.http) == before


async def test_templated_email_is_rendered_and_bad_template_input_refused(stack: Stack, gq: AsyncClientSession) -> None:
    reloaded = (await run(gq, "mutation { reloadTemplates { directory created { name } unchanged { name } } }"))["reloadTemplates"]
    assert "TestTemplate" in {p["name"] for p in reloaded["created"] + reloaded["unchanged"]}

    accepted = (await run(gq, SEND_TEMPLATED, input={"to": ["bob@example.com"], "template": "TestTemplate",
                                                      "templateData": {"Name": "<b>Bob</b>"}}))["sendTemplatedEmail"]
    assert accepted["status"] == "QUEUED"
    [caught] = await delivered(stack.sink, accepted["id"])
    assert caught.message["Subject"] == "Test email for <b>Bob</b>"
    assert "Hello &lt;b&gt;Bob&lt;/b&gt;," in caught.message.get_body(("html",)).get_content()
    await wait_status(stack.http, accepted["id"], "sent")
    got = (await run(gq, EMAIL, id=accepted["id"]))["email"]
    current = (await stack.http.get("/v1/templates/TestTemplate")).json()
    assert got["template"] == {"name": "TestTemplate", "version": current["version"]}
    assert got["templateData"] == {"Name": "<b>Bob</b>"}

    before = await total_emails(stack.http)
    [error] = await refused(gq, SEND_TEMPLATED, "BAD_USER_INPUT", input={"to": ["bob@example.com"], "template": "TestTemplate",
                                                                         "templateData": {}})
    fields = error["extensions"]["fields"]
    assert any(f["path"] == ["input", "templateData"] and "missing template variables: Name" in f["message"] for f in fields), fields
    [error] = await refused(gq, SEND_TEMPLATED, "BAD_USER_INPUT", input={"to": ["bob@example.com"], "templateData": {"Name": "x"}})
    assert [f["path"] for f in error["extensions"]["fields"]] == [["input", "template"]]
    [error] = await refused(gq, SEND_TEMPLATED, "BAD_USER_INPUT", input={"to": ["bob@example.com"], "template": "no-such-template-g"})
    assert any(f["path"] == ["input", "template"] for f in error["extensions"]["fields"])
    assert await total_emails(stack.http) == before


# --- batch ----------------------------------------------------------------------------------------

BATCH = """mutation($inputs: [BatchEmailInput!]!, $allOrNothing: Boolean!) {
  sendEmails(inputs: $inputs, allOrNothing: $allOrNothing) {
    accepted rejected items { index code id workflowId status errors { path message } }
  }
}"""


async def test_batch_answers_each_email_and_all_or_nothing_queues_nothing(stack: Stack, gq: AsyncClientSession) -> None:
    before = await total_emails(stack.http)
    inputs = [
        {"email": mail(subject="one")},
        {"email": mail(to=["not an address"])},
        {"templated": {"to": ["ann@example.com"], "template": "no-such-template-here", "templateData": {}}},
        {"email": mail(subject="two")},
    ]
    got = (await run(gq, BATCH, inputs=inputs, allOrNothing=False))["sendEmails"]
    assert [i["code"] for i in got["items"]] == [202, 422, 422, 202]
    assert [i["index"] for i in got["items"]] == [0, 1, 2, 3]
    assert got["accepted"] == 2 and got["rejected"] == 2
    assert got["items"][1]["errors"][0]["path"][:1] == ["to"] and got["items"][1]["id"] is None
    assert "no-such-template-here" in got["items"][2]["errors"][0]["message"]
    for item in (got["items"][0], got["items"][3]):
        assert item["status"] == "QUEUED" and item["workflowId"] == f"email-{item['id']}" and not item["errors"]
        await wait_status(stack.http, item["id"], "sent")
        assert await delivered(stack.sink, item["id"])
    assert await total_emails(stack.http) == before + 2

    [error] = await refused(gq, BATCH, "BAD_USER_INPUT", inputs=[{"email": mail()}, {"email": mail(cc=["bad"])}], allOrNothing=True)
    assert "nothing was queued" in error["message"] and error["extensions"]["items"][0]["index"] == 1
    assert await total_emails(stack.http) == before + 2


# --- cancel, retry, reschedule ------------------------------------------------------------------


async def test_cancel_scheduled_email_and_refusals(stack: Stack, gq: AsyncClientSession, client: TemporalClient) -> None:
    email_id = await send(gq, sendAt=in_seconds(60).isoformat())
    await wait_status(stack.http, email_id, "scheduled")
    cancelled = (await run(gq, CANCEL, id=email_id, reason="order withdrawn"))["cancelScheduledEmail"]
    assert cancelled["status"] == "CANCELLED"
    assert cancelled["events"][-1]["event"] == "cancelled" and cancelled["events"][-1]["detail"] == "order withdrawn"
    [error] = await refused(gq, CANCEL, "CONFLICT", id=email_id)
    assert "already cancelled" in error["message"]
    assert sends_scheduled(await closed_run(client, email_id)) == 0  # its run ended without a send: none can come later
    assert not [m for m in stack.sink.messages if email_id in str(m.message["Message-ID"])]
    assert (await run(gq, STATUS, id=email_id))["emailStatus"]["status"] == "CANCELLED"

    sent = await send(gq)
    await wait_status(stack.http, sent, "sent")
    [error] = await refused(gq, CANCEL, "CONFLICT", id=sent)
    assert "already sent" in error["message"]
    await refused(gq, CANCEL, "NOT_FOUND", id=str(uuid.uuid4()))


async def test_retry_failed_email(stack: Stack, gq: AsyncClientSession) -> None:
    stack.sink.handler.data_replies.append("550 5.7.1 Rejected")
    email_id = await send(gq)
    await wait_status(stack.http, email_id, "failed")
    failed = (await run(gq, STATUS, id=email_id))["emailStatus"]
    assert failed["status"] == "FAILED" and failed["attempts"] == 1 and "550 5.7.1 Rejected" in failed["lastError"]

    retried = (await run(gq, RETRY, id=email_id))["retryFailedEmail"]
    assert retried == {"id": email_id, "status": "QUEUED", "workflowId": f"email-{email_id}"}
    [caught] = await delivered(stack.sink, email_id)
    await wait_status(stack.http, email_id, "sent")
    got = (await run(gq, EMAIL, id=email_id))["email"]
    assert [e["event"] for e in got["events"]] == ["queued", "sending", "failed", "queued", "sending", "sent"]
    assert got["messageId"] == caught.message["Message-ID"]
    [error] = await refused(gq, RETRY, "CONFLICT", id=email_id)
    assert "only failed" in error["message"]
    await refused(gq, RETRY, "NOT_FOUND", id=str(uuid.uuid4()))


async def test_reschedule_scheduled_email(stack: Stack, gq: AsyncClientSession) -> None:
    email_id = await send(gq, sendAt=in_seconds(3600).isoformat())
    await wait_status(stack.http, email_id, "scheduled")
    [error] = await refused(gq, RESCHEDULE, "BAD_USER_INPUT", id=email_id, sendAt="2001-01-01T00:00:00+00:00")
    assert [f["path"] for f in error["extensions"]["fields"]] == [["sendAt"]]
    assert (await run(gq, STATUS, id=email_id))["emailStatus"]["status"] == "SCHEDULED"

    new_time = in_seconds(3)
    moved = (await run(gq, RESCHEDULE, id=email_id, sendAt=new_time.isoformat()))["rescheduleEmail"]
    assert datetime.fromisoformat(moved["scheduledFor"]) == new_time
    assert moved["status"] == "SCHEDULED" and moved["events"][-1]["event"] == "rescheduled"
    [caught] = await delivered(stack.sink, email_id)
    assert caught.received_at >= new_time.timestamp()
    await wait_status(stack.http, email_id, "sent")
    [error] = await refused(gq, RESCHEDULE, "CONFLICT", id=email_id, sendAt=in_seconds(3600).isoformat())
    await refused(gq, RESCHEDULE, "NOT_FOUND", id=str(uuid.uuid4()), sendAt=in_seconds(3600).isoformat())


# --- queries: emails, settings, templates, stats ------------------------------------------------


async def walk(session: AsyncClientSession, filter: dict[str, Any] | None, first: int) -> tuple[list[str], list[dict[str, Any]]]:
    """Every email the connection holds for `filter`, page by page: (ids in order, the pages)."""
    ids: list[str] = []
    pages: list[dict[str, Any]] = []
    after = None
    while True:
        page = (await run(session, LIST, filter=filter, first=first, after=after))["emails"]
        pages.append(page)
        ids += [edge["node"]["id"] for edge in page["edges"]]
        assert page["pageInfo"]["hasPreviousPage"] == (after is not None)
        if not page["pageInfo"]["hasNextPage"]:
            return ids, pages
        after = page["pageInfo"]["endCursor"]
        assert after == page["edges"][-1]["cursor"]
        assert len(pages) < 50, "the pages never end"


async def rest_ids(http: httpx.AsyncClient, params: list[tuple[str, str]]) -> tuple[int, list[str]]:
    got = (await http.get("/v1/emails", params=[*params, ("page_size", "100")])).json()
    return got["total"], [e["id"] for e in got["items"]]


async def test_emails_connection_filters_as_rest_and_pages_walk_each_once(stack: Stack, gq: AsyncClientSession) -> None:
    marker = uuid.uuid4().hex[:10]
    rcpt = f"list-{marker}@example.com"
    entity = {"type": "Batch", "id": marker}
    ids = [await send(gq, to=[rcpt], cc=["other@example.com"], relatedEntity=entity, tags=[marker] if i % 2 else []) for i in range(4)]
    scheduled = await send(gq, to=[rcpt], relatedEntity=entity, sendAt=in_seconds(3600).isoformat())
    for email_id in ids:
        await wait_status(stack.http, email_id, "sent")
    await wait_status(stack.http, scheduled, "scheduled")

    future = in_seconds(300).isoformat()
    cases: list[tuple[dict[str, Any], list[tuple[str, str]], int]] = [
        ({"relatedEntityType": "Batch", "relatedEntityId": marker}, [("related_entity_type", "Batch"), ("related_entity_id", marker)], 5),
        ({"recipient": rcpt.upper()}, [("recipient", rcpt.upper())], 5),
        ({"recipient": rcpt, "statuses": ["SENT"]}, [("recipient", rcpt), ("status", "sent")], 4),
        ({"recipient": rcpt, "statuses": ["SENT", "SCHEDULED"]}, [("recipient", rcpt), ("status", "sent"), ("status", "scheduled")], 5),
        ({"recipient": rcpt, "statuses": ["FAILED"]}, [("recipient", rcpt), ("status", "failed")], 0),
        ({"tag": marker}, [("tag", marker)], 2),
        ({"recipient": rcpt, "createdAfter": future}, [("recipient", rcpt), ("created_after", future)], 0),
        ({"recipient": rcpt, "createdBefore": future}, [("recipient", rcpt), ("created_before", future)], 5),
    ]
    for filter, params, expected in cases:
        total, listed = await rest_ids(stack.http, params)
        page = (await run(gq, LIST, filter=filter, first=100))["emails"]
        assert page["totalCount"] == total == expected, (filter, page["totalCount"], total)
        assert [e["node"]["id"] for e in page["edges"]] == listed, filter
    assert {e["node"]["id"] for e in (await run(gq, LIST, filter={"tag": marker}, first=100))["emails"]["edges"]} == {ids[1], ids[3]}

    # Two at a time: every email once, newest first (as REST lists them), the count right on every page.
    walked, pages = await walk(gq, {"recipient": rcpt}, 2)
    assert walked == [scheduled, *reversed(ids)] == (await rest_ids(stack.http, [("recipient", rcpt)]))[1]
    assert [len(p["edges"]) for p in pages] == [2, 2, 1] and {p["totalCount"] for p in pages} == {5}
    single, _ = await walk(gq, {"recipient": rcpt, "statuses": ["SENT"]}, 1)
    assert single == list(reversed(ids))

    [error] = await refused(gq, LIST, "BAD_USER_INPUT", first=10, after="not-a-cursor")
    assert error["extensions"]["fields"][0]["path"] == ["after"]
    [error] = await refused(gq, LIST, "BAD_USER_INPUT", first=101)
    assert error["extensions"]["fields"][0]["path"] == ["first"]
    await refused(gq, LIST, "BAD_USER_INPUT", first=0)
    await run(gq, CANCEL, id=scheduled)


SETTINGS = f"query {{ mailSettings {{ {SETTINGS_FIELDS} }} }}"
UPDATE_SETTINGS = f"mutation($input: MailSettingsInput!) {{ updateMailSettings(input: $input) {{ {SETTINGS_FIELDS} }} }}"


async def test_mail_settings_keep_secrets_write_only(stack: Stack, sessions: Any, gq: AsyncClientSession) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    async with new_user(stack, sessions) as ann, user_session(stack, ann) as session:
        empty = (await run(session, SETTINGS))["mailSettings"]
        assert empty["userId"] == ann.id and empty["driver"] == "SYSTEM_SMTP" and not empty["smtpPasswordSet"]

        given = {"driver": "USER_SMTP", "smtpHost": "localhost", "smtpPort": 2525, "smtpUsername": "ann",
                 "smtpPassword": secret, "smtpSecurity": "STARTTLS", "hourlyLimit": 100}
        answers = [await session.execute(GraphQLRequest(UPDATE_SETTINGS, variable_values={"input": given}),
                                         get_execution_result=True)]
        updated = answers[0].data["updateMailSettings"]
        assert updated["smtpPasswordSet"] is True and updated["driver"] == "USER_SMTP"
        assert (updated["smtpHost"], updated["smtpPort"], updated["smtpUsername"], updated["hourlyLimit"]) == ("localhost", 2525, "ann", 100)
        answers.append(await session.execute(GraphQLRequest(SETTINGS), get_execution_result=True))
        read = answers[-1].data["mailSettings"]
        assert read == updated
        rest = (await ann.http.get("/v1/settings/mail")).json()
        assert {snake(k): v for k, v in read.items() if k not in ("driver", "updatedAt")} == {
            k: v for k, v in rest.items() if k not in ("driver", "updated_at")}
        assert rest["driver"] == "user_smtp" and datetime.fromisoformat(rest["updated_at"]) == datetime.fromisoformat(read["updatedAt"])

        # Omitted: kept. The password never comes back, whatever is asked.
        kept = (await run(session, UPDATE_SETTINGS, input={k: v for k, v in given.items() if k != "smtpPassword"} | {"hourlyLimit": 50}))
        answers.append(kept)
        assert kept["updateMailSettings"]["smtpPasswordSet"] is True and kept["updateMailSettings"]["hourlyLimit"] == 50

        for bad, path in ((given | {"smtpPort": 70000}, ["input", "smtpPort"]),
                          (given | {"mailgunRegion": "mars"}, ["input", "mailgunRegion"]),
                          ({"driver": "USER_SMTP", "smtpPort": 2525}, ["input", "smtpHost"]),
                          (given | {"defaultFrom": "not an address"}, ["input", "defaultFrom"])):
            [error] = await refused(session, UPDATE_SETTINGS, "BAD_USER_INPUT", input=bad)
            assert path in [f["path"] for f in error["extensions"]["fields"]], (bad, error)
            answers.append(error)
        assert (await run(session, SETTINGS))["mailSettings"]["hourlyLimit"] == 50  # nothing of a refused one was stored
        assert secret not in json.dumps([a if isinstance(a, dict) else {"data": a.data, "errors": a.errors} for a in answers], default=str)

    # The admin names a user; without one, the bootstrap key has no settings of its own.
    assert (await run(gq, "query($u: ID) { mailSettings(userId: $u) { userId smtpPasswordSet } }", u=ann.id))["mailSettings"] == {
        "userId": ann.id, "smtpPasswordSet": True}
    [error] = await refused(gq, "{ mailSettings { userId } }", "BAD_USER_INPUT")
    assert error["extensions"]["fields"][0]["path"] == ["userId"]


async def test_templates_previews_and_stats_agree_with_rest(stack: Stack, sessions: Any, gq: AsyncClientSession) -> None:
    assert (await stack.http.post("/v1/templates/reload")).status_code == 200
    listed = (await run(gq, f"{{ emailTemplates {{ {TEMPLATE_FIELDS} }} }}"))["emailTemplates"]
    rest = (await stack.http.get("/v1/templates")).json()
    assert [(t["name"], t["locale"], t["version"]) for t in listed] == [(t["name"], t["locale"], t["version"]) for t in rest]
    assert {"TestTemplate", "PasswordReset"} <= {t["name"] for t in listed}

    one = f"query($n: String!, $l: String!, $v: Int) {{ emailTemplate(name: $n, locale: $l, version: $v) {{ {TEMPLATE_FIELDS} }} }}"
    for name, locale in (("TestTemplate", ""), ("PasswordReset", "de")):
        got = (await run(gq, one, n=name, l=locale))["emailTemplate"]
        want = (await stack.http.get(f"/v1/templates/{name}", params={"locale": locale})).json()
        assert {snake(k): v for k, v in got.items()} == {k: want[k] for k in map(snake, got)}, name
        assert (await run(gq, one, n=name, l=locale, v=got["version"]))["emailTemplate"] == got
    await refused(gq, one, "NOT_FOUND", n=f"nothing-{uuid.uuid4().hex[:6]}", l="")

    preview = "query($n: String!, $d: JSON) { templatePreview(name: $n, data: $d) { subject html text dataSource template { name locale version } dependencies { name locale version } } }"
    for data in ({"Name": "Zoe"}, None):
        got = (await run(gq, preview, n="TestTemplate", d=data))["templatePreview"]
        want = (await stack.http.post("/v1/templates/TestTemplate/preview", json={"data": data} if data else {})).json()
        assert got["subject"] == want["subject"] == f"Test email for {(data or {'Name': 'John'})['Name']}"
        assert (got["html"], got["text"], got["dataSource"]) == (want["html"], want["text"], want["data_source"])
        assert got["template"] == want["template"] and got["dependencies"] == want["dependencies"]
    await refused(gq, preview, "BAD_USER_INPUT", n="TestTemplate", d={})

    stats = "{ stats { byStatus { status count } queueDepth retried sentLastHour stuckAfterSeconds stuck stuckExamples { id } } }"
    async with new_user(stack, sessions) as ann, user_session(stack, ann) as session:
        sent = await send(session, **{"from": f"Sender <mail@{ann.domain}>"})
        scheduled = await send(session, **{"from": f"Sender <mail@{ann.domain}>"}, sendAt=in_seconds(3600).isoformat())
        await wait_status(ann.http, sent, "sent")
        await wait_status(ann.http, scheduled, "scheduled")
        got = (await run(session, stats))["stats"]
        want = (await ann.http.get("/v1/stats")).json()
        assert {c["status"].lower(): c["count"] for c in got["byStatus"]} == want["by_status"] == {"sent": 1, "scheduled": 1}
        assert (got["queueDepth"], got["retried"], got["sentLastHour"], got["stuck"], got["stuckAfterSeconds"]) == (
            want["queue_depth"], want["retried"], want["sent_last_hour"], want["stuck"], want["stuck_after_seconds"])
        await run(session, CANCEL, id=scheduled)
    everyone = (await run(gq, stats))["stats"]
    rest_all = (await stack.http.get("/v1/stats")).json()
    assert {c["status"].lower(): c["count"] for c in everyone["byStatus"]} == rest_all["by_status"]
    assert everyone["queueDepth"] == rest_all["queue_depth"]


# --- isolation and auth ---------------------------------------------------------------------------


async def test_one_user_never_sees_or_learns_of_anothers_emails(stack: Stack, sessions: Any) -> None:
    async with (
        new_user(stack, sessions) as ann, new_user(stack, sessions) as bob,
        user_session(stack, ann) as as_ann, user_session(stack, bob) as as_bob,
    ):
        anns = await send(as_ann, **{"from": f"Sender <mail@{ann.domain}>"}, sendAt=in_seconds(3600).isoformat())
        await wait_status(ann.http, anns, "scheduled")
        bobs = await send(as_bob, **{"from": f"Sender <mail@{bob.domain}>"})
        await wait_status(bob.http, bobs, "sent")

        unknown = str(uuid.uuid4())
        later = in_seconds(7200).isoformat()
        for query, extra in ((EMAIL, {}), (STATUS, {}), (HISTORY, {}), (CANCEL, {}), (RETRY, {}), (RESCHEDULE, {"sendAt": later})):
            [theirs] = await refused(as_bob, query, "NOT_FOUND", id=anns, **extra)
            [nobodys] = await refused(as_bob, query, "NOT_FOUND", id=unknown, **extra)
            assert theirs["message"].replace(anns, "<id>") == nobodys["message"].replace(unknown, "<id>"), (theirs, nobodys)
            assert theirs["extensions"] == nobodys["extensions"] and theirs["path"] == nobodys["path"]

        listed = (await run(as_bob, LIST, first=100))["emails"]
        assert [e["node"]["id"] for e in listed["edges"]] == [bobs] and listed["totalCount"] == 1
        assert (await run(as_bob, LIST, filter={"statuses": ["SCHEDULED"]}, first=100))["emails"]["totalCount"] == 0
        # Ann's email is as she left it: nothing Bob tried reached it.
        mine = (await run(as_ann, STATUS, id=anns))["emailStatus"]
        assert mine["status"] == "SCHEDULED" and datetime.fromisoformat(mine["scheduledFor"]) > in_seconds(3000)
        assert [e["node"]["id"] for e in (await run(as_ann, LIST, first=100))["emails"]["edges"]] == [anns]
        assert (await run(as_ann, CANCEL, id=anns))["cancelScheduledEmail"]["status"] == "CANCELLED"


# Every query field on its own (a refused non-null root field nulls the whole answer, so one error per operation).
QUERIES = [
    ("query($id: ID!) { email(id: $id) { id } }", True),
    ("query($id: ID!) { emailStatus(id: $id) { id } }", True),
    ("query($id: ID!) { emailHistory(id: $id) { event } }", True),
    ("{ emails { totalCount } }", False),
    ("{ mailSettings { userId } }", False),
    ("{ emailTemplates { name } }", False),
    ('{ emailTemplate(name: "TestTemplate") { name } }', False),
    ('{ templatePreview(name: "TestTemplate") { subject } }', False),
    ("{ stats { queueDepth } }", False),
]
MUTATIONS = [
    (SEND, {"input": mail()}),
    (SEND_TEMPLATED, {"input": {"to": ["a@example.com"], "template": "TestTemplate", "templateData": {"Name": "A"}}}),
    (BATCH, {"inputs": [{"email": mail()}], "allOrNothing": False}),
    (UPDATE_SETTINGS, {"input": {"driver": "SYSTEM_SMTP"}}),
    (CANCEL, {"id": str(uuid.uuid4())}),
    (RETRY, {"id": str(uuid.uuid4())}),
    (RESCHEDULE, {"id": str(uuid.uuid4()), "sendAt": "2031-01-01T00:00:00+00:00"}),
    ("mutation { reloadTemplates { directory } }", {}),
]


async def test_no_or_a_wrong_key_is_unauthenticated_on_every_field(stack: Stack, sessions: Any, gq: AsyncClientSession) -> None:
    base = str(stack.http.base_url)
    before = await total_emails(stack.http)
    for key in (None, "wrong-key", f"{KEY}x"):
        async with graphql(base, key) as anon:
            for query, with_id in QUERIES:
                [error] = await refused(anon, query, "UNAUTHENTICATED", **({"id": str(uuid.uuid4())} if with_id else {}))
                assert "Bearer" in error["message"]
            for mutation, variables in MUTATIONS:
                [error] = await refused(anon, mutation, "UNAUTHENTICATED", **variables)
                assert "Bearer" in error["message"]
    assert await total_emails(stack.http) == before

    async with new_user(stack, sessions) as ann, user_session(stack, ann) as session:
        [error] = await refused(session, "mutation { reloadTemplates { directory } }", "FORBIDDEN")
        assert "admin" in error["message"]
    reloaded = (await run(gq, "mutation { reloadTemplates { directory unchanged { name } } }"))["reloadTemplates"]
    assert reloaded["directory"] and reloaded["unchanged"]


# --- bad input ----------------------------------------------------------------------------------

PAST = "2020-01-01T00:00:00+00:00"
BAD_INPUT: dict[str, tuple[str, dict[str, Any], list[str], str]] = {
    "no recipient": (SEND, {"to": [], "subject": "x", "text": "x"}, ["input"], "at least one recipient"),
    "invalid address": (SEND, mail(to=["not-an-address"]), ["input", "to"], "not a valid email address"),
    "invalid cc domain": (SEND, mail(cc=["ann@exa mple.com"]), ["input", "cc"], "not a valid email address"),
    "invalid reply-to": (SEND, mail(replyTo="nobody"), ["input", "replyTo"], ""),
    "CR/LF in subject": (SEND, mail(subject="Hi\r\nBcc: victim@example.com"), ["input", "subject"], "CR or LF"),
    "reserved header": (SEND, mail(headers={"Message-ID": "<x@y>"}), ["input", "headers"], "set by mailqueue"),
    "send_at in the past": (SEND, mail(sendAt=PAST), ["input", "sendAt"], "in the past"),
    "send_at without zone": (SEND, mail(sendAt="2030-01-01T09:00:00"), ["input", "sendAt"], "timezone"),
    "no subject": (SEND, {"to": ["a@example.com"], "text": "x"}, ["input"], "subject is required"),
    "no body": (SEND, {"to": ["a@example.com"], "subject": "x"}, ["input"], "html or text is required"),
    "too many attempts": (SEND, mail(maxAttempts=99), ["input", "maxAttempts"], "less than or equal"),
    "bad priority": (SEND, mail(priority="urgent"), ["input", "priority"], ""),
    "bad idempotency key": (SEND, mail(idempotencyKey="has space"), ["input", "idempotencyKey"], ""),
    "template with no recipients": (SEND_TEMPLATED, {"to": [], "template": "TestTemplate", "templateData": {"Name": "x"}}, ["input"],
                                    "at least one recipient"),
    "unknown template": (SEND_TEMPLATED, {"to": ["a@example.com"], "template": "no-such-template"}, ["input", "template"],
                         "unknown or inactive template"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
async def test_bad_input_is_bad_user_input_with_the_field_and_queues_nothing(stack: Stack, gq: AsyncClientSession, case: str) -> None:
    mutation, value, path, message = BAD_INPUT[case]
    before = await total_emails(stack.http)
    [error] = await refused(gq, mutation, "BAD_USER_INPUT", input=value)
    fields = error["extensions"]["fields"]
    assert any(f["path"][: len(path)] == path and message in f["message"] for f in fields), fields
    assert all(f["path"][0] == "input" and "_" not in "".join(map(str, f["path"])) for f in fields), fields  # camelCase, under input
    assert await total_emails(stack.http) == before


async def test_malformed_operations_are_refused_never_internal_errors(stack: Stack, gq: AsyncClientSession) -> None:
    before = await total_emails(stack.http)
    raw = [
        {"query": "{ emails { totalCount "},  # a syntax error
        {"query": "{ emails { nosuchfield } }"},
        {"query": "mutation { sendEmail(input: {to: [\"a@example.com\"], colour: \"blue\"}) { id } }"},
        {"query": "mutation($i: SendEmailInput!) { sendEmail(input: $i) { id } }", "variables": {"i": {"maxAttempts": "many"}}},
        {"query": "mutation($i: SendEmailInput!) { sendEmail(input: $i) { id } }", "variables": {"i": mail(sendAt="soon")}},
        {"query": "query($id: ID!) { email(id: $id) { id } }", "variables": {}},
        {"query": "{ emailTemplate(name: \"TestTemplate\", locale: \"\\u0000\") { name } }"},
        {"query": "{ emails(filter: {recipient: \"a\\u0000b\"}) { totalCount } }"},
        {"query": ""},
        {"nothing": "here"},
    ]
    for body in raw:
        resp = await stack.http.post("/graphql", json=body)
        assert resp.status_code in (200, 400), (body, resp.status_code, resp.text)
        assert "Traceback" not in resp.text and "INTERNAL_SERVER_ERROR" not in resp.text, (body, resp.text)
        if resp.headers["content-type"].startswith("application/json"):
            assert resp.json()["errors"], (body, resp.text)
    for text in (b"{not json", b"\xff\xfe"):
        resp = await stack.http.post("/graphql", content=text, headers={"Content-Type": "application/json"})
        assert resp.status_code < 500 and "Traceback" not in resp.text, resp.text
    # Values the database could not search for are the caller's mistake, said with the field.
    for query, path in (('{ emails(filter: {recipient: "a\\u0000b"}) { totalCount } }', ["filter", "recipient"]),):
        [error] = await refused(gq, query, "BAD_USER_INPUT")
        assert error["extensions"]["fields"][0]["path"] == path
    # Through the client too: an unknown field is refused by validation, not by a fault.
    with pytest.raises(TransportQueryError) as caught:
        await run(gq, "{ emails { totalCount nosuchfield } }")
    assert all(e.get("extensions", {}).get("code") != "INTERNAL_SERVER_ERROR" for e in caught.value.errors or [])
    assert await total_emails(stack.http) == before


# --- outages -------------------------------------------------------------------------------------


async def test_temporal_down_is_unavailable_with_retry_after_and_records_nothing(stack: Stack) -> None:
    dead = stack.settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})
    async with ApiProcess(dead, stack.tmp / "api-gql-no-temporal.log") as api:
        async with httpx.AsyncClient(base_url=api.url, headers=AUTH, timeout=60) as http, graphql(api.url) as session:
            before = await total_emails(http)
            [error] = await refused(session, SEND, "UNAVAILABLE", input=mail())
            assert error["extensions"]["retryAfter"] == 5 and "Temporal" in error["message"]
            # A batch answers each email on its own, as REST does: 503 for the one Temporal could not take.
            batch = (await run(session, BATCH, inputs=[{"email": mail()}], allOrNothing=False))["sendEmails"]
            assert (batch["accepted"], batch["rejected"]) == (0, 1) and batch["items"][0]["code"] == 503
            assert batch["items"][0]["id"] is None and "Temporal" in batch["items"][0]["errors"][0]["message"]
            assert await total_emails(http) == before
