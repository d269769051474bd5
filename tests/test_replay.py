"""Every recorded history of our workflows replays against today's code (determinism), through
the data converter the workers use: histories recorded before payloads were encrypted (v1-v5,
r1) and after (enc1, encrypted with the test key, tests/helpers.TEST_PAYLOAD_KEY), and with the
search attributes kept up to date (enc2)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from mailqueue.codec import new_payload_key
from mailqueue.config import Settings
from mailqueue.temporal import data_converter
from tests.helpers import TEST_PAYLOAD_KEY
from workflows.reconcile import ReconcileEmailsWorkflow
from workflows.purge import PurgeEmailsWorkflow
from workflows.send_email import SendEmailWorkflow
from workflows.webhooks import WebhookEndpointWorkflow, WebhookRedeliveryWorkflow

WORKFLOWS = [SendEmailWorkflow, ReconcileEmailsWorkflow, WebhookEndpointWorkflow, WebhookRedeliveryWorkflow, PurgeEmailsWorkflow]

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
ENCRYPTED = [p for p in HISTORIES if p.stem.startswith("enc")]


def converter(payload_keys: str = TEST_PAYLOAD_KEY):  # type: ignore[no-untyped-def]
    return data_converter(Settings(payload_keys=payload_keys, _env_file=None))  # type: ignore[call-arg]
SHAPES = {
    "sent", "scheduled_then_sent", "cancelled_while_scheduled", "cancelled_from_temporal", "rescheduled_then_sent",
    "transient_then_sent", "permanent_failure", "retried_after_failure", "cancel_rejected_while_sending", "templated",
    "templated_with_layout", "template_store_outage", "deferred_by_quota", "server_unreachable_then_sent",
    "server_unreachable_gave_up", "sender_changed_drivers", "suppressed_at_send",
    "sent_with_attachments",  # a new input (AttachmentRef), not a new workflow path: enc3
    "paused_then_sent", "paused_then_cancelled",  # enc4: send-can-pause (the kill switch)
    "reconcile",  # ReconcileEmailsWorkflow
    "purge",  # PurgeEmailsWorkflow (retention): p1
}
# The webhook workflows' shapes (workflows/webhooks.py; recorded with --prefix whN).
WEBHOOK_SHAPES = {"webhook_delivered_then_continued", "webhook_retried_then_deleted", "webhook_disabled", "webhook_redelivered"}
SHAPES |= WEBHOOK_SHAPES


def test_every_workflow_shape_has_a_recorded_history() -> None:
    recorded = {p.stem.split("_", 1)[1] for p in HISTORIES}
    assert SHAPES <= recorded, f"no history recorded for {sorted(SHAPES - recorded)}"


def test_every_email_shape_was_recorded_keeping_its_search_attributes_up_to_date() -> None:
    """enc2 (patch search-attributes): each email's run upserts its status as it changes; so do the
    shapes recorded since (enc3: send-honours-suppressions; enc4: send-can-pause)."""
    since = [p for p in HISTORIES if p.stem.split("_", 1)[0] in ("enc2", "enc3", "enc4")]
    assert all("upsertWorkflowSearchAttributesEventAttributes" in p.read_text() for p in since)
    assert {p.stem.split("_", 1)[1] for p in since} == SHAPES - {"reconcile", "purge"} - WEBHOOK_SHAPES


def test_webhook_histories_hold_only_encrypted_payloads_and_name_no_secret() -> None:
    """The webhook workflows carry the endpoint's id and timings, never its secret (activities read it from the database)."""
    recorded = [p for p in HISTORIES if p.stem.split("_", 1)[1] in WEBHOOK_SHAPES]
    assert {p.stem.split("_", 1)[1] for p in recorded} == WEBHOOK_SHAPES
    encrypted = base64.b64encode(b"binary/encrypted").decode()
    for path in recorded:
        raw = json.loads(path.read_text())
        payloads = list(_payloads(raw, ours=True))
        assert payloads and all(p["metadata"]["encoding"] == encrypted for p in payloads), path.name
        assert "whsec_" not in _clear_text(raw), path.name


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays(path: Path) -> None:
    raw = json.loads(path.read_text())
    history = WorkflowHistory.from_json("email-replay", raw)
    result = await Replayer(workflows=WORKFLOWS, data_converter=converter()).replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None


# The SDK's own bookkeeping, never passed through a codec: a local activity's timing and a patch id
# in markers, and the TemporalChangeVersion search attribute (indexed by the server, so in clear).
BOOKKEEPING = {"data", "patch-data", "searchAttributes"}


def _payloads(node: Any, *, ours: bool = False) -> Iterator[dict[str, Any]]:
    """Every Payload in a history's JSON (a dict with `metadata` holding an `encoding`); `ours`: only
    those our data converter wrote (not the SDK's bookkeeping)."""
    if isinstance(node, dict):
        if isinstance(node.get("metadata"), dict) and "encoding" in node["metadata"]:
            yield node
        for key, value in node.items():
            if not (ours and key in BOOKKEEPING):
                yield from _payloads(value, ours=ours)
    elif isinstance(node, list):
        for value in node:
            yield from _payloads(value, ours=ours)


def _clear_text(raw: dict[str, Any]) -> str:
    """What anyone reading the history sees: its JSON, and every payload's data decoded from base64."""
    return json.dumps(raw) + "".join(base64.b64decode(p.get("data", "")).decode("utf-8", "replace") for p in _payloads(raw))


def test_histories_recorded_with_the_codec_hold_nothing_in_clear() -> None:
    assert ENCRYPTED, "no history recorded with the codec (python -m tests.record_histories --prefix enc1)"
    encrypted = base64.b64encode(b"binary/encrypted").decode()
    for path in ENCRYPTED:
        raw = json.loads(path.read_text())
        payloads = list(_payloads(raw, ours=True))
        assert payloads and all(p["metadata"]["encoding"] == encrypted for p in payloads), path.name
        # Failure messages travel as encrypted attributes; the message left in clear is the SDK's placeholder.
        assert "ann@example.com" not in _clear_text(raw) and "rejected" not in _clear_text(raw), path.name
    # The check can fail: a history from before the codec shows the recipient, and the SMTP server's reply.
    assert "ann@example.com" in _clear_text(json.loads((Path(__file__).parent / "histories" / "v1_sent.json").read_text()))
    assert "rejected" in _clear_text(json.loads((Path(__file__).parent / "histories" / "v2_permanent_failure.json").read_text()))


@pytest.mark.parametrize("keys", [None, new_payload_key()], ids=["no codec", "another key"])
async def test_an_encrypted_history_does_not_replay_without_its_key(keys: str | None) -> None:
    """The replay test really decodes through the codec: without the key, the workflow cannot even read its input."""
    path = next(p for p in ENCRYPTED if p.stem.endswith("_sent"))
    history = WorkflowHistory.from_json("email-replay", json.loads(path.read_text()))
    replayer = Replayer(workflows=WORKFLOWS) if keys is None else Replayer(workflows=WORKFLOWS, data_converter=converter(keys))
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is not None


async def test_replay_detects_a_changed_workflow(tmp_path: Path) -> None:
    """The replay test can fail: a history whose steps differ from the code is reported."""
    raw = json.loads((Path(__file__).parent / "histories" / "v1_sent.json").read_text())
    for event in raw["events"]:
        attrs = event.get("activityTaskScheduledEventAttributes")
        if attrs:
            attrs["activityType"]["name"] = "some_other_activity"
    history = WorkflowHistory.from_json("email-tampered", raw)
    result = await Replayer(workflows=[SendEmailWorkflow]).replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is not None
