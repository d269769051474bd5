"""The Temporal UI as the operator's console: each email's search attributes follow its life, and
its summary says what it is. Checked through the visibility API (what the UI's list and its
saved queries ask), on the dev server, with the API in its own process and a real SMTP server."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.api.workflowservice.v1 import RegisterNamespaceRequest
from temporalio.client import Client

from devstack.devserver import TemporalDevServer
from devstack.net import free_port
from mailqueue import search
from mailqueue.contracts import workflow_id_for
from tests.helpers import EMAIL_SETTLES, PROCESS_STARTS, Stack, email, eventually, fast_settings, new_user, start_worker, wait_status

EMAILS = 'WorkflowType="SendEmailWorkflow"'


async def ids_for(client: Client, query: str, expected: set[str]) -> set[str]:
    """The email ids a visibility query returns, once it returns `expected` (visibility lags a little)."""
    found: set[str] = set()

    async def matches() -> bool:
        found.clear()
        found.update([wf.id.removeprefix("email-") async for wf in client.list_workflows(query)])
        return found == expected

    await eventually(matches, timeout=EMAIL_SETTLES, what=lambda: f"{query!r} returned {sorted(found)}, expected {sorted(expected)}")
    return found


def due_around(when: datetime) -> str:
    return f'EmailSendAt BETWEEN "{(when - timedelta(minutes=1)).isoformat()}" AND "{(when + timedelta(minutes=1)).isoformat()}"'


async def test_each_status_and_sender_finds_exactly_its_emails(stack: Stack, sessions: Any, client: Client) -> None:
    later = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    async with new_user(stack, sessions) as ann, new_user(stack, sessions) as bob:
        # Ann may send two emails a day: the first fails, the second is sent, the third waits (deferred).
        assert (await stack.http.patch(f"/v1/users/{ann.id}", json={"daily_limit": 2, "max_priority": "high"})).status_code == 200
        stack.sink.handler.data_replies.append("550 5.1.1 mailbox unavailable")
        failed = (await ann.http.post("/v1/emails", json=ann.mail(tags=["orders", "eu"]))).json()["id"]
        await wait_status(ann.http, failed, "failed")
        sent = (await ann.http.post("/v1/emails", json=ann.mail(related_entity={"type": "Order", "id": "1042"}))).json()["id"]
        await wait_status(ann.http, sent, "sent")
        deferred = (await ann.http.post("/v1/emails", json=ann.mail())).json()["id"]
        await wait_status(ann.http, deferred, "deferred")
        scheduled = (await ann.http.post("/v1/emails", json=ann.mail(send_at=later.isoformat(), priority="high"))).json()["id"]
        cancelled = (await ann.http.post("/v1/emails", json=ann.mail(send_at=later.isoformat()))).json()["id"]
        assert (await ann.http.post(f"/v1/emails/{cancelled}/cancel", json={})).status_code == 200
        await wait_status(ann.http, scheduled, "scheduled")
        # Bob's sent email must not show up in Ann's queries.
        bobs = (await bob.http.post("/v1/emails", json=bob.mail())).json()["id"]
        await wait_status(bob.http, bobs, "sent")

        mine = f'{EMAILS} AND EmailSender="{ann.id}"'
        assert await ids_for(client, f'EmailStatus="failed" AND EmailSender="{ann.id}"', {failed})
        for status, expected in [("sent", {sent}), ("failed", {failed}), ("cancelled", {cancelled}),
                                 ("deferred", {deferred}), ("scheduled", {scheduled})]:
            await ids_for(client, f'{mine} AND EmailStatus="{status}"', expected)
        await ids_for(client, mine, {failed, sent, deferred, scheduled, cancelled})
        await ids_for(client, f'EmailSender="{bob.id}"', {bobs})
        await ids_for(client, f'{mine} AND EmailTags="eu"', {failed})
        await ids_for(client, f'{mine} AND EmailRelatedEntity="Order:1042"', {sent})
        await ids_for(client, f'{mine} AND EmailPriority=1', {scheduled})  # high
        await ids_for(client, f"{mine} AND {due_around(later)}", {scheduled, cancelled})

        # Rescheduled: the due time follows, and the event says the email is still scheduled.
        moved = later + timedelta(days=1)
        assert (await ann.http.patch(f"/v1/emails/{scheduled}", json={"send_at": moved.isoformat()})).status_code == 200
        await ids_for(client, f"{mine} AND {due_around(moved)}", {scheduled})
        events = (await ann.http.get(f"/v1/emails/{scheduled}")).json()["events"]
        assert [e["status"] for e in events if e["event"] == "rescheduled"] == ["scheduled"]

        # Nothing that names a person or says what the email says is in a search attribute.
        for email_id in (failed, sent, deferred, scheduled, cancelled):
            described = await client.get_workflow_handle(workflow_id_for(email_id)).describe()
            values = [str(v) for _, v in described.typed_search_attributes]
            assert not [v for v in values if "@" in v or "Hello" in v or ann.domain in v], values
        for email_id in (deferred, scheduled):  # leave nothing waiting behind
            assert (await ann.http.post(f"/v1/emails/{email_id}/cancel", json={})).status_code == 200
        await ids_for(client, f'{mine} AND EmailStatus="cancelled"', {cancelled, deferred, scheduled})


async def test_the_summary_says_what_the_email_is_without_opening_it(stack: Stack, client: Client) -> None:
    assert (await stack.http.post("/v1/templates/reload")).status_code == 200
    due = (datetime.now(UTC) + timedelta(days=1)).replace(hour=9, minute=0, second=0, microsecond=0)
    body = {"to": ["a@example.com", "b@example.com"], "template": "TestTemplate", "template_data": {"Name": "Ann"},
            "priority": "high", "send_at": due.isoformat()}
    templated = (await stack.http.post("/v1/emails", json=body)).json()["id"]
    raw = (await stack.http.post("/v1/emails", json=email())).json()["id"]
    await wait_status(stack.http, raw, "sent")

    handle = client.get_workflow_handle(workflow_id_for(templated))
    described = await handle.describe()
    assert await described.static_summary() == f"TestTemplate → 2 recipients, priority high, due {due:%Y-%m-%d} 09:00 UTC"
    details = await described.static_details() or ""
    assert f"`{templated}`" in details and "**sender** system" in details and "@" not in details
    assert described.typed_search_attributes.get(search.TEMPLATE) == "TestTemplate"
    assert described.typed_search_attributes.get(search.SENDER) == "system"
    assert await (await client.get_workflow_handle(workflow_id_for(raw)).describe()).static_summary() == (
        "raw email → 1 recipient, priority normal"
    )
    assert (await stack.http.post(f"/v1/emails/{templated}/cancel", json={})).status_code == 200


async def test_a_worker_adds_the_search_attributes_a_namespace_lacks(
    client: Client, database_url: str, temporal_server: TemporalDevServer, tmp_path: Path
) -> None:
    namespace = f"sa-{uuid.uuid4().hex[:8]}"
    await client.workflow_service.register_namespace(
        RegisterNamespaceRequest(namespace=namespace, workflow_execution_retention_period=Duration(seconds=86400))
    )
    assert await search.ensure_registered(client, namespace) == [key.name for key in search.ALL]
    assert await search.ensure_registered(client, namespace) == []  # nothing left to add

    # One of the names taken with another type: not silently "fixed", reported.
    clash = f"sa-{uuid.uuid4().hex[:8]}"
    await client.workflow_service.register_namespace(
        RegisterNamespaceRequest(namespace=clash, workflow_execution_retention_period=Duration(seconds=86400))
    )
    await client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(namespace=clash, search_attributes={"EmailStatus": IndexedValueType.INDEXED_VALUE_TYPE_INT})
    )
    with pytest.raises(search.SearchAttributesMissing, match="EmailStatus is INDEXED_VALUE_TYPE_INT, not Keyword"):
        await search.ensure_registered(client, clash)
    # A worker on that namespace does not start (its emails' workflows would stall), and says why.
    settings = fast_settings(database_url, temporal_server.address, free_port(), "clash", temporal_namespace=clash)
    log = tmp_path / "worker.log"
    worker = start_worker(settings, log)
    try:
        assert await asyncio.to_thread(worker.wait, PROCESS_STARTS) == 1
    finally:
        worker.kill()
    assert "EmailStatus is INDEXED_VALUE_TYPE_INT, not Keyword" in log.read_text()
    assert search.create_commands("prod")[0] == (
        "temporal operator search-attribute create --namespace prod --name EmailStatus --type Keyword"
    )


async def test_the_readmes_saved_queries_are_valid_and_find_emails(stack: Stack, client: Client) -> None:
    """The operator's queries from the README, pasted as written (with one real sender id): the
    server accepts each, and the sender's query finds the sender's email."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("The queries an operator needs", 1)[1].split("```", 2)[1]
    queries = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(queries) == 4 and all(q.startswith(EMAILS) for q in queries), queries
    sent = (await stack.http.post("/v1/emails", json=email())).json()["id"]
    await wait_status(stack.http, sent, "sent")
    for query in queries:
        query = query.replace('EmailSender="01a2…"', 'EmailSender="system"')
        assert await client.count_workflows(query) is not None  # accepted: a bad query raises RPCError

    async def listed() -> bool:
        return workflow_id_for(sent) in [wf.id async for wf in client.list_workflows(queries[2].replace("01a2…", "system"))]

    await eventually(listed, timeout=EMAIL_SETTLES, what="the sender's query does not list the sender's email")
