"""SendGrid v3 Mail Send (POST /v3/mail/send, Bearer API key); 202 and X-Message-Id on success."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Any

import httpx

from mailqueue.drivers.base import Delivery, DriverName
from mailqueue.drivers._http import body_parts, classify, destination_error, http_client, split_recipients, transport_error
from mailqueue.egress import Destination, DestinationRefused

# Headers SendGrid sets itself or refuses in `headers` (its docs list them as reserved).
_NOT_CUSTOM = {
    "from", "to", "cc", "bcc", "subject", "reply-to", "date", "mime-version", "content-type",
    "content-transfer-encoding", "received", "dkim-signature", "x-sg-id", "x-sg-eid",
}


def _address(name: str, addr: str) -> dict[str, str]:
    return {"email": addr, "name": name} if name else {"email": addr}


def _first(message: EmailMessage, header: str) -> tuple[str, str]:
    """(name, address) of the first address in `header`, ("", "") if none: never raises on a header
    that holds several addresses or none."""
    found = [(n, a) for n, a in getaddresses([str(v) for v in message.get_all(header, [])]) if a]
    return found[0] if found else ("", "")


def _attachment_bytes(part: EmailMessage) -> bytes:
    """The attachment's content as a file would hold it; a forwarded message (message/rfc822) is
    a parsed part without a decodable payload, so it is serialised back."""
    data = part.get_payload(decode=True)
    if isinstance(data, bytes):
        return data
    inner = part.get_payload()
    return inner[0].as_bytes() if isinstance(inner, list) and inner else b""


def _files(part: EmailMessage, body: tuple[object, ...]) -> Iterator[EmailMessage]:
    """Every part that is neither a multipart container nor one of the `body` parts (the text and
    HTML that go in `content`), in order, from any depth: an inline image lives beside the HTML in
    multipart/related, inside the alternative part, where EmailMessage.iter_attachments does not
    look. A forwarded message (message/rfc822) is one file, not gone into."""
    if any(part is b for b in body):
        return
    if part.get_content_maintype() == "multipart":
        for sub in part.iter_parts():
            yield from _files(sub, body)  # type: ignore[arg-type]
    else:
        yield part


def _attachment(part: EmailMessage) -> dict[str, str]:
    """SendGrid's attachment object. Inline only with a content_id: SendGrid requires one there."""
    cid = str(part["Content-ID"] or "").strip().strip("<>")
    item = {
        "content": base64.b64encode(_attachment_bytes(part)).decode(),
        "filename": part.get_filename() or "attachment",
        "type": part.get_content_type(),
        "disposition": "inline" if cid and part.get_content_disposition() != "attachment" else "attachment",
    }
    if cid:
        item["content_id"] = cid
    return item


def payload(message: EmailMessage, sender: str, recipients: list[str]) -> dict[str, Any]:
    """The Mail Send body for `message`, as SendGrid documents it. The envelope (`sender`,
    `recipients`) decides the addresses; the headers only lend display names and the To/Cc split."""
    to, cc, bcc = split_recipients(message, recipients)
    if not to and cc:
        to = [cc.pop(0)]  # SendGrid needs a `to`; a Cc address stands in, it is shown to all anyway
    if to:
        personalization: dict[str, Any] = {"to": [_address(n, a) for n, a in to]}
        if cc:
            personalization["cc"] = [_address(n, a) for n, a in cc]
        if bcc:
            personalization["bcc"] = [{"email": a} for a in bcc]
        personalizations = [personalization]
    else:
        # Bcc only. Each personalization is a copy whose To header shows its `to`: one copy per
        # recipient, so no Bcc recipient is revealed to another.
        personalizations = [{"to": [{"email": a}]} for a in bcc]
    from_name, from_addr = _first(message, "From")
    text, html = body_parts(message)
    content = []
    if text is not None:
        content.append({"type": "text/plain", "value": text})  # text/plain first: SendGrid requires the order
    if html is not None:
        content.append({"type": "text/html", "value": html})
    body: dict[str, Any] = {
        "personalizations": personalizations,
        "from": _address(from_name if from_addr.lower() == sender.lower() else "", sender),
        "subject": str(message["Subject"] or ""),
        "content": content or [{"type": "text/plain", "value": " "}],
    }
    reply_name, reply_addr = _first(message, "Reply-To")
    if reply_addr:
        body["reply_to"] = _address(reply_name, reply_addr)
    headers = {k: str(v) for k, v in message.items() if k.lower() not in _NOT_CUSTOM}
    if headers:
        body["headers"] = headers
    shown = tuple(p for p in (message.get_body(("plain",)), message.get_body(("html",))) if p is not None)
    attachments = [_attachment(part) for part in _files(message, shown)]
    if attachments:
        body["attachments"] = attachments
    return body


class SendGridDriver:
    """SendGrid's v3 Mail Send API. The message is taken apart into SendGrid's JSON (it does not
    accept raw MIME); one httpx client per driver instance keeps connections alive between sends."""

    name = DriverName.SENDGRID

    def __init__(
        self, api_key: str, *, base_url: str = "https://api.sendgrid.com", timeout: float = 30.0,
        client: httpx.AsyncClient | None = None, destination: Destination | None = None,
    ) -> None:
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        # `destination`: the egress check every new connection goes through (a sender's own driver).
        self._client = client or http_client(timeout, destination)
        self._owns_client = client is None

    def __repr__(self) -> str:
        return f"SendGridDriver(base_url={self.base_url!r})"  # never the key

    async def send(self, message: EmailMessage, sender: str, recipients: list[str]) -> Delivery:
        try:
            response = await self._client.post(
                f"{self.base_url}/v3/mail/send", json=payload(message, sender, recipients),
                headers={"Authorization": f"Bearer {self._api_key}"},
            )
        except httpx.HTTPError as exc:
            raise transport_error("sendgrid", exc) from None
        except DestinationRefused as exc:
            raise destination_error("sendgrid", self.base_url, exc) from None
        if response.status_code not in (200, 202):
            raise classify("sendgrid", response, "API key", (self._api_key,)) from None
        return Delivery(provider_message_id=response.headers.get("X-Message-Id") or str(message["Message-ID"]))

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
