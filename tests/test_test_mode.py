"""Test mode (MAILQUEUE_TEST_REDIRECT_TO): every email goes to one address, the intended recipients in headers."""

from __future__ import annotations

from temporalio.client import Client

from mailqueue.config import Settings
from mailqueue.contracts import workflow_id_for
from tests.helpers import SmtpSink, make_spec
from worker import build_worker
from workflows.send_email import SendEmailWorkflow


async def test_test_mode_sends_everything_to_one_address_and_keeps_the_recipients_in_headers(
    client: Client, settings: Settings, sink: SmtpSink
) -> None:
    redirect_settings = settings.model_copy(update={"test_redirect_to": "qa@example.com", "task_queue": settings.task_queue + "-redirect"})
    spec = make_spec(to=["Ann <ann@example.com>"], cc=["cc@example.com"], bcc=["hidden@example.com"])
    async with build_worker(client, redirect_settings):
        await (await client.start_workflow(
            SendEmailWorkflow.run, spec, id=workflow_id_for(spec.email_id), task_queue=redirect_settings.task_queue
        )).result()
    [caught] = await sink.wait_for(1)
    assert caught.rcpt_tos == ["qa@example.com"]
    msg = caught.message
    assert msg["To"] == "qa@example.com" and msg["Cc"] is None
    assert msg["X-Original-To"] == "Ann <ann@example.com>" and msg["X-Original-Cc"] == "cc@example.com"
    assert msg["X-Original-Bcc"] == "hidden@example.com"
