"""Bad input at scale: schemathesis fuzzes every operation in the API's own OpenAPI schema.

About 500 generated requests (20 per operation), valid and deliberately invalid, go to the real stack
(uvicorn child, Temporal, a worker, PostgreSQL) with the admin key, and again with a wrong key or none.
They prove that:
- no response is a 5xx: bad input is the caller's problem, never a crash;
- every 4xx says what was wrong as JSON, in the app's one error shape `{"detail": ...}`;
- without a valid key the answer is 401 (or the refusal the same malformed request gets with one);
- responses keep to the schema (status codes, content types, headers, bodies), invalid data is
  refused, and the key is enforced (schemathesis's own checks).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import APIOperation, Case, CheckContext, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import scratch_database
from tests.helpers import AUTH, Stack, email

EXAMPLES_PER_OPERATION = 20
BAD_KEY = {"Authorization": "Bearer not-a-key"}
# Refusals made before an operation's own code runs, which FastAPI documents for no operation: 400 a body
# that cannot be decoded, 401/403 the key, 413 the body-size limit (api/app.py).
APP_WIDE = {400, 401, 403, 413}

pytestmark = pytest.mark.filterwarnings(
    # schemathesis's own strategies draw from `random`; nothing this test can change.
    "ignore:Do not use the `random` module inside strategies:hypothesis.errors.HypothesisDeprecationWarning"
)


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database of this module's own: the fuzzer deletes templates and makes users other modules would see."""
    with scratch_database(tmp_path_factory.mktemp("fuzz-db")) as url:
        yield url


@pytest.fixture
def hypothesis_home(tmp_path: Path) -> Iterator[None]:
    """Hypothesis keeps caches in ./.hypothesis even without an example database: not in the repository."""
    set_hypothesis_home_dir(tmp_path / "hypothesis")
    yield
    set_hypothesis_home_dir(None)


async def test_bad_input_at_scale(stack: Stack, hypothesis_home: None) -> None:
    known = await _seed(stack)
    # schemathesis blocks; in a thread, this loop keeps running the worker that cancel/test requests wait on.
    counts, failures = await asyncio.to_thread(_fuzz, str(stack.http.base_url).rstrip("/"), known)
    assert not failures, "\n\n".join(failures)
    assert all(counts.values()) and sum(counts.values()) >= 400, counts


async def _seed(stack: Stack) -> dict[str, str]:
    """Real resources to name, so that some requests get past the 404 to the code behind it."""
    http = stack.http
    reloaded = (await http.post("/v1/templates/reload")).json()
    template = next(t["name"] for t in reloaded["created"] + reloaded["unchanged"] if not t["name"].startswith("_"))
    user = (await http.post("/v1/users", json={"name": f"fuzz-{uuid.uuid4().hex[:8]}"})).json()
    key = (await http.post(f"/v1/users/{user['id']}/api-keys", json={"name": "fuzz"})).json()
    tester = (await http.post("/v1/users", json={"name": f"fuzz-{uuid.uuid4().hex[:8]}", "email": "tester@example.com"})).json()
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    scheduled = (await http.post("/v1/emails", json=email(send_at=later))).json()
    # A webhook endpoint of the user's (who sends nothing here, so nothing is ever POSTed to it): a public
    # literal address on port 443, which the URL policy accepts without DNS.
    hook = (await http.post("/v1/webhooks", json={"url": "https://93.184.215.14/hook"}, headers={"Authorization": f"Bearer {key['key']}"})).json()
    return {
        "user_id": user["id"], "key_id": key["id"], "email_id": scheduled["id"], "name": template, "tester": tester["id"],
        "endpoint_id": hook["id"],
    }


def _known(operation: APIOperation, known: dict[str, str]) -> dict[str, dict[str, str]]:
    """Arguments for the operation's strategy that name the seeded resources (none: it names nothing)."""
    if operation.path == "/v1/settings/mail/test":
        # It sends: only through this user's settings, which nothing fuzzes (others' may name a provider online).
        return {"query": {"user_id": known["tester"]}}
    if operation.path == "/v1/settings/mail":
        return {"query": {"user_id": known["user_id"]}}
    path = {p.name: known[p.name] for p in operation.path_parameters if p.name in known}
    return {"path_parameters": path} if path else {}


def errors_are_json(ctx: CheckContext | None, response: Response, case: Case) -> bool | None:
    """A 4xx explains itself in the app's error shape, {"detail": ...}; a 401 names the scheme to use."""
    if 400 <= response.status_code < 500:
        try:
            body = response.json()
        except ValueError:
            body = None
        assert response.headers.get("content-type") == ["application/json"] and isinstance(body, dict) and "detail" in body, (
            f"{response.status_code} without a JSON error body: {response.text[:300]!r}"
        )
        assert response.status_code != 401 or "www-authenticate" in response.headers, "401 without WWW-Authenticate"
    return None


def status_code_documented(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """status_code_conformance, except for the app-wide refusals that no operation lists."""
    return None if response.status_code in APP_WIDE else status_code_conformance(ctx, response, case)


def negative_data_refused(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """negative_data_rejection, where an app-wide refusal (a 413 for a generated body over the size limit) is a refusal too.
    Not for a multipart form (POST /v1/uploads): it carries every value as bytes, so a generated `null` or number
    for the file arrives as a file holding those bytes, an upload like any other."""
    if response.status_code in APP_WIDE or case.media_type == "multipart/form-data":
        return None
    return negative_data_rejection(ctx, response, case)


# Not positive_data_acceptance: the schema cannot say that `to` must hold real addresses, that a body needs
# a subject, html or text, or that send_at must lie ahead, so most schema-valid bodies are rightly a 422.
CHECKS = [
    not_a_server_error,
    status_code_documented,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_refused,
    missing_required_header,
    ignored_auth,
    errors_are_json,
]


def _fuzz(base_url: str, known: dict[str, str]) -> tuple[Counter[str], list[str]]:
    """Every operation in turn; every failing one is reported, not only the first."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    counts: Counter[str] = Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.endswith("/events/stream"):
            # Server-sent events: a valid request is an answer that never ends (heartbeats keep it alive), which
            # a fuzzer's request cannot wait out. tests/test_events.py checks their refusals (bad cursors, keys, ids).
            continue
        counts[operation.label] = 0
        declares_key = bool(operation.definition.raw.get("security"))
        strategies = [operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)]
        if named := _known(operation, known):
            strategies.append(operation.as_strategy(GenerationMode.POSITIVE, **named))
        strategies += operation.get_strategies_from_examples()

        # `run` is called within this iteration, so reading the loop's variables in it is safe (B023).
        @settings(
            max_examples=EXAMPLES_PER_OPERATION, derandomize=True, database=None, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        )
        @given(case=st.one_of(strategies))
        def run(case: Case) -> None:
            counts[operation.label] += 1  # noqa: B023
            # Where the schema declares the key, a generated case carries a random one, or none when a negative
            # case drops it on purpose: a random one becomes the admin key, a dropped one stays dropped.
            # (The browser preview reads the header undeclared; the probes ignore it.)
            auth = AUTH if not declares_key or "Authorization" in (case.headers or {}) else None  # noqa: B023
            response = case.call(base_url=base_url, headers=auth, timeout=30)
            case.validate_response(response, headers=auth, checks=CHECKS)
            if auth and operation.path.startswith("/v1/"):  # noqa: B023
                _probe_without_key(case, response, base_url, BAD_KEY if counts[operation.label] % 2 else {})  # noqa: B023

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - schemathesis's failures are exception groups
            failures.append(f"{operation.label}: {exc}")
    return counts, failures


def _probe_without_key(case: Case, authed: Response, base_url: str, headers: dict[str, str]) -> None:
    """The same request with a wrong key or none: 401, or the refusal it got with the key (e.g. a body that is not JSON)."""
    kwargs = case.as_transport_kwargs(base_url=base_url)
    kwargs["headers"] = {k: v for k, v in kwargs["headers"].items() if k.lower() != "authorization"} | headers
    probe = Response.from_any(requests.request(**kwargs, timeout=30))
    sent = f"with {'a wrong key' if headers else 'no key'}: {case.as_curl_command()}"
    assert probe.status_code == 401 or (authed.status_code >= 400 and probe.status_code == authed.status_code), (
        f"{probe.status_code} (with the key: {authed.status_code}) {sent}\n{probe.text[:300]!r}"
    )
    try:
        errors_are_json(None, probe, case)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{sent}") from None
