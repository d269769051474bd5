"""Structured JSON logs on stderr, one object per line."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from opentelemetry import trace

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


# The lowest level each logger that can write SQL parameters may log at.
SQL_LOGGER_CAPS = {"aiosqlite": logging.INFO, "sqlalchemy.engine": logging.WARNING}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        # The trace this line belongs to, beside email_id/workflow_id: a log search finds the trace.
        # With tracing off no span is ever current, and this is one context lookup.
        current = trace.get_current_span().get_span_context()
        if current.is_valid:
            out["trace_id"], out["span_id"] = trace.format_trace_id(current.trace_id), trace.format_span_id(current.span_id)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # At DEBUG these libraries log request details (botocore: the AWS access key id; httpx/httpcore:
    # URLs and headers): never below WARNING, whatever the level, so that no credential reaches a log.
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # SQL parameters hold bodies, addresses and encrypted secrets: aiosqlite logs every statement
    # with its parameters at DEBUG, SQLAlchemy's engine at INFO (and its `echo`). Capped so that no
    # level set here lets them through (each at the root's level if that is higher).
    for logger, cap in SQL_LOGGER_CAPS.items():
        logging.getLogger(logger).setLevel(max(root.level, cap))
