"""SendGrid v3 Mail Send (POST /v3/mail/send, Bearer API key); 202 and X-Message-Id on success."""

from __future__ import annotations

import base64
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Any

import httpx

from mailqueue.drivers import Delivery
from mailqueue.drivers._http import body_parts, classify, split_recipients, transport_error

# Headers SendGrid sets itself or refuses in `headers` (its docs list them as reserved).
_NOT_CUSTOM = {
    "from", "to", "cc", "bcc", "subject", "reply-to", "date", "mime-version", "content-type",
    "content-transfer-encoding", "received", "dkim-signature", "x-sg-id", "x-sg-eid",
}


def _address(name: str, addr: str) -> dict[str, str]:
    return {"email": addr, "name": name} if name else {"email": addr}


def payload(message: EmailMessage, sender: str, recipients: list[str]) -> dict[str, Any]:
    """The Mail Send body for `message`, as SendGrid documents it."""
    to, cc, bcc = split_recipients(message, recipients)
    personalization: dict[str, Any] = {"to": [_address(n, a) for n, a in to]}
    if not personalization["to"]:  # SendGrid needs a `to`; a Bcc-only email moves its first Bcc there
        personalization["to"] = [{"email": bcc.pop(0)}]
    if cc:
        personalization["cc"] = [_address(n, a) for n, a in cc]
    if bcc:
        personalization["bcc"] = [{"email": a} for a in bcc]
    [(from_name, from_addr)] = getaddresses([message["From"] or sender]) or [("", sender)]
    text, html = body_parts(message)
    content = []
    if text is not None:
        content.append({"type": "text/plain", "value": text})  # text/plain first: SendGrid requires the order
    if html is not None:
        content.append({"type": "text/html", "value": html})
    body: dict[str, Any] = {
        "personalizations": [personalization],
        "from": _address(from_name, from_addr or sender),
        "subject": str(message["Subject"] or ""),
        "content": content or [{"type": "text/plain", "value": " "}],
    }
    if message["Reply-To"]:
        [(name, addr)] = getaddresses([message["Reply-To"]])
        body["reply_to"] = _address(name, addr)
    headers = {k: str(v) for k, v in message.items() if k.lower() not in _NOT_CUSTOM}
    if headers:
        body["headers"] = headers
    attachments = []
    for part in message.iter_attachments():
        data = part.get_payload(decode=True) or b""
        item = {
            "content": base64.b64encode(data).decode(),  # type: ignore[arg-type]
            "filename": part.get_filename() or "attachment",
            "type": part.get_content_type(),
            "disposition": part.get_content_disposition() or "attachment",
        }
        if part["Content-ID"]:
            item["content_id"] = str(part["Content-ID"]).strip("<>")
        attachments.append(item)
    if attachments:
        body["attachments"] = attachments
    return body


class SendGridDriver:
    name = "sendgrid"

    def __init__(
        self, api_key: str, *, base_url: str = "https://api.sendgrid.com", timeout: float = 30.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self._client = client or httpx.AsyncClient(timeout=timeout)
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
        if response.status_code not in (200, 202):
            raise classify("sendgrid", response, "API key") from None
        return Delivery(provider_message_id=response.headers.get("X-Message-Id") or str(message["Message-ID"]))

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
