"""Amazon SES v2 (boto3 `sesv2.send_email` with the raw MIME message), run in a thread."""

from __future__ import annotations

import asyncio
import threading
from email.message import EmailMessage
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

from mailqueue.drivers.base import Delivery, DriverName, remote_text
from mailqueue.drivers._http import MAX_REASON, destination_error, endpoint
from mailqueue.egress import Destination, DestinationRefused
from mailqueue.errors import DeliveryError, PermanentDeliveryError, ServerUnreachable, TransientDeliveryError

TRANSIENT = {"Throttling", "ThrottlingException", "TooManyRequestsException", "LimitExceededException",
             "ServiceUnavailable", "ServiceUnavailableException", "InternalFailure", "InternalServiceError", "RequestTimeout"}
CREDENTIALS = {"AccessDeniedException", "AccessDenied", "UnrecognizedClientException", "InvalidClientTokenId",
               "SignatureDoesNotMatch", "IncompleteSignature", "MissingAuthenticationToken", "ExpiredToken"}


def classify(exc: ClientError, secrets: tuple[str, ...] = ()) -> DeliveryError:
    """Throttling, 429 and 5xx: worth retrying. Refused credentials and every other error: permanent."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "Unknown")
    text = remote_text(str(error.get("Message") or ""), secrets, MAX_REASON)
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in TRANSIENT or (isinstance(status, int) and (status == 429 or status >= 500)):
        return TransientDeliveryError(f"ses answered {code}: {text}", code=status)
    if code in CREDENTIALS:
        return PermanentDeliveryError(f"ses refused the credentials ({code}): {text}", code=status)
    return PermanentDeliveryError(f"ses rejected the message ({code}): {text}", code=status)


class SesDriver:
    """Amazon SES v2 with the raw MIME message, so attachments and headers go as built. boto3 is
    synchronous: one client per driver, created on first use and called in a worker thread."""

    name = DriverName.SES

    def __init__(
        self, access_key_id: str, secret_access_key: str, region: str, *, endpoint_url: str | None = None,
        timeout: float = 30.0, configuration_set: str | None = None, destination: Destination | None = None,
    ) -> None:
        """`destination`: the egress check, asked before each send. botocore connects by name
        after it; the names it can be given are AWS's own (from a checked region) or the
        operator's endpoint, never one a user chose, so a rebinding name is not in reach."""
        self._access_key_id, self._secret_access_key = access_key_id, secret_access_key
        self.region, self.endpoint_url, self.configuration_set = region, endpoint_url, configuration_set
        self._destination = destination
        # Temporal retries the send; botocore must not retry underneath it. `total_max_attempts`
        # counts the first request: botocore's own `max_attempts` counts retries only, so
        # {"max_attempts": 1} would send twice.
        self._config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": 1, "mode": "standard"})
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SesDriver(region={self.region!r})"  # never the keys

    @property
    def client(self) -> Any:
        with self._lock:  # boto3 clients are thread-safe; creating one is not
            if self._client is None:
                self._client = boto3.session.Session().client(
                    "sesv2", region_name=self.region, endpoint_url=self.endpoint_url, config=self._config,
                    aws_access_key_id=self._access_key_id, aws_secret_access_key=self._secret_access_key,
                )
            return self._client

    def _send(self, message: EmailMessage, sender: str, recipients: list[str]) -> str:
        request: dict[str, Any] = {
            "FromEmailAddress": sender,
            "Destination": {"ToAddresses": recipients},  # the envelope: Bcc included
            "Content": {"Raw": {"Data": message.as_bytes()}},
        }
        if self.configuration_set:
            request["ConfigurationSetName"] = self.configuration_set
        return str(self.client.send_email(**request)["MessageId"])

    @property
    def url(self) -> str:
        return self.endpoint_url or f"https://email.{self.region}.amazonaws.com"  # botocore's sesv2 endpoint

    async def send(self, message: EmailMessage, sender: str, recipients: list[str]) -> Delivery:
        if self._destination is not None:
            try:
                await self._destination(*endpoint(self.url))
            except DestinationRefused as exc:
                raise destination_error("ses", self.url, exc) from None
        try:
            message_id = await asyncio.to_thread(self._send, message, sender, recipients)
        except ClientError as exc:
            raise classify(exc, (self._access_key_id, self._secret_access_key)) from None
        except (EndpointConnectionError, ConnectTimeoutError) as exc:
            # No connection to the endpoint: no request was sent.
            raise ServerUnreachable(f"ses could not be reached ({type(exc).__name__})") from None
        except (HTTPClientError, BotoConnectionError) as exc:
            # Timeouts, refused or dropped connections: ReadTimeoutError and ConnectionClosedError
            # are HTTPClientErrors, EndpointConnectionError and ConnectTimeoutError ConnectionErrors.
            raise TransientDeliveryError(f"ses could not be reached ({type(exc).__name__})") from None
        except BotoCoreError as exc:
            # Configuration faults (no region, bad endpoint): the type only, messages can echo settings.
            raise PermanentDeliveryError(f"ses client error ({type(exc).__name__})") from None
        return Delivery(provider_message_id=message_id)
