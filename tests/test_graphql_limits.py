"""/graphql's guards, in process (the app with its real database; no Temporal needed): a list of
emails with their events is a fixed number of queries however long the list (batched, not N+1);
depth and cost limits refuse a query before anything runs; introspection and GraphiQL can be
turned off; a fault inside a resolver is "internal error", its trace in the log and never in the
answer; the key's rate limit is GraphQL's TOO_MANY_REQUESTS."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.services import stats as queue_stats
from devstack.net import free_port
from mailqueue.email_store import insert_email, record_from_spec
from mailqueue.models import EmailEvent, utcnow
from tests.helpers import AUTH, executed, fast_settings, make_spec

EMAILS_WITH_EVENTS = """
query ($id: String!, $first: Int!) {
  emails(filter: {relatedEntityId: $id}, first: $first) {
    totalCount
    edges { node { id status from sender { type id } relatedEntity { type id } headers metadata events { event status detail } } }
  }
}"""


@asynccontextmanager
async def graphql_app(database_url: str, **overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The API in this process (lifespan run), an HTTP client on it, and its database engine."""
    settings = fast_settings(database_url, f"127.0.0.1:{free_port()}", free_port(), f"gql-{uuid.uuid4()}", **overrides)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api", headers=AUTH) as http:
            yield http, app.state.sessions.kw["bind"]


async def graphql(http: httpx.AsyncClient, query: str, headers: dict[str, str] | None = None, **variables: Any) -> dict[str, Any]:
    resp = await http.post("/graphql", json={"query": query, "variables": variables}, headers=headers)
    assert resp.status_code == 200, resp.text
    assert "Traceback" not in resp.text
    return resp.json()


def codes(answer: dict[str, Any]) -> list[str]:
    return [e.get("extensions", {}).get("code") for e in answer.get("errors") or []]


async def add_emails(engine: Any, related_id: str, n: int) -> None:
    """n emails with two events each, related to `related_id` (so a filter finds exactly these)."""
    from mailqueue.db import sessionmaker

    async with sessionmaker(engine)() as session:
        for _ in range(n):
            spec = make_spec(related_entity_type="GraphQLTest", related_entity_id=related_id)
            await insert_email(session, record_from_spec(spec))
            session.add(EmailEvent(id=str(uuid.uuid4()), email_id=spec.email_id, event="scheduled", status="scheduled",
                                   detail="later", created_at=utcnow()))
        await session.commit()


async def test_emails_with_their_events_is_not_one_query_per_email(database_url: str) -> None:
    related = uuid.uuid4().hex
    async with graphql_app(database_url) as (http, engine):
        await add_emails(engine, related, 25)
        await graphql(http, EMAILS_WITH_EVENTS, id=related, first=1)  # connections made, dialect set up
        per_size: dict[int, int] = {}
        for first in (5, 25):
            with executed(engine) as statements:
                answer = await graphql(http, EMAILS_WITH_EVENTS, id=related, first=first)
            assert "errors" not in answer, answer
            listed = answer["data"]["emails"]
            assert listed["totalCount"] == 25 and len(listed["edges"]) == first
            assert all([e["event"] for e in edge["node"]["events"]] == ["queued", "scheduled"] for edge in listed["edges"])
            assert {edge["node"]["relatedEntity"]["id"] for edge in listed["edges"]} == {related}
            assert listed["edges"][0]["node"]["from"] == "Sender <sender@example.com>"
            per_size[first] = len([s for s in statements if s.lstrip().upper().startswith("SELECT")])
    # The count, the page, and one query for every listed email's events: the same for 5 emails as for 25.
    assert per_size[5] == per_size[25] <= 3, per_size


async def test_too_deep_or_too_costly_queries_are_refused_before_running(database_url: str) -> None:
    async with graphql_app(database_url, graphql_max_depth=3, graphql_max_cost=500) as (http, engine):
        with executed(engine) as statements:
            deep = await graphql(http, "{ emails { edges { node { events { event } } } } }")
            costly = await graphql(http, "{ emails(first: 100) { edges { node { id to subject from } } } }")  # 1 + 100 * 6
        assert deep["data"] is None and "exceeds maximum operation depth of 3" in deep["errors"][0]["message"]
        assert costly["data"] is None and codes(costly) == ["QUERY_TOO_COSTLY"], costly
        assert costly["errors"][0]["extensions"] == {"code": "QUERY_TOO_COSTLY", "cost": 601, "limit": 500}
        assert statements == []  # refused in validation: nothing ran
        fine = await graphql(http, "{ emails(first: 5) { totalCount edges { node { id } } } }")
        assert "errors" not in fine, fine
        # Fragments count too: the same costly selection through a fragment is refused the same way.
        via_fragment = await graphql(
            http, "query { emails(first: 100) { ...E } } fragment E on EmailConnection { edges { node { id to subject from } } }",
        )
        assert codes(via_fragment) == ["QUERY_TOO_COSTLY"]


async def test_introspection_and_graphiql_on_by_default_and_can_be_turned_off(database_url: str) -> None:
    introspect = "{ __schema { queryType { name } } }"
    async with graphql_app(database_url) as (http, _):
        assert (await graphql(http, introspect))["data"]["__schema"]["queryType"]["name"] == "Query"
        page = await http.get("/graphql", headers={"Accept": "text/html"})
        assert page.status_code == 200 and "graphiql" in page.text.lower()
    async with graphql_app(database_url, graphql_introspection=False, graphql_ide=False) as (http, _):
        refused = await graphql(http, introspect)
        assert refused.get("data") is None and "introspection" in refused["errors"][0]["message"].lower()
        assert (await http.get("/graphql", headers={"Accept": "text/html"})).status_code == 404
        assert "errors" not in await graphql(http, "{ emails(first: 1) { totalCount } }")  # queries still work


async def test_a_fault_in_a_resolver_is_internal_error_with_no_detail_and_is_logged(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    async def broken(*args: Any) -> Any:
        raise RuntimeError("secret-internal-detail at /srv/mailqueue")

    monkeypatch.setattr(queue_stats, "stats", broken)
    async with graphql_app(database_url) as (http, _):
        answer = await graphql(http, "{ stats { queueDepth } }")
    assert answer["errors"][0]["message"] == "internal error" and codes(answer) == ["INTERNAL_SERVER_ERROR"]
    assert "secret-internal-detail" not in str(answer) and "RuntimeError" not in str(answer)
    logged = [line for line in capsys.readouterr().err.splitlines() if "graphql resolver failed at stats" in line]
    assert logged and "secret-internal-detail" in logged[0] and "Traceback" in logged[0]  # the operator's log has it all


async def test_the_keys_rate_limit_is_too_many_requests(database_url: str) -> None:
    async with graphql_app(database_url, rate_limit_per_minute=2) as (http, _):
        answers = [await graphql(http, "{ emails(first: 1) { totalCount } }") for _ in range(3)]
    assert ["errors" in a for a in answers] == [False, False, True]
    error = answers[2]["errors"][0]
    assert error["extensions"]["code"] == "TOO_MANY_REQUESTS" and error["extensions"]["retryAfter"] > 0


async def test_no_key_is_unauthenticated_and_nothing_is_read(database_url: str) -> None:
    async with graphql_app(database_url) as (http, engine):
        with executed(engine) as statements:
            for auth in ("", "Bearer not-a-key"):
                answer = await graphql(http, "{ stats { stuck } }", headers={"Authorization": auth})
                assert codes(answer) == ["UNAUTHENTICATED"] and answer["data"] is None, answer
    assert not [s for s in statements if "emails" in s]  # only the key lookup ran: no email was read
