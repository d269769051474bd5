"""Mailgun: the whole MIME message through POST /v3/{domain}/messages.mime (Basic auth api:<key>)."""

from __future__ import annotations

from email.message import EmailMessage

import httpx

from mailqueue.drivers.base import Delivery, DriverName
from mailqueue.drivers._http import classify, destination_error, http_client, transport_error
from mailqueue.egress import Destination, DestinationRefused

REGIONS = {"us": "https://api.mailgun.net", "eu": "https://api.eu.mailgun.net"}


class MailgunDriver:
    """Mailgun's messages.mime: the MIME message goes as built (attachments and all) and the
    envelope recipients go alongside it, which is what makes Bcc work."""

    name = DriverName.MAILGUN

    def __init__(
        self, api_key: str, domain: str, *, region: str = "us", base_url: str | None = None, timeout: float = 30.0,
        client: httpx.AsyncClient | None = None, destination: Destination | None = None,
    ) -> None:
        if region not in REGIONS:
            raise ValueError(f"unknown Mailgun region {region!r}; use one of {sorted(REGIONS)}")
        self._api_key = api_key
        self.domain = domain
        self.base_url = (base_url or REGIONS[region]).rstrip("/")
        # `destination`: the egress check every new connection goes through (a sender's own driver).
        self._client = client or http_client(timeout, destination)
        self._owns_client = client is None

    def __repr__(self) -> str:
        return f"MailgunDriver(domain={self.domain!r}, base_url={self.base_url!r})"  # never the key

    @property
    def url(self) -> str:
        return f"{self.base_url}/v3/{self.domain}/messages.mime"

    async def send(self, message: EmailMessage, sender: str, recipients: list[str]) -> Delivery:
        # `to` once per envelope recipient: Mailgun delivers to these, so Bcc (absent from the
        # MIME headers) is delivered too.
        try:
            response = await self._client.post(
                self.url, auth=("api", self._api_key), data={"to": recipients},
                files={"message": ("message.mime", message.as_bytes(), "message/rfc822")},
            )
        except httpx.HTTPError as exc:
            raise transport_error("mailgun", exc) from None
        except DestinationRefused as exc:
            raise destination_error("mailgun", self.url, exc) from None
        if response.status_code != 200:
            raise classify("mailgun", response, "API key", (self._api_key,)) from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        message_id = str(answer.get("id") or "") if isinstance(answer, dict) else ""
        return Delivery(provider_message_id=message_id.strip("<>") or str(message["Message-ID"]))

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
