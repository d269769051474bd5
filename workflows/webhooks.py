"""Webhook workflows: one long-lived run per endpoint that delivers its events in order, and a short
one per redelivery. Both on the webhook task queue (mailqueue.webhooks.webhook_queue)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

with workflow.unsafe.imports_passed_through():
    from activities.webhooks import WebhookActivities
    from mailqueue.webhooks import (
        DELIVERY_FAILED,
        ENDPOINT_WORKFLOW,
        REDELIVERY_WORKFLOW,
        SECRET_UNREADABLE,
        DeliverRequest,
        DeliveryPolicy,
        DisableRequest,
        EndpointOutcome,
        EndpointRun,
        RedeliverRequest,
        RedeliverResult,
    )


def _retries(policy: DeliveryPolicy) -> RetryPolicy:
    """A failed POST is tried again, from retry_initial_seconds doubling up to retry_maximum_seconds,
    for as long as the step's schedule-to-close timeout (the disable window) allows."""
    return RetryPolicy(
        initial_interval=timedelta(seconds=policy.retry_initial_seconds),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=policy.retry_maximum_seconds),
        maximum_attempts=0,
        non_retryable_error_types=[SECRET_UNREADABLE],
    )


def _step_timeout(policy: DeliveryPolicy) -> timedelta:
    """One attempt: the wait for events, then a batch of POSTs, each within its call timeout."""
    return timedelta(seconds=policy.wait_seconds + policy.batch * (policy.call_timeout_seconds + 2) + 30)


def _why(exc: ActivityError, policy: DeliveryPolicy) -> str:
    """Why the endpoint is disabled: the last attempt's own words ("answered 503"), found under
    Temporal's "giving up" wrapper."""
    words, cause = [], exc.cause
    while cause is not None:
        if isinstance(cause, ApplicationError) and cause.type == SECRET_UNREADABLE:
            return f"its signing secret cannot be read: {cause.message}"[:600]
        if isinstance(cause, ApplicationError) and cause.type == DELIVERY_FAILED:
            return f"failed for {policy.disable_after_seconds:g} s without a delivery; last: {cause.message[:300]}"
        words.append(getattr(cause, "message", None) or str(cause))
        cause = cause.cause
    last = "; ".join(w for w in words if w)[:300]
    return f"failed for {policy.disable_after_seconds:g} s without a delivery; last: {last}"


@workflow.defn(name=ENDPOINT_WORKFLOW)
class WebhookEndpointWorkflow:
    @workflow.run
    async def run(self, req: EndpointRun) -> EndpointOutcome:
        policy = req.policy
        for _ in range(policy.loops_per_run):
            try:
                got = await workflow.execute_activity_method(
                    WebhookActivities.deliver,
                    DeliverRequest(req.endpoint_id, policy.wait_seconds, policy.batch, policy.call_timeout_seconds),
                    start_to_close_timeout=_step_timeout(policy),
                    heartbeat_timeout=timedelta(seconds=policy.call_timeout_seconds + 30),
                    # The disable window: failing for this long (no delivery in between) ends the retries.
                    schedule_to_close_timeout=timedelta(seconds=policy.disable_after_seconds + policy.wait_seconds),
                    retry_policy=_retries(policy),
                )
            except ActivityError as exc:
                if isinstance(exc.cause, CancelledError):
                    raise  # deleted: DELETE /v1/webhooks/{id} cancels the run
                await workflow.execute_activity_method(
                    WebhookActivities.disable, DisableRequest(req.endpoint_id, _why(exc, policy)),
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=60)),
                )
                return EndpointOutcome(disabled=True)
            if got.gone:
                return EndpointOutcome(gone=True)
        # A short history: the next run starts from the cursor stored in the database.
        workflow.continue_as_new(req)


@workflow.defn(name=REDELIVERY_WORKFLOW)
class WebhookRedeliveryWorkflow:
    @workflow.run
    async def run(self, req: RedeliverRequest) -> RedeliverResult:
        policy = req.policy
        try:
            return await workflow.execute_activity_method(
                WebhookActivities.redeliver,
                req,
                start_to_close_timeout=timedelta(seconds=policy.call_timeout_seconds + 30),
                schedule_to_close_timeout=timedelta(seconds=policy.disable_after_seconds),
                retry_policy=_retries(policy),
            )
        except ActivityError as exc:
            if isinstance(exc.cause, CancelledError):
                raise
            return RedeliverResult(delivered=False)
