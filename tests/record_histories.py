"""Record the histories that tests/test_replay.py replays: one per shape of each workflow.

    .venv/bin/python -m tests.record_histories [--out tests/histories] [--prefix v1] [--only SCENARIO ...]

Run it after a workflow change has been released (with `workflow.patched` guarding the
change), keep the new files next to the old ones, and commit both: every released shape
must keep replaying.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from dataclasses import replace
from pathlib import Path

from temporalio.client import Client, WorkflowHandle
from pydantic import SecretStr
from sqlmodel import col, select
from temporalio.common import WorkflowIDReusePolicy

from devstack.devserver import TemporalDevServer
from devstack.net import free_port
from mailqueue import search, suppressions, webhooks
from mailqueue.events import feed_end
from mailqueue.accounts import new_id
from mailqueue.blobs import SqlBlobs
from mailqueue.config import Settings
from mailqueue.contracts import (
    AttachmentRef,
    CancelRequest,
    EmailSpec,
    EmailStatus,
    ReconcileRequest,
    RescheduleRequest,
    SenderType,
    TemplatePin,
    TemplateRef,
    workflow_id_for,
)
from mailqueue.crypto import SecretBox
from mailqueue.db import create_engine, migrate, sessionmaker
from mailqueue.models import Blob, EmailTemplate, FeatureFlag, SuppressionReason, WebhookDelivery, WebhookEndpoint
from mailqueue.senders import sender_key
from mailqueue.template_library import Renderer
from mailqueue.template_store import save_template_version
from mailqueue.templating import TemplateEngine
from mailqueue.temporal import connect
from mailqueue.webhooks import DeliveryPolicy, EndpointRun, RedeliverRequest
from tests.helpers import (
    EMAIL_SETTLES,
    TEST_PAYLOAD_KEY,
    TEST_SECRET_KEY,
    UNREACHABLE_DATABASE,
    SmtpSink,
    eventually,
    make_sender,
    make_spec,
)
from tests.webhook_receiver import WebhookReceiver
from worker import build_worker
from workflows.reconcile import ReconcileEmailsWorkflow
from workflows.purge import PurgeEmailsWorkflow
from mailqueue.contracts import PurgeRequest
from workflows.send_email import SendEmailWorkflow
from workflows.webhooks import WebhookEndpointWorkflow, WebhookRedeliveryWorkflow

Scenario = Callable[[Client, str, SmtpSink], Awaitable[WorkflowHandle]]
FLAGS_REFRESH_SECONDS = 0.5  # the recording worker's flag cache (the pause scenarios change the table)


async def _start(client: Client, spec: EmailSpec, tq: str, **kw) -> WorkflowHandle:  # type: ignore[no-untyped-def]
    """Started as mailqueue.delivery.start_delivery starts emails: with search attributes and a summary."""
    return await client.start_workflow(
        SendEmailWorkflow.run, spec, id=workflow_id_for(spec.email_id), task_queue=tq,
        search_attributes=search.initial(spec), static_summary=search.summary(spec), static_details=search.details(spec),
        **kw,
    )


async def _settle(handle: WorkflowHandle) -> WorkflowHandle:
    try:
        await handle.result()
    except Exception:  # noqa: BLE001 - failed and cancelled runs are shapes too
        pass
    return handle


async def _until(handle: WorkflowHandle, status: EmailStatus) -> None:
    async def reached() -> bool:
        return (await handle.query(SendEmailWorkflow.status)).status is status

    await eventually(reached, timeout=EMAIL_SETTLES, what=f"{handle.id} never became {status}")


async def _asked(handle: WorkflowHandle, times: int) -> None:
    """Until the send step was asked `times` times (and the waits between them began)."""

    async def asked() -> bool:
        history = await handle.fetch_history()
        return sum(1 for e in history.events if e.HasField("timer_started_event_attributes")) >= times

    await eventually(asked, timeout=EMAIL_SETTLES, interval=0.1, what=f"{handle.id} was not asked {times} times")


async def sent(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
    return await _settle(await _start(client, make_spec(), tq))


async def scheduled_then_sent(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
    return await _settle(await _start(client, make_spec(send_at=datetime.now(UTC) + timedelta(seconds=1)), tq))


async def cancelled_while_scheduled(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
    h = await _start(client, make_spec(send_at=datetime.now(UTC) + timedelta(hours=1)), tq)
    await _until(h, EmailStatus.SCHEDULED)
    await h.execute_update(SendEmailWorkflow.cancel, CancelRequest(reason="recorded"))
    return await _settle(h)


async def cancelled_from_temporal(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
    h = await _start(client, make_spec(send_at=datetime.now(UTC) + timedelta(hours=1)), tq)
    await _until(h, EmailStatus.SCHEDULED)
    await h.cancel()
    return await _settle(h)


async def rescheduled_then_sent(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
    h = await _start(client, make_spec(send_at=datetime.now(UTC) + timedelta(hours=1)), tq)
    await _until(h, EmailStatus.SCHEDULED)
    await h.execute_update(SendEmailWorkflow.reschedule, RescheduleRequest(send_at=datetime.now(UTC) + timedelta(seconds=1)))
    return await _settle(h)


async def transient_then_sent(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
    sink.handler.data_replies.append("451 4.3.0 try later")
    return await _settle(await _start(client, make_spec(), tq))


async def permanent_failure(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
    sink.handler.data_replies.append("550 5.7.1 rejected")
    return await _settle(await _start(client, make_spec(), tq))


async def retried_after_failure(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
    sink.handler.data_replies.append("550 5.7.1 rejected")
    spec = make_spec()
    await _settle(await _start(client, spec, tq))
    return await _settle(await _start(client, spec, tq, id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY))


async def cancel_rejected_while_sending(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
    sink.handler.data_replies.extend(["451 4.3.0 busy"] * 2)
    h = await _start(client, make_spec(max_attempts=4), tq)
    await _until(h, EmailStatus.SENDING)
    await h.cancel()
    return await _settle(h)


def templated(sessions) -> Scenario:  # type: ignore[no-untyped-def]
    async def run(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
        async with sessions() as s:
            t = await save_template_version(s, EmailTemplate(name=f"rec-{uuid.uuid4().hex[:6]}", subject="Hi {{ n }}", html="<p>{{ n }}</p>"))
        spec = make_spec()
        spec.content, spec.template = None, TemplateRef(name=t.name, version=t.version, data={"n": "x"})
        return await _settle(await _start(client, spec, tq))

    return run


def templated_with_layout(sessions) -> Scenario:  # type: ignore[no-untyped-def]
    """A template that extends a layout: the layout's version travels pinned in the input."""

    async def run(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
        suffix = uuid.uuid4().hex[:6]
        async with sessions() as s:
            layout = await save_template_version(
                s, EmailTemplate(name=f"_rec-layout-{suffix}", subject="", html="<html><body>{% block content %}{% endblock %}</body></html>")
            )
            t = await save_template_version(
                s, EmailTemplate(name=f"rec-{suffix}", subject="Hi {{ n }}",
                                 html=f"{{% extends '{layout.name}' %}}{{% block content %}}<p>{{{{ n }}}}</p>{{% endblock %}}")
            )
        spec = make_spec()
        spec.content = None
        spec.template = TemplateRef(
            name=t.name, version=t.version, data={"n": "x"}, format_locale="de",
            dependencies=[TemplatePin(name=layout.name, version=layout.version)],
        )
        return await _settle(await _start(client, spec, tq))

    return run


def template_store_outage(sessions, renderer: Renderer) -> Scenario:  # type: ignore[no-untyped-def]
    """The send cannot load the template (database away): the workflow waits and asks again."""

    async def run(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
        async with sessions() as s:
            t = await save_template_version(s, EmailTemplate(name=f"rec-{uuid.uuid4().hex[:6]}", subject="Hi {{ n }}", html="<p>{{ n }}</p>"))
        spec = make_spec()
        spec.content, spec.template = None, TemplateRef(name=t.name, version=t.version, data={"n": "x"})
        renderer.sessions = sessionmaker(create_engine(UNREACHABLE_DATABASE))
        try:
            h = await _start(client, spec, tq)
            await _asked(h, 2)
        finally:
            renderer.sessions = sessions
        return await _settle(h)

    return run


def deferred_by_quota(sessions) -> Scenario:  # type: ignore[no-untyped-def]
    """A user's second email over an hourly limit of 1: deferred until the (2 s) window opens, then sent."""

    async def run(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
        user_id = await make_sender(sessions, hourly_limit=1)
        await _settle(await _start(client, make_spec(sender_type=SenderType.USER, sender_id=user_id), tq))
        return await _settle(await _start(client, make_spec(sender_type=SenderType.USER, sender_id=user_id), tq))

    return run


def sender_changed_drivers(sessions, settings: Settings) -> Scenario:  # type: ignore[no-untyped-def]
    """Queued for the system SMTP's rated queue; the user has their own server by the time it is sent:
    the send step answers SendQueueChanged and the workflow sends from the user_smtp queue."""

    async def run(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
        # The user's server listens on localhost: allowed by that name, as in the test stacks.
        rated = settings.model_copy(update={"send_rates": {"smtp": 100.0, "user_smtp": 100.0}, "egress_allow": ["localhost"]})
        user_id = await make_sender(sessions, driver="user_smtp", smtp_host="localhost", smtp_port=sink.port, smtp_security="none")
        queue = f"{tq}-rated"
        async with build_worker(client, rated, task_queue=queue):
            spec = make_spec(sender_type=SenderType.USER, sender_id=user_id, send_queue="smtp")
            return await _settle(await _start(client, spec, queue))

    return run


def suppressed_at_send(sessions) -> Scenario:  # type: ignore[no-untyped-def]
    """The recipient is on the system's suppression list by the time of sending: nothing is sent,
    the email ends suppressed."""

    async def run(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
        spec = make_spec(to=[f"gone-{uuid.uuid4().hex[:6]}@example.com"])
        async with sessions() as s:
            await suppressions.add(s, sender_key(SenderType.SYSTEM, None), spec.to[0], SuppressionReason.HARD_BOUNCE, "recorded")
        return await _settle(await _start(client, spec, tq))

    return run


def sent_with_attachments(sessions) -> Scenario:  # type: ignore[no-untyped-def]
    """An email with a file and an inline image, stored as blobs: the input names them by id, size
    and hash (AttachmentRef), the send step reads them."""

    async def run(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
        files = [(b"%PDF-1.7\nrecorded\n", "report.pdf", "application/pdf", "attachment", None),
                 (b"GIF89a\x01\x00\x01\x00", "logo.gif", "image/gif", "inline", "logo")]
        refs = []
        async with sessions() as s:
            for data, name, ctype, disposition, cid in files:
                blob = Blob(id=str(uuid.uuid4()), owner_type="system", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                            content_type=ctype, filename=name)
                s.add(blob)
                await s.flush()
                await SqlBlobs().put(s, blob.id, data)
                refs.append(AttachmentRef(blob.id, name, ctype, blob.size, blob.sha256, disposition, cid))
            await s.commit()
        spec = make_spec()
        spec = replace(spec, content=replace(spec.content, html='<p>Hi <img src="cid:logo"></p>'), attachments=refs)
        return await _settle(await _start(client, spec, tq))

    return run


def paused(sessions, then_cancel: bool) -> Scenario:  # type: ignore[no-untyped-def]
    """Sending is paused (the kill switch) when the email reaches its send step: it waits `paused`;
    then sending resumes (the API's `resume` signal) and it is sent, or it is cancelled meanwhile."""

    async def set_paused(on: bool) -> None:
        async with sessions() as s:
            row = await s.get(FeatureFlag, "sending.paused")
            if row is None:
                s.add(FeatureFlag(key="sending.paused", enabled=on, updated_by="recorder"))
            else:
                row.enabled = on
            await s.commit()
        await asyncio.sleep(2 * FLAGS_REFRESH_SECONDS)  # the worker's cache has it

    async def run(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
        await set_paused(True)
        try:
            handle = await _start(client, make_spec(), tq)
            await _until(handle, EmailStatus.PAUSED)
            if then_cancel:
                await handle.execute_update(SendEmailWorkflow.cancel, CancelRequest(reason="not while paused"))
        finally:
            await set_paused(False)
        if not then_cancel:
            await handle.signal(SendEmailWorkflow.resume)
        return await _settle(handle)

    return run


async def server_unreachable_then_sent(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
    """The SMTP server refuses connections for a while: the workflow waits (no attempt used), then sends."""
    sink.down()
    try:
        h = await _start(client, make_spec(max_attempts=1), tq)
        await _asked(h, 2)
    finally:
        sink.up()
    return await _settle(h)


async def server_unreachable_gave_up(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
    """Unreachable for longer than the email's unreachable wait: failed, with the reason."""
    spec = make_spec()
    spec.retry.unreachable_wait_seconds = 2
    sink.down()
    try:
        return await _settle(await _start(client, spec, tq))
    finally:
        sink.up()


async def purge(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
    """One retention run (PurgeEmailsWorkflow, started by the daily purge Schedule)."""
    return await _settle(
        await client.start_workflow(PurgeEmailsWorkflow.run, PurgeRequest(), id=f"purge-{uuid.uuid4()}", task_queue=tq)
    )


async def reconcile(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
    """One run of the reconciler (ReconcileEmailsWorkflow, started by the reconcile Schedule)."""
    return await _settle(
        await client.start_workflow(ReconcileEmailsWorkflow.run, ReconcileRequest(), id=f"reconcile-{uuid.uuid4()}", task_queue=tq)
    )


# --- webhook workflows (workflows/webhooks.py) ------------------------------------------------


def webhook_scenarios(sessions, settings: Settings) -> dict[str, Scenario]:  # type: ignore[no-untyped-def]
    """One endpoint per shape (owner: the system, so it gets every event), delivering to a local
    receiver, on a worker of its own with webhook timings short enough to record in seconds."""
    hooked = settings.model_copy(update={
        "webhook_allow_private": True, "secret_key": SecretStr(TEST_SECRET_KEY), "webhook_retry_initial_seconds": 0.2,
        "webhook_retry_maximum_seconds": 0.5, "webhook_wait_seconds": 0.5, "webhook_loops_per_run": 3,
    })

    async def endpoint(receiver: WebhookReceiver, **policy: float) -> tuple[str, EndpointRun]:
        secret = webhooks.new_secret()
        receiver.secret = secret
        async with sessions() as s:
            row = WebhookEndpoint(
                id=new_id(), owner=sender_key(SenderType.SYSTEM, None), url=receiver.url,
                secret_enc=SecretBox.from_settings(hooked).encrypt(secret), cursor=str(await feed_end(s)),
            )
            s.add(row)
            await s.commit()
        return row.id, EndpointRun(row.id, replace(DeliveryPolicy.of(hooked), **policy))

    async def run_endpoint(client: Client, tq: str, receiver: WebhookReceiver, **policy: float) -> tuple[str, WorkflowHandle]:
        endpoint_id, req = await endpoint(receiver, **policy)
        handle = await client.start_workflow(
            WebhookEndpointWorkflow.run, req, id=webhooks.endpoint_workflow_id(endpoint_id), task_queue=webhooks.webhook_queue(tq),
        )
        return endpoint_id, handle

    async def delivered_then_continued(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
        """Three steps (the events of one email delivered among them), then continue-as-new: its first run."""
        queue = f"{tq}-wh"
        with WebhookReceiver() as receiver:
            async with build_worker(client, hooked, task_queue=queue):
                endpoint_id, req = await endpoint(receiver)
                await _settle(await _start(client, make_spec(), queue))  # its events wait for the first step
                handle = await client.start_workflow(
                    WebhookEndpointWorkflow.run, req, id=webhooks.endpoint_workflow_id(endpoint_id),
                    task_queue=webhooks.webhook_queue(queue),
                )
                await eventually(lambda: len(receiver.verified()) >= 3, timeout=EMAIL_SETTLES, what="the events never arrived")
                first = handle.result_run_id

                async def continued() -> bool:
                    return (await handle.describe()).run_id != first

                await eventually(continued, timeout=EMAIL_SETTLES, what="the endpoint's run never continued as new")
                await client.get_workflow_handle(handle.id).terminate("recorded")
        return client.get_workflow_handle(handle.id, run_id=first)

    async def retried_then_deleted(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
        """A 500 and a refused connection before the 200; then the endpoint is deleted (its run cancelled)."""
        queue = f"{tq}-wh"
        with WebhookReceiver() as receiver:
            receiver.script.extend([500, 503])
            async with build_worker(client, hooked, task_queue=queue):
                endpoint_id, handle = await run_endpoint(client, queue, receiver, loops_per_run=1000)
                await _settle(await _start(client, make_spec(), queue))
                await eventually(lambda: len(receiver.verified()) >= 3, timeout=EMAIL_SETTLES, what="the events never arrived")
                async with sessions() as s:
                    row = await s.get(WebhookEndpoint, endpoint_id)
                    await s.delete(row)
                    await s.commit()
                await handle.cancel()
                return await _settle(handle)

    async def disabled(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
        """The receiver answers 503 for longer than the disable window: the endpoint is disabled, the run ends."""
        queue = f"{tq}-wh"
        with WebhookReceiver() as receiver:
            receiver.script.extend([503] * 1000)
            async with build_worker(client, hooked, task_queue=queue):
                _, handle = await run_endpoint(client, queue, receiver, disable_after_seconds=2.0, loops_per_run=1000)
                await _settle(await _start(client, make_spec(), queue))
                return await _settle(handle)

    async def redelivered(client: Client, tq: str, sink: SmtpSink) -> WorkflowHandle:
        """One delivery sent again (WebhookRedeliveryWorkflow), after a 500."""
        queue = f"{tq}-wh"
        with WebhookReceiver() as receiver:
            async with build_worker(client, hooked, task_queue=queue):
                endpoint_id, handle = await run_endpoint(client, queue, receiver, loops_per_run=1000)
                await _settle(await _start(client, make_spec(), queue))
                await eventually(lambda: len(receiver.verified()) >= 3, timeout=EMAIL_SETTLES, what="the events never arrived")
                async with sessions() as s:
                    delivery = (await s.exec(select(WebhookDelivery).where(col(WebhookDelivery.endpoint_id) == endpoint_id))).first()
                assert delivery is not None
                receiver.script.append(500)
                again = await _settle(await client.start_workflow(
                    WebhookRedeliveryWorkflow.run, RedeliverRequest(endpoint_id, delivery.id, DeliveryPolicy.of(hooked)),
                    id=f"webhook-redeliver-{uuid.uuid4()}", task_queue=webhooks.webhook_queue(queue),
                ))
                await handle.terminate("recorded")
                return again

    return {
        "webhook_delivered_then_continued": delivered_then_continued,
        "webhook_retried_then_deleted": retried_then_deleted,
        "webhook_disabled": disabled,
        "webhook_redelivered": redelivered,
    }


async def record(out: Path, prefix: str, only: set[str] | None = None) -> None:
    tmp = Path(tempfile.mkdtemp())
    url = f"sqlite:///{tmp / 'db.sqlite'}"
    migrate(url)
    sessions = sessionmaker(create_engine(url))
    renderer = Renderer(sessions, TemplateEngine())
    sink = SmtpSink()
    # Payloads encrypted as in production, with the test key that tests/test_replay.py replays them with.
    settings = Settings(
        database_url=url, smtp_port=sink.port, quota_hour_seconds=2, payload_keys=TEST_PAYLOAD_KEY,
        flags_refresh_seconds=FLAGS_REFRESH_SECONDS, _env_file=None,  # type: ignore[call-arg]
    )
    scenarios: dict[str, Scenario] = {
        "sent": sent,
        "scheduled_then_sent": scheduled_then_sent,
        "cancelled_while_scheduled": cancelled_while_scheduled,
        "cancelled_from_temporal": cancelled_from_temporal,
        "rescheduled_then_sent": rescheduled_then_sent,
        "transient_then_sent": transient_then_sent,
        "permanent_failure": permanent_failure,
        "retried_after_failure": retried_after_failure,
        "cancel_rejected_while_sending": cancel_rejected_while_sending,
        "templated": templated(sessions),
        "templated_with_layout": templated_with_layout(sessions),
        "template_store_outage": template_store_outage(sessions, renderer),
        "deferred_by_quota": deferred_by_quota(sessions),
        "server_unreachable_then_sent": server_unreachable_then_sent,
        "server_unreachable_gave_up": server_unreachable_gave_up,
        "sender_changed_drivers": sender_changed_drivers(sessions, settings),
        "suppressed_at_send": suppressed_at_send(sessions),
        "sent_with_attachments": sent_with_attachments(sessions),
        "paused_then_sent": paused(sessions, then_cancel=False),
        "paused_then_cancelled": paused(sessions, then_cancel=True),
        "reconcile": reconcile,  # record with --prefix rN: a shape of ReconcileEmailsWorkflow
        "purge": purge,  # record with --prefix pN: a shape of PurgeEmailsWorkflow
        # Record with --prefix whN: shapes of the webhook workflows (workflows/webhooks.py).
        **webhook_scenarios(sessions, settings),
    }
    if only:
        unknown = only - set(scenarios)
        if unknown:
            raise SystemExit(f"unknown scenario(s) {sorted(unknown)}; known: {sorted(scenarios)}")
        scenarios = {name: run for name, run in scenarios.items() if name in only}
    with TemporalDevServer(free_port()) as server, sink:
        client = await connect(settings.model_copy(update={"temporal_address": server.address}))
        tq = f"record-{uuid.uuid4()}"
        async with build_worker(client, settings, task_queue=tq, renderer=renderer):
            for name, scenario in scenarios.items():
                handle = await scenario(client, tq, sink)
                # The run the scenario names (a workflow that continued as new: its first run), else the latest.
                history = await client.get_workflow_handle(handle.id, run_id=handle.run_id).fetch_history()
                path = out / f"{prefix}_{name}.json"
                path.write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")
                print(f"recorded {path} ({len(history.events)} events)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "histories")
    parser.add_argument("--prefix", default="v1", help="the released shape these histories belong to")
    parser.add_argument("--only", action="append", default=None, metavar="SCENARIO", help="record just this shape (repeatable)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(record(args.out, args.prefix, set(args.only) if args.only else None))


if __name__ == "__main__":
    main()
