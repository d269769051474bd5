"""A local SMTP catcher for development: keeps every message and shows them on a small page.

    python -m devstack.catcher --smtp-port 1025 --http-port 8025 --dir .mailqueue/mail

The page: / lists the mail (newest first), /messages/N shows one (headers, the HTML part in a
sandboxed iframe, the text part, attachments), /messages/N/raw its source, /messages/N/parts/K
downloads a part, /api/messages is the list as JSON.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import mimetypes
import re
import signal
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage, MIMEPart
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from aiosmtpd.controller import Controller


@dataclass
class CaughtMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    received_at: float = field(default_factory=time.time)

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.data, policy=policy.default)  # type: ignore[return-value]

    def summary(self, index: int) -> dict[str, Any]:
        msg = self.message
        return {
            "index": index,
            "received_at": self.received_at,
            "from": msg["From"],
            "to": msg["To"],
            "subject": msg["Subject"],
            "message_id": msg["Message-ID"],
            "envelope_to": self.rcpt_tos,
        }

    def view(self) -> MessageView:
        return MessageView.of(self.message)


# --- one message as people read it ----------------------------------------------------------------

# Headers shown first, in this order; the others follow as the message has them.
MAIN_HEADERS = ("From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID")
_CID = re.compile(r"\bcid:([^\s\"'()<>]+)", re.IGNORECASE)


@dataclass
class Part:
    """A leaf MIME part other than the text and HTML bodies: an attachment, or an inline image (`content_id`)."""

    index: int  # its place among the message's leaf parts: /messages/N/parts/<index>
    filename: str  # safe to offer as a download name
    content_type: str
    data: bytes
    content_id: str | None
    inline: bool


@dataclass
class MessageView:
    """A message decoded: headers (encoded words decoded), the text and HTML bodies, the other parts."""

    headers: list[tuple[str, str]]
    text: str | None
    html: str | None
    parts: list[Part]

    @classmethod
    def of(cls, msg: EmailMessage) -> MessageView:
        leaves = [p for p in msg.walk() if not p.is_multipart()]
        text_body = msg.get_body(preferencelist=("plain",))
        html_body = msg.get_body(preferencelist=("html",))
        html_text = _text(html_body)
        referenced = {unquote(cid) for cid in _CID.findall(html_text or "")}
        parts = []
        for index, part in enumerate(leaves):
            if part is text_body or part is html_body:
                continue
            cid = (part["Content-ID"] or "").strip().strip("<>") or None
            # Inline: shown by the HTML part (cid:), whatever its Content-Disposition says.
            parts.append(Part(index, safe_filename(part, index), part.get_content_type(), _payload(part), cid, cid in referenced))
        headers = sorted(_headers(msg), key=lambda h: _header_rank(h[0]))
        return cls(headers, _text(text_body), html_text, parts)

    @property
    def attachments(self) -> list[Part]:
        return [p for p in self.parts if not p.inline]

    def header(self, name: str) -> str:
        return ", ".join(v for n, v in self.headers if n.lower() == name.lower())

    def html_for_frame(self) -> str | None:
        """The HTML body with its cid: references (inline images) turned into data: URIs: the
        page's iframe loads nothing, not even from the catcher."""
        if self.html is None:
            return None
        images = {p.content_id: p for p in self.parts if p.content_id and p.content_type.startswith("image/")}

        def inline(match: re.Match[str]) -> str:
            part = images.get(unquote(match.group(1)))
            if part is None:
                return match.group(0)
            return f"data:{part.content_type};base64,{base64.b64encode(part.data).decode()}"

        return _CID.sub(inline, self.html)


def _header_rank(name: str) -> int:
    low = [h.lower() for h in MAIN_HEADERS]
    return low.index(name.lower()) if name.lower() in low else len(low)


def _headers(msg: EmailMessage) -> list[tuple[str, str]]:
    out = []
    for name, value in msg.raw_items():
        try:
            shown = str(policy.default.header_fetch_parse(name, value))
        except Exception:  # noqa: BLE001 - a malformed header is shown as it came
            shown = str(value)
        out.append((name, " ".join(shown.split())))
    return out


def _payload(part: MIMEPart) -> bytes:
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _text(part: MIMEPart | None) -> str | None:
    """A text part's content, transfer encoding (quoted-printable, base64) and charset decoded."""
    if part is None:
        return None
    try:
        content = part.get_content()
    except (LookupError, UnicodeError):  # an unknown or wrong charset: the bytes as UTF-8, replaced where broken
        content = None
    if not isinstance(content, str):
        content = _payload(part).decode("utf-8", "replace")
    return content.replace("\r\n", "\n")  # as written, not as SMTP carried it


def safe_filename(part: MIMEPart, index: int) -> str:
    """The part's file name without folders, control or quote characters; part-<index>.<ext> when it has none."""
    name = part.get_filename() or ""
    name = re.split(r"[/\\]", name)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C" and ch not in "\"'`;")
    name = name.strip(" .")[:120]
    if not name:
        name = f"part-{index}{mimetypes.guess_extension(part.get_content_type()) or '.bin'}"
    return name


class CatchingHandler:
    """aiosmtpd handler keeping messages in memory and, optionally, as .eml files."""

    def __init__(self, directory: Path | None = None) -> None:
        self.messages: list[CaughtMessage] = []
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        caught = CaughtMessage(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content or envelope.content))
        with self._lock:
            self.messages.append(caught)
            count = len(self.messages)
        if self.directory is not None:
            (self.directory / f"{time.time_ns()}-{count:06d}.eml").write_bytes(caught.data)
        return f"250 2.0.0 Ok: queued as C{count:06d}"


def load_directory(directory: Path) -> list[CaughtMessage]:
    out = []
    for path in sorted(directory.glob("*.eml")):
        msg = message_from_bytes(path.read_bytes(), policy=policy.default)
        out.append(CaughtMessage(str(msg["From"]), [str(msg["To"])], path.read_bytes(), path.stat().st_mtime))
    return out


# --- the page ---------------------------------------------------------------------------------------

# The page loads nothing but itself: no scripts, no remote images, fonts or styles, not from a
# message either (the iframe's srcdoc document inherits this policy, and its sandbox forbids scripts).
PAGE_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
STYLE = (
    "body{font-family:sans-serif;margin:1em 2em}td,th{padding:4px 10px;text-align:left;vertical-align:top}"
    "th{white-space:nowrap}pre{white-space:pre-wrap;background:#f6f6f6;padding:1em}"
    "iframe{width:100%;height:640px;border:1px solid #ccc}"
)
_e = html.escape


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _document(title: str, body: str, refresh: bool = False) -> str:
    meta = "<meta http-equiv=refresh content=5>" if refresh else ""
    return f"<!doctype html><meta charset=utf-8>{meta}<title>{_e(title)}</title><style>{STYLE}</style>{body}"


def index_page(msgs: list[CaughtMessage]) -> str:
    rows = []
    for i in reversed(range(len(msgs))):
        view = msgs[i].view()
        rows.append(
            f"<tr><td><a href='/messages/{i}'>{i}</a></td><td>{_when(msgs[i].received_at)}</td>"
            f"<td>{_e(view.header('From'))}</td><td>{_e(view.header('To'))}</td>"
            f"<td><a href='/messages/{i}'>{_e(view.header('Subject') or '(no subject)')}</a></td>"
            f"<td>{len(view.attachments) or ''}</td></tr>"
        )
    return _document(
        "mailqueue: caught mail",
        f"<h1>Caught mail ({len(msgs)})</h1><table><tr><th>#</th><th>Received</th><th>From</th><th>To</th>"
        f"<th>Subject</th><th>Attachments</th></tr>{''.join(rows)}</table>",
        refresh=True,
    )


def message_page(index: int, caught: CaughtMessage) -> str:
    view = caught.view()
    headers = "".join(f"<tr><th>{_e(name)}</th><td>{_e(value)}</td></tr>" for name, value in view.headers)
    body = [
        f"<p><a href='/'>all mail</a> · <a href='/messages/{index}/raw'>raw source</a></p>",
        f"<h1>{_e(view.header('Subject') or '(no subject)')}</h1>",
        f"<table><tr><th>Received</th><td>{_when(caught.received_at)}</td></tr>"
        f"<tr><th>Envelope to</th><td>{_e(', '.join(caught.rcpt_tos))}</td></tr>{headers}</table>",
    ]
    framed = view.html_for_frame()
    if framed is not None:
        # sandbox with no allow-* token: no scripts, no forms, no popups, an opaque origin.
        body.append(f"<h2>HTML</h2><iframe sandbox title='the HTML part' srcdoc=\"{_e(framed, quote=True)}\"></iframe>")
    if view.text is not None:
        body.append(f"<h2>Text</h2><pre>{_e(view.text)}</pre>")
    if view.parts:
        items = "".join(
            f"<li><a href='/messages/{index}/parts/{p.index}' download>{_e(p.filename)}</a> "
            f"({_e(p.content_type)}, {len(p.data)} bytes{', inline' if p.inline else ''})</li>"
            for p in view.parts
        )
        body.append(f"<h2>Attachments</h2><ul>{items}</ul>")
    return _document(f"mail {index}: {view.header('Subject')}", "".join(body))


def _attachment_disposition(filename: str) -> str:
    ascii_name = filename.encode("ascii", "replace").decode().replace("?", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _page(handler: CatchingHandler) -> type[BaseHTTPRequestHandler]:
    class Page(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, code: int, body: str | bytes, ctype: str = "text/html; charset=utf-8", **headers: str) -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Security-Policy", PAGE_CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            msgs = list(handler.messages)
            if self.path == "/api/messages":
                self._send(200, json.dumps([m.summary(i) for i, m in enumerate(msgs)]), "application/json")
                return
            path = urlsplit(self.path).path
            if path == "/":
                self._send(200, index_page(msgs))
                return
            route = re.fullmatch(r"/messages/(\d+)(/raw|/parts/(\d+))?", path)
            if route is None or int(route[1]) >= len(msgs):
                self._send(404, "not found", "text/plain; charset=utf-8")
                return
            index, caught = int(route[1]), msgs[int(route[1])]
            if route[2] is None:
                self._send(200, message_page(index, caught))
            elif route[2] == "/raw":
                self._send(200, caught.data, "text/plain; charset=utf-8")
            else:
                part = next((p for p in caught.view().parts if p.index == int(route[3])), None)
                if part is None:
                    self._send(404, "no such part", "text/plain; charset=utf-8")
                    return
                self._send(200, part.data, "application/octet-stream", Content_Disposition=_attachment_disposition(part.filename))

    return Page


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--smtp-port", type=int, default=1025)
    parser.add_argument("--http-port", type=int, default=8025)
    parser.add_argument("--dir", type=Path, default=None, help="also keep each message as an .eml file here")
    args = parser.parse_args(argv)

    handler = CatchingHandler(args.dir)
    if args.dir is not None:
        handler.messages.extend(load_directory(args.dir))
    controller = Controller(handler, hostname=args.host, port=args.smtp_port, data_size_limit=50 * 2**20)
    controller.start()
    web = ThreadingHTTPServer((args.host, args.http_port), _page(handler))
    threading.Thread(target=web.serve_forever, daemon=True).start()
    print(f"catcher: SMTP on {args.host}:{args.smtp_port}, page on http://{args.host}:{args.http_port}", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    web.shutdown()
    controller.stop()


if __name__ == "__main__":
    main()
