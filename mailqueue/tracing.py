"""OpenTelemetry tracing: one trace per email, from the API's HTTP request through the workflow and
its activities to the driver's SMTP conversation or provider request.

Configured by the standard OTEL_* variables. On only when an OTLP endpoint is set
(OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) and neither
OTEL_SDK_DISABLED=true nor OTEL_TRACES_EXPORTER=none says otherwise; spans then go out over
OTLP/HTTP. Off, nothing is installed: no provider, no interceptor, no instrumentation, and our
own spans (`span`) are skipped.

Spans carry ids (email, workflow, attempt), never addresses, subjects or bodies. What the
libraries add is scrubbed on the way out (`ScrubbingExporter`): query strings (the emails list
filters by `recipient=`), exception messages and stack traces, and error descriptions (a mail
server's refusal can quote an address).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.environment_variables import OTEL_TRACES_EXPORTER
from opentelemetry.sdk.environment_variables import OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_SDK_DISABLED
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode

if TYPE_CHECKING:
    import httpx
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from temporalio.contrib.opentelemetry import TracingInterceptor

# Our own spans' tracer: a proxy that finds the provider once configure_tracing installs it.
tracer = trace.get_tracer("mailqueue")

# Probes and scrapes: a trace each would bury the emails' traces.
EXCLUDED_URLS = "/healthz$,/readyz$,/metrics$"

_provider: TracerProvider | None = None


def enabled() -> bool:
    """Whether the OTEL_* variables ask for traces (an OTLP endpoint, and the SDK not disabled)."""
    env = os.environ
    if env.get(OTEL_SDK_DISABLED, "").strip().lower() == "true" or env.get(OTEL_TRACES_EXPORTER, "").strip().lower() == "none":
        return False
    return bool(env.get(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) or env.get(OTEL_EXPORTER_OTLP_ENDPOINT))


def configure_tracing(service_name: str) -> bool:
    """Install this process's tracer provider, exporting in batches over OTLP/HTTP, if `enabled()`.
    `service_name` unless OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) names it.
    Once per process (OpenTelemetry's provider is global); True when tracing is on."""
    global _provider
    if _provider is not None:
        return True
    if not enabled():
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: service_name}).merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER; shut down (flushed) at exit
    provider.add_span_processor(BatchSpanProcessor(ScrubbingExporter(OTLPSpanExporter())))  # OTEL_BSP_* and OTEL_EXPORTER_OTLP_*
    trace.set_tracer_provider(provider)
    _provider = provider
    return True


def flush(timeout_seconds: float = 5.0) -> None:
    """Export the spans still waiting (at shutdown: the last email's spans are the ones wanted)."""
    if _provider is not None:
        _provider.force_flush(int(timeout_seconds * 1000))


def interceptors() -> list[TracingInterceptor]:
    """For the Temporal client (and so its workers): spans for starting workflows, running them and
    their activities, carried between processes in Temporal headers. None while tracing is off."""
    if _provider is None:
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor()]


def instrument_app(app: FastAPI) -> None:
    """A server span per HTTP request (not the probes), continuing an incoming `traceparent`. Runs
    before the lifespan configures the provider: the instrumentation's tracer waits for it."""
    if not enabled():
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.metrics import NoOpMeterProvider

    FastAPIInstrumentor.instrument_app(
        app,
        excluded_urls=os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", EXCLUDED_URLS),
        exclude_spans=["receive", "send"],  # a span per ASGI message costs more than it tells
        meter_provider=NoOpMeterProvider(),  # tracing only: the API's metrics are /metrics' own
    )


def instrument_http_client(client: httpx.AsyncClient) -> None:
    """A client span per provider request, with its status code, while tracing is on."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.metrics import NoOpMeterProvider

    HTTPXClientInstrumentor.instrument_client(client, meter_provider=NoOpMeterProvider())


@contextmanager
def span(name: str, attributes: Mapping[str, Any], *, kind: SpanKind = SpanKind.INTERNAL) -> Iterator[trace.Span]:
    """One of our own spans, current while the block runs. A failure sets its status to the
    error's type only: messages can quote a server's reply, and with it an address."""
    if _provider is None:  # off: not even a no-op span's context switch
        yield trace.INVALID_SPAN
        return
    with tracer.start_as_current_span(
        name, kind=kind, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as current:
        try:
            yield current
        except BaseException as exc:
            current.set_status(StatusCode.ERROR, type(exc).__name__)
            raise


# --- what leaves the process -------------------------------------------------------------------

_URL_ATTRIBUTES = ("http.url", "url.full", "http.target")
_DROPPED_ATTRIBUTES = ("url.query",)
_EXCEPTION_KEPT = ("exception.type", "exception.escaped")
_TYPE_NAME = re.compile(r"[A-Za-z_][\w.]*")


def _scrubbed_attributes(attributes: Mapping[str, Any]) -> dict[str, Any] | None:
    """The attributes without query strings, or None when there was nothing to scrub."""
    if not any(key in attributes for key in _DROPPED_ATTRIBUTES) and not any(
        "?" in str(attributes.get(key, "")) for key in _URL_ATTRIBUTES
    ):
        return None
    out = {k: v for k, v in attributes.items() if k not in _DROPPED_ATTRIBUTES}
    for key in _URL_ATTRIBUTES:
        if isinstance(out.get(key), str):
            out[key] = out[key].split("?", 1)[0]
    return out


def _scrubbed_events(events: Sequence[Event]) -> list[Event] | None:
    """Exception events reduced to the exception's type, or None when there was none."""
    if not any(e.name == "exception" for e in events):
        return None
    return [
        Event(e.name, {k: v for k, v in (e.attributes or {}).items() if k in _EXCEPTION_KEPT}, e.timestamp)
        if e.name == "exception" else e
        for e in events
    ]


def _scrubbed_status(status: Status) -> Status | None:
    """An error's description cut to its leading type name ("ApplicationError: <reason>"), or None
    when it is nothing more already."""
    if not status.description or _TYPE_NAME.fullmatch(status.description):
        return None
    head = status.description.split(":", 1)[0].strip()
    return Status(status.status_code, head if _TYPE_NAME.fullmatch(head) else None)


def scrub(span: ReadableSpan) -> ReadableSpan:
    """The span as it may leave the process; the same object when it carries nothing to scrub."""
    attributes = _scrubbed_attributes(span.attributes or {})
    events = _scrubbed_events(span.events)
    status = _scrubbed_status(span.status)
    if attributes is None and events is None and status is None:
        return span
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=span.attributes if attributes is None else attributes,
        events=span.events if events is None else events,
        links=span.links,
        kind=span.kind,
        status=span.status if status is None else status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class ScrubbingExporter(SpanExporter):
    """Exports through `inner` what `scrub` leaves of each span: the one place every span passes,
    whichever library made it (FastAPI's, httpx's and Temporal's instrumentation as well as ours)."""

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._inner.export([scrub(s) for s in spans])

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)
