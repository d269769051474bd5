"""The README's shell examples, pasted in order into one bash against `mailqueue dev` (what `make
dev` runs), as a newcomer does: an example that rots fails here."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import EMAIL_SETTLES, PROCESS_STARTS, ROOT, DevStack, eventually

# The README sections whose ```sh / ```bash blocks are run (their ### parts included), in the README's order.
SECTIONS = ("Your first email", "GraphQL", "Users, keys and sender settings", "Templates")
# `mailqueue dev`'s default ports, as the examples use them.
DEFAULT_PORTS = {"api": 8000, "temporal": 7233, "ui": 8233, "smtp": 1025, "mail": 8025, "bounce": 2525}
PRELUDE = """set -euo pipefail
trap 'echo "a README example failed (exit $?): $BASH_COMMAND" >&2' ERR
curl() {  # an HTTP error fails the example
  command curl --fail-with-body --show-error "$@" || { local code=$?; echo "a README example failed: curl $*" >&2; return $code; }
}
"""
# What the examples leave in the shell, for the checks below.
VARIABLES = ("ID", "LATER_ID", "NEW_AT", "USER_ID")


def readme_examples(readme: str, sections: tuple[str, ...]) -> str:
    """The shell blocks under these `## ` headings, in the README's order."""
    assert set(sections) <= set(re.findall(r"^## (.+)$", readme, re.M)), "a README section was renamed"
    blocks: list[str] = []
    section, lines = "", []
    language: str | None = None  # of the code block we are in
    for line in readme.splitlines(keepends=True):
        if language is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("```"):
                language, lines = line[3:].strip(), []
        elif line.startswith("```"):
            if language in ("sh", "bash") and section in sections:
                blocks.append("".join(lines))
            language = None
        else:
            lines.append(line)
    return "\n".join(blocks)


def for_stack(script: str, ports: dict[str, int]) -> str:
    """The examples with `mailqueue dev`'s default ports replaced by this stack's."""
    default_to_ours = {str(DEFAULT_PORTS[name]): str(port) for name, port in ports.items()}
    numbers = "|".join(default_to_ours)
    script = re.sub(rf"\b(localhost|127\.0\.0\.1):({numbers})\b", lambda m: f"{m[1]}:{default_to_ours[m[2]]}", script)
    script = script.replace(f'"smtp_port":{DEFAULT_PORTS["smtp"]}', f'"smtp_port":{ports["smtp"]}')  # a user's relay: the catcher
    assert not re.search(rf"\b({numbers})\b", script), "a default port the test does not know how to replace"
    return script


@pytest.mark.slow
async def test_the_readme_examples_work_pasted_in_order(tmp_path: Path) -> None:
    # The newcomer's folder: .mailqueue is `make dev`'s state, .venv the installed project.
    (tmp_path / ".venv").symlink_to(sys.prefix)
    async with DevStack(tmp_path / ".mailqueue", tmp_path / "dev.out") as dev:
        examples = readme_examples((ROOT / "README.md").read_text(), SECTIONS)
        assert examples.count("curl ") > 10, examples
        script = PRELUDE + for_stack(examples, dev.ports) + f'\necho "{" ".join(f"${v}" for v in VARIABLES)}"\n'
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}
        shell = await asyncio.create_subprocess_exec(
            "bash", "-c", script, cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        # A bound for a hung example, far above what the steps take (each send is one attempt to the catcher).
        out, err = await asyncio.wait_for(shell.communicate(), timeout=2 * PROCESS_STARTS)
        printed = f"stdout:\n{out.decode()}\nstderr:\n{err.decode()}"
        assert shell.returncode == 0, printed
        values = dict(zip(VARIABLES, out.decode().strip().splitlines()[-1].split(), strict=True))

        async with httpx.AsyncClient(base_url=dev.api, headers={"Authorization": f"Bearer {dev.key}"}) as admin:

            emails: list[dict[str, Any]] = []

            def ended() -> int:
                return sum(e["status"] in ("sent", "cancelled") for e in emails)

            async def settled() -> bool:
                nonlocal emails
                emails = (await admin.get("/v1/emails", params={"page_size": 100})).json()["items"]
                return ended() == len(emails)

            await eventually(settled, timeout=EMAIL_SETTLES, what=lambda: f"not all sent or cancelled: {emails}", progress=ended)
            first = (await admin.get(f"/v1/emails/{values['ID']}")).json()
            assert first["subject"] == "Hello" and first["status"] == "sent"

            later = (await admin.get(f"/v1/emails/{values['LATER_ID']}")).json()
            assert later["subject"] == "Later" and later["status"] == "cancelled"
            assert later["scheduled_for"] == values["NEW_AT"]  # rescheduled to the day after, then cancelled
            events = [e["event"] for e in later["events"]]
            assert events == ["queued", "scheduled", "rescheduled", "cancelled"], events

            domain = (await admin.get("/v1/domains/example.org", params={"user_id": values["USER_ID"]})).json()
            assert domain["status"] == "verified", domain

        by_subject = {e["subject"]: e for e in emails}
        assert by_subject["Pick list ready"]["sender"] == {"type": "user", "id": values["USER_ID"]}
        caught = httpx.get(f"{dev.mail}/api/messages").json()
        sent = {e["message_id"]: e["subject"] for e in emails if e["status"] == "sent"}
        assert sorted(m["message_id"] for m in caught) == sorted(sent), "each sent email caught once, nothing else"
        assert sorted(sent.values()) == sorted([
            "Hello", "Shipped", "Welcome, Bob", "Hello from GraphQL", "mailqueue test email", "Pick list ready",
            "Order A-1001 is on its way", "Bestellung A-1001 ist unterwegs", "Your invoice",
        ])
        assert {m["from"] for m in caught if m["subject"] == "Pick list ready"} == {"Warehouse <warehouse@example.com>"}
