"""A real OTLP/HTTP trace receiver on a free local port, as an OpenTelemetry Collector would take
traces: POST /v1/traces with a protobuf ExportTraceServiceRequest, gzip or not. It keeps what it
received (or only counts it) for the tests and the benchmark (bench/bench.py).

    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        ...
        receiver.spans, receiver.count
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

# opentelemetry.proto.trace.v1.Span.SpanKind
INTERNAL, SERVER, CLIENT = 1, 2, 3
# opentelemetry.proto.trace.v1.Status.StatusCode
STATUS_ERROR = 2


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived: ids in hex (the parent's empty for a root), its service's name."""

    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    status_code: int = 0
    status_message: str = ""

    def texts(self) -> Iterator[str]:
        """Every text the span carries (name, attribute values, events, status), to look for leaks in."""
        def flat(value: Any) -> Iterator[str]:
            if isinstance(value, dict):
                for v in value.values():
                    yield from flat(v)
            elif isinstance(value, list):
                for v in value:
                    yield from flat(v)
            else:
                yield str(value)

        yield self.name
        yield from flat(self.attributes)
        for name, attributes in self.events:
            yield name
            yield from flat(attributes)
        yield self.status_message


class OtlpReceiver:
    """Threaded HTTP server; `start()`/`stop()` or a `with` block. `keep=False`: count spans only
    (a benchmark's thousands of spans need not be held)."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.spans: list[ReceivedSpan] = []
        self.count = 0  # spans received
        self.requests = 0  # export requests accepted
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != "/v1/traces":
                    return self._answer(404, b"only /v1/traces here", "text/plain")
                if not (self.headers.get("Content-Type") or "").startswith("application/x-protobuf"):
                    return self._answer(415, b"OTLP/HTTP protobuf only", "text/plain")
                try:
                    encoding = (self.headers.get("Content-Encoding") or "").lower()
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    request = ExportTraceServiceRequest.FromString(body)
                except (OSError, EOFError, zlib.error, DecodeError) as exc:
                    return self._answer(400, f"unreadable: {type(exc).__name__}".encode(), "text/plain")
                receiver._take(request)
                self._answer(200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

            def _answer(self, status: int, data: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free one, no race for it
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"  # OTEL_EXPORTER_OTLP_ENDPOINT: the exporter adds /v1/traces
        # A short poll: shutdown() waits for the loop to look, 0.5 s by default.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def _take(self, request: ExportTraceServiceRequest) -> None:
        received: list[ReceivedSpan] = []
        count = 0
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                count += len(scope_spans.spans)
                if not self.keep:
                    continue
                received.extend(
                    ReceivedSpan(
                        service=service,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                        name=s.name,
                        kind=s.kind,
                        attributes=_attributes(s.attributes),
                        events=[(e.name, _attributes(e.attributes)) for e in s.events],
                        status_code=s.status.code,
                        status_message=s.status.message,
                    )
                    for s in scope_spans.spans
                )
        with self._lock:
            self.spans.extend(received)
            self.count += count
            self.requests += 1

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> list[ReceivedSpan]:
        """The spans so far (a copy: the server's threads keep adding)."""
        with self._lock:
            return list(self.spans)
