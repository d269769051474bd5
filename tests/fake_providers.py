"""Local stand-ins for SendGrid's and Mailgun's HTTP APIs: real HTTP servers on free ports that
check each request the way the provider documents it, record what they accepted, and can be
told to answer with errors (or too slowly)."""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from devstack.net import free_port


@dataclass
class Scripted:
    """One answer to play instead of checking the request: a JSON body (a str goes as plain
    text, like a proxy's error page), extra headers, and a delay to outlast a client's timeout."""

    status: int
    body: Any = None
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    json: Any = None
    form: dict[str, list[str]] = field(default_factory=dict)
    mime: EmailMessage | None = None


class FakeProvider:
    """Subclasses check a request in `check` and return (status, body, headers)."""

    def __init__(self) -> None:
        self.port = free_port()
        # By name: the test stacks allow `localhost` (MAILQUEUE_EGRESS_ALLOW), never 127.0.0.1 in any spelling.
        self.url = f"http://localhost:{self.port}"
        self.received: list[Received] = []
        self.paths: list[str] = []  # of every request that arrived, accepted or not: to count retries
        self.script: deque[Scripted] = deque()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, body, headers = provider.answer(self.path, dict(self.headers.items()), raw)
                if isinstance(body, str):
                    data, ctype = body.encode(), "text/plain"
                else:
                    data, ctype = (json.dumps(body).encode() if body is not None else b""), "application/json"
                self.send_response(status)
                for name, value in ({"Content-Type": ctype} | headers | {"Content-Length": str(len(data))}).items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        # A short poll: shutdown() waits for the loop to look, 0.5 s per server by default.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> FakeProvider:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def answer(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any, dict[str, str]]:
        self.paths.append(path)  # list.append is atomic: safe from the server's threads
        if self.script:
            scripted = self.script.popleft()
            time.sleep(scripted.delay)
            return scripted.status, scripted.body, scripted.headers
        return self.check(path, {k.lower(): v for k, v in headers.items()}, raw)

    @property
    def requests(self) -> int:
        return len(self.paths)

    def check(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any, dict[str, str]]:
        raise NotImplementedError


_MIME_TYPE = re.compile(r"[\w!#$&^.+-]+/[\w!#$&^.+-]+", re.ASCII)


def _b64(value: str) -> bool:
    try:
        base64.b64decode(value, validate=True)
        return True
    except (binascii.Error, ValueError):
        return False


# https://www.twilio.com/docs/sendgrid/api-reference/mail-send: headers the `headers` object may not set.
_RESERVED_HEADERS = {"x-sg-id", "x-sg-eid", "received", "dkim-signature", "content-type", "content-transfer-encoding",
                     "to", "from", "subject", "reply-to", "cc", "bcc"}


def _is_address(value: Any) -> bool:
    """SendGrid's email object: {"email", "name"?}, nothing else."""
    return (isinstance(value, dict) and "@" in str(value.get("email", "")) and not set(value) - {"email", "name"}
            and isinstance(value.get("name", ""), str))


# "The total size of your email, including attachments, must be less than 30MB."
_SENDGRID_MAX_BYTES = 30 * 1024 * 1024


def _attachment_problem(a: Any) -> tuple[str, str] | None:
    """(message, field) for an attachment object that is not as documented: content (base64, not
    empty) and filename required, type a MIME type, disposition inline or attachment, and
    content_id required for inline; no other fields."""
    if not isinstance(a, dict) or set(a) - {"content", "filename", "type", "disposition", "content_id"}:
        return "Unknown attachment field.", ""
    if not isinstance(a.get("content"), str) or not a["content"] or not _b64(a["content"]):
        return "The attachment content must be base64 encoded.", "content"
    if not isinstance(a.get("filename"), str) or not a["filename"]:
        return "The attachment filename is required.", "filename"
    if "type" in a and (not isinstance(a["type"], str) or not _MIME_TYPE.fullmatch(a["type"])):
        return "The attachment type must be a MIME type with no ;, CR or LF.", "type"
    if a.get("disposition", "attachment") not in ("attachment", "inline"):
        return "The attachment disposition must be attachment or inline.", "disposition"
    if a.get("disposition") == "inline" and not (isinstance(a.get("content_id"), str) and a["content_id"]):
        return "The content_id is required when the disposition is inline.", "content_id"
    return None


class FakeSendGrid(FakeProvider):
    """POST /v3/mail/send as https://www.twilio.com/docs/sendgrid/api-reference/mail-send describes it."""

    def __init__(self, api_key: str) -> None:
        super().__init__()
        self.api_key = api_key

    @staticmethod
    def _error(message: str, field_name: str | None = None, status: int = 400) -> tuple[int, Any, dict[str, str]]:
        return status, {"errors": [{"message": message, "field": field_name, "help": None}]}, {}

    def check(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any, dict[str, str]]:
        if path != "/v3/mail/send":
            return 404, {"errors": [{"message": "not found"}]}, {}
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return self._error("The provided authorization grant is invalid, expired, or revoked", status=401)
        if not headers.get("content-type", "").startswith("application/json"):
            return self._error("Content-Type should be application/json.")
        if len(raw) > _SENDGRID_MAX_BYTES:
            return self._error("The total size of your email must be less than 30MB.", status=413)
        body = json.loads(raw)
        personalizations = body.get("personalizations")
        if not isinstance(personalizations, list) or not personalizations:
            return self._error("The personalizations field is required and must have at least one personalization.", "personalizations")
        for p in personalizations:
            if not p.get("to"):
                return self._error("The to array is required for all personalization objects", "personalizations.0.to")
            seen: set[str] = set()
            for kind in ("to", "cc", "bcc"):
                for address in p.get(kind, []):
                    if not _is_address(address):
                        return self._error(f"Invalid {kind} address", f"personalizations.0.{kind}")
                    if address["email"].lower() in seen:
                        return self._error("Each email address in the personalization block should be unique between to, cc, and bcc.",
                                           f"personalizations.0.{kind}")
                    seen.add(address["email"].lower())
        if not _is_address(body.get("from")):
            return self._error("The from object must be provided for every email send.", "from.email")
        if "reply_to" in body and not _is_address(body["reply_to"]):
            return self._error("The reply_to email does not contain a valid address.", "reply_to")
        if not isinstance(body.get("subject"), str):
            return self._error("The subject is required.", "subject")
        content = body.get("content") or []
        types = [c.get("type") for c in content]
        if not content or any(not isinstance(c.get("value"), str) or not c.get("value") for c in content):
            return self._error("The content value must be a string at least one character in length.", "content.0.value")
        if "text/plain" in types and types[0] != "text/plain":
            return self._error("If present, text/plain content must be first, followed by any other content.", "content.0.type")
        for i, a in enumerate(body.get("attachments", [])):
            if problem := _attachment_problem(a):
                return self._error(problem[0], f"attachments.{i}" + (f".{problem[1]}" if problem[1] else ""))
        custom = body.get("headers") or {}
        if not all(isinstance(v, str) for v in custom.values()):
            return self._error("Headers must be strings.", "headers")
        if reserved := sorted(k for k in custom if k.lower() in _RESERVED_HEADERS):
            return self._error(f"The headers {reserved} are reserved and cannot be set.", "headers")
        self.received.append(Received(path=path, headers=headers, json=body))
        return 202, None, {"X-Message-Id": f"sg-{uuid.uuid4().hex[:12]}"}


class FakeMailgun(FakeProvider):
    """POST /v3/{domain}/messages.mime as https://documentation.mailgun.com describes it."""

    def __init__(self, api_key: str, domain: str) -> None:
        super().__init__()
        self.api_key, self.domain = api_key, domain

    def check(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any, dict[str, str]]:
        if path != f"/v3/{self.domain}/messages.mime":
            return 404, {"message": "Domain not found"}, {}
        expected = "Basic " + base64.b64encode(f"api:{self.api_key}".encode()).decode()
        if headers.get("authorization") != expected:
            return 401, {"message": "Invalid private key"}, {}
        ctype = headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return 400, {"message": "expected multipart/form-data"}, {}
        form_msg = message_from_bytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw, policy=policy.HTTP)
        form: dict[str, list[str]] = {}
        mime: EmailMessage | None = None
        for part in form_msg.iter_parts():  # type: ignore[attr-defined]
            name = part.get_param("name", header="content-disposition")
            if name == "message":
                if not part.get_filename():
                    return 400, {"message": "'message' must be a file"}, {}
                payload = part.get_payload()
                # A file part typed message/rfc822 arrives parsed; any other type arrives as bytes.
                raw_mime = payload[0].as_bytes() if isinstance(payload, list) else part.get_payload(decode=True)
                mime = message_from_bytes(raw_mime, policy=policy.default)  # type: ignore[assignment]
            else:
                form.setdefault(str(name), []).append(part.get_content())
        if mime is None:
            return 400, {"message": "'message' parameter is missing"}, {}
        if not form.get("to"):
            return 400, {"message": "'to' parameter is missing"}, {}
        self.received.append(Received(path=path, headers=headers, form=form, mime=mime))
        return 200, {"id": f"<{uuid.uuid4().hex[:12]}@{self.domain}>", "message": "Queued. Thank you."}, {}


class FakeAws(FakeProvider):
    """An AWS endpoint that only plays its script: for the answers moto does not produce
    (throttling, 5xx, a slow answer) and to count how many requests botocore makes.
    Request signing is not checked here; moto's server covers the real SES exchange."""

    def check(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any, dict[str, str]]:
        return 500, {"message": f"nothing scripted for {path}"}, {}
