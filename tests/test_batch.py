"""POST /v1/emails/batch: up to 100 emails, each validated and answered on its own."""

from __future__ import annotations

import os

from tests.helpers import Stack, delivered, email, total_emails, wait_status


async def test_each_email_is_answered_on_its_own(stack: Stack) -> None:
    before = await total_emails(stack.http)
    batch = [
        email(subject="one"),
        email(to=["not an address"]),
        email(subject="two", unknown_field=1),
        {"to": ["ann@example.com"], "template": "no-such-template-here", "template_data": {}},
        email(subject="three"),
    ]
    got = await stack.http.post("/v1/emails/batch", json={"emails": batch})
    assert got.status_code == 200, got.text
    body = got.json()
    assert [i["status"] for i in body["items"]] == [202, 422, 422, 422, 202]
    assert [i["index"] for i in body["items"]] == [0, 1, 2, 3, 4]
    assert body["accepted"] == 2 and body["rejected"] == 3
    assert body["items"][1]["detail"][0]["loc"][:1] == ["to"]
    assert body["items"][2]["detail"][0]["loc"] == ["unknown_field"]
    assert "no-such-template-here" in body["items"][3]["detail"][0]["msg"]
    for item in (body["items"][0], body["items"][4]):
        await wait_status(stack.http, item["id"], "sent")
        assert await delivered(stack.sink, item["id"])
    assert await total_emails(stack.http) == before + 2


async def test_all_or_nothing_queues_nothing_when_one_is_invalid(stack: Stack) -> None:
    before = await total_emails(stack.http)
    got = await stack.http.post("/v1/emails/batch", json={"emails": [email(), email(cc=["bad"])], "all_or_nothing": True})
    assert got.status_code == 422
    assert "nothing was queued" in got.json()["detail"]["msg"] and got.json()["detail"]["items"][0]["index"] == 1
    assert await total_emails(stack.http) == before
    ok = await stack.http.post("/v1/emails/batch", json={"emails": [email(), email()], "all_or_nothing": True})
    assert [i["status"] for i in ok.json()["items"]] == [202, 202]


async def test_idempotency_keys_per_email(stack: Stack) -> None:
    key = f"batch-{os.urandom(4).hex()}"
    items = [email(subject="keyed") | {"idempotency_key": key}, email(subject="unkeyed")]
    first = (await stack.http.post("/v1/emails/batch", json={"emails": items})).json()["items"]
    again = (await stack.http.post("/v1/emails/batch", json={"emails": items})).json()["items"]
    assert first[0]["id"] == again[0]["id"] and first[1]["id"] != again[1]["id"]
    clash = (await stack.http.post("/v1/emails/batch", json={"emails": [email(subject="other") | {"idempotency_key": key}]})).json()
    assert clash["items"][0]["status"] == 409
    bad_key = (await stack.http.post("/v1/emails/batch", json={"emails": [email() | {"idempotency_key": "has space"}]})).json()
    assert bad_key["items"][0]["status"] == 422 and bad_key["items"][0]["detail"][0]["loc"] == ["idempotency_key"]


async def test_batch_size_is_bounded(stack: Stack) -> None:
    assert (await stack.http.post("/v1/emails/batch", json={"emails": []})).status_code == 422
    assert (await stack.http.post("/v1/emails/batch", json={"emails": [email()] * 101})).status_code == 422
    assert (await stack.http.post("/v1/emails/batch", json={"emails": ["not an object"]})).status_code == 422
