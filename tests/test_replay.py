"""Every recorded history of our workflows replays against today's code (determinism)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from workflows.reconcile import ReconcileEmailsWorkflow
from workflows.send_email import SendEmailWorkflow

WORKFLOWS = [SendEmailWorkflow, ReconcileEmailsWorkflow]

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
SHAPES = {
    "sent", "scheduled_then_sent", "cancelled_while_scheduled", "cancelled_from_temporal", "rescheduled_then_sent",
    "transient_then_sent", "permanent_failure", "retried_after_failure", "cancel_rejected_while_sending", "templated",
    "templated_with_layout", "template_store_outage", "deferred_by_quota", "server_unreachable_then_sent",
    "server_unreachable_gave_up", "sender_changed_drivers",
    "reconcile",  # ReconcileEmailsWorkflow
}


def test_every_workflow_shape_has_a_recorded_history() -> None:
    recorded = {p.stem.split("_", 1)[1] for p in HISTORIES}
    assert SHAPES <= recorded, f"no history recorded for {sorted(SHAPES - recorded)}"


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays(path: Path) -> None:
    raw = json.loads(path.read_text())
    history = WorkflowHistory.from_json("email-replay", raw)
    result = await Replayer(workflows=WORKFLOWS).replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None


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
