"""`make audit` (and the first step of `make test`): known vulnerabilities in the locked dependencies.

Runs pip-audit against requirements.lock. A known vulnerability fails (exit 1). When the
vulnerability database cannot be reached (no internet: pip-audit then reports every package as
"not found" and, misleadingly, "No known vulnerabilities found"), this says so plainly and does
not fail: nothing was checked, and the output must not suggest otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "requirements.lock"
TIMEOUT_SECONDS = 300


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "audit.json"
        command = [
            sys.executable, "-m", "pip_audit", "--requirement", str(LOCK), "--no-deps", "--disable-pip",
            "--progress-spinner", "off", "--format", "json", "--output", str(report),
        ]
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            print(f"audit: pip-audit gave no answer in {TIMEOUT_SECONDS} s: the vulnerability database is unreachable; NOT audited")
            return 0
        found = json.loads(report.read_text()) if report.exists() and report.stat().st_size else None
    if found is None:
        reason = (run.stderr.strip().splitlines() or ["no output"])[-1]
        if "Connection" in run.stderr or "resolve" in run.stderr:
            print(f"audit: the vulnerability database could not be reached ({reason[:160]}); NOT audited")
            return 0
        print(f"audit: pip-audit failed: {reason}")
        return 1
    code, lines = summarize(found)
    print("\n".join(lines))
    return code


def summarize(found: dict) -> tuple[int, list[str]]:
    """pip-audit's JSON report -> (exit code, lines to print)."""
    deps = found.get("dependencies", [])
    vulnerable = [d for d in deps if d.get("vulns")]
    skipped = [d for d in deps if d.get("skip_reason")]
    lines = []
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions") or []) or "no fixed version yet"
            lines.append(f"audit: {dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixes})")
    audited = len(deps) - len(skipped)
    if vulnerable:
        return 1, [*lines, f"audit: {len(vulnerable)} of {audited} audited dependencies have known vulnerabilities"]
    if not audited:
        return 0, [f"audit: the vulnerability database could not be reached: none of {len(deps)} locked dependencies was audited; NOT audited, not failing"]
    if skipped:
        lines.append(f"audit: {len(skipped)} dependencies could not be audited: {', '.join(d['name'] for d in skipped)}")
    return 0, [*lines, f"audit: no known vulnerabilities in {audited} audited dependencies"]

if __name__ == "__main__":
    sys.exit(main())
