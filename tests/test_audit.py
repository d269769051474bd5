"""The dependency audit's verdicts: a known vulnerability fails; an unreachable database says so and passes."""

from __future__ import annotations

from devstack.audit import LOCK, summarize


def dep(name: str, vulns: list[dict] | None = None, skip: str | None = None) -> dict:
    d: dict = {"name": name, "version": "1.0"}
    if skip:
        d["skip_reason"] = skip
    else:
        d["vulns"] = vulns or []
    return d


def test_a_known_vulnerability_fails_and_names_the_fix() -> None:
    code, lines = summarize({"dependencies": [dep("jinja2", [{"id": "GHSA-x", "fix_versions": ["3.1.7"]}]), dep("httpx")]})
    assert code == 1
    assert "jinja2 1.0: GHSA-x (fixed in 3.1.7)" in lines[0]
    assert "1 of 2 audited" in lines[-1]


def test_an_unreachable_database_is_reported_as_not_audited_and_passes() -> None:
    code, lines = summarize({"dependencies": [dep("a", skip="Dependency not found on PyPI"), dep("b", skip="Dependency not found on PyPI")]})
    assert code == 0
    assert "NOT audited" in lines[-1] and "none of 2" in lines[-1]


def test_partly_audited_names_what_was_skipped() -> None:
    code, lines = summarize({"dependencies": [dep("a"), dep("b", skip="not found")]})
    assert code == 0
    assert lines == ["audit: 1 dependencies could not be audited: b", "audit: no known vulnerabilities in 1 audited dependencies"]


def test_the_lock_pins_every_runtime_dependency() -> None:
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in LOCK.read_text().splitlines() if "==" in line}
    for name in ("temporalio", "fastapi", "jinja2", "cryptography", "dnspython", "redis", "pip-audit"):
        assert name in pinned, name
