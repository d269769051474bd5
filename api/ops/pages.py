"""What the ops pages show beyond the services' answers: the Jinja2 environment, the sends-per-minute
chart (server-rendered SVG, no script; its counts from api/services/stats.py), the overview's figures,
and links into the Temporal UI."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader
from starlette.requests import Request

from api.schemas.stats import StatsOut
from mailqueue.config import Settings
from mailqueue.contracts import WENT_OUT, EmailStatus
from mailqueue.flags import SENDING_PAUSED

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
STATIC_PATH = "/ops/static"

# Autoescape everywhere: every value a page shows (subjects, addresses, errors) is someone's input.
ENV = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)

# The ops pages' own policy: only this site's styles, no scripts at all, frames only from here (the
# mail view, which has a stricter policy of its own), and nobody frames them.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; frame-src 'self'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

# The mail as sent, shown in a sandboxed iframe: an opaque origin (CSP sandbox, and the iframe's own
# sandbox attribute), no scripts, nothing remote (a remote image would tell its server who looked).
MAIL_HEADERS = {
    "Content-Security-Policy": (
        "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:; frame-ancestors 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

STATUS_ORDER = [s.value for s in EmailStatus]


def render(template: str, request: Request, /, **values: Any) -> str:
    return ENV.get_template(template).render(request=request, static=STATIC_PATH, **values)


def temporal_ui_link(settings: Settings, workflow_id: str) -> str:
    """The email's workflow in the Temporal UI (its most recent run)."""
    base = settings.temporal_ui_url.rstrip("/")
    return f"{base}/namespaces/{quote(settings.temporal_namespace, safe='')}/workflows/{quote(workflow_id, safe='')}"


# --- the overview ---------------------------------------------------------------------------


@dataclass
class Chart:
    """Sends per minute over the last hour, oldest minute first, as SVG geometry."""

    counts: list[int]
    width: int
    height: int
    bars: list[dict[str, Any]]
    peak: int
    total: int




def chart(counts: list[int], width: int = 600, height: int = 120) -> Chart:
    peak = max(counts, default=0)
    step = width / max(len(counts), 1)
    bars = []
    for i, n in enumerate(counts):
        h = 0.0 if peak == 0 else (height - 4) * n / peak
        bars.append({"x": round(i * step + 1, 1), "y": round(height - h, 1), "w": round(max(step - 2, 1), 1), "h": round(h, 1),
                     "n": n, "minutes_ago": len(counts) - 1 - i})
    return Chart(counts=counts, width=width, height=height, bars=bars, peak=peak, total=sum(counts))


def failure_ratio(stats: StatsOut) -> float | None:
    """Failed among the emails that ended one way or the other (failed, or went out); None before any did."""
    failed = stats.by_status.get(EmailStatus.FAILED.value, 0)
    went_out = sum(stats.by_status.get(s.value, 0) for s in WENT_OUT)
    return None if failed + went_out == 0 else failed / (failed + went_out)


def kill_switch(request: Request) -> str:
    """"paused", "sending", or "unknown" when this API runs without flags."""
    flags = getattr(request.app.state, "flags", None)
    if flags is None:
        return "unknown"
    return "paused" if flags.is_on(SENDING_PAUSED) else "sending"


def by_status_rows(stats: StatsOut) -> list[tuple[str, int]]:
    return [(s, stats.by_status.get(s, 0)) for s in STATUS_ORDER if s in stats.by_status]


# --- formatting ------------------------------------------------------------------------------


def when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def seconds(value: float | None) -> str:
    if value is None:
        return "none"
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


ENV.filters["when"] = when
ENV.filters["seconds"] = seconds
