"""What the HTTP mail APIs share: a client that connects only where the egress policy allows,
classifying their answers, reading their error messages, parts of a message.

The providers' own error words are kept in reasons (scrubbed, cut short): their endpoints are
the providers' or the operator's, never a user's choice, and their words are about the user's
own account ("The from address does not match a verified Sender Identity").
"""

from __future__ import annotations

import json
import typing
from email.message import EmailMessage
from email.utils import getaddresses
from urllib.parse import urlsplit

import httpcore
import httpx

from mailqueue.drivers.base import remote_text
from mailqueue.egress import Destination, DestinationRefused, NotResolved
from mailqueue.errors import DeliveryError, PermanentDeliveryError, ServerUnreachable, TransientDeliveryError
from mailqueue.tracing import instrument_http_client

MAX_REASON = 300


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Opens each connection to an address the egress policy allowed for the URL's host, never
    to the name itself (TLS still verifies, and names, the host: httpcore starts it separately)."""

    def __init__(self, destination: Destination) -> None:
        self._destination = destination
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        failure: Exception = httpcore.ConnectError("no address to connect to")
        for ip in await self._destination(host, port):  # DestinationRefused passes through httpx unchanged
            try:
                return await self._inner.connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("a unix socket is not an egress destination")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _CheckedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a pool whose every connection goes through the egress check. No
    proxy: a proxy would connect by name, past the check."""

    def __init__(self, destination: Destination) -> None:
        super().__init__(trust_env=False)
        limits = httpx.Limits()
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),  # the CA bundle (or SSL_CERT_FILE) httpx uses by default
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_CheckedBackend(destination),
        )


def http_client(timeout: float, destination: Destination | None) -> httpx.AsyncClient:
    """The client a provider driver talks through: checked by the egress policy when `destination`
    is given, and each request a span in the email's trace while tracing is on."""
    if destination is None:
        client = httpx.AsyncClient(timeout=timeout)
    else:
        client = httpx.AsyncClient(timeout=timeout, transport=_CheckedTransport(destination))
    instrument_http_client(client)
    return client


def endpoint(url: str) -> tuple[str, int]:
    """(host, port) of a base URL, as a connection to it would use them."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def destination_error(provider: str, url: str, exc: DestinationRefused) -> DeliveryError:
    """A provider endpoint the egress policy refused (permanent: no retry changes the policy),
    or whose name has no address now (unreachable: DNS may answer again)."""
    host, _ = endpoint(url)
    if isinstance(exc, NotResolved):
        return ServerUnreachable(f"{provider} could not be reached ({host} {exc.reason})")
    return PermanentDeliveryError(f"{provider} endpoint refused: {exc.reason if exc.part == 'port' else f'{host} {exc.reason}'}")


def provider_text(response: httpx.Response, secrets: tuple[str, ...] = ()) -> str:
    """The provider's own words: the message(s) of a JSON error body, else the body's start.
    Secrets are removed before truncating, so that no prefix of one can survive the cut."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return remote_text(response.text, secrets, MAX_REASON)
    messages: list[str] = []
    if isinstance(body, dict):
        for error in body.get("errors") or []:  # SendGrid: {"errors": [{"message", "field"}]}
            if isinstance(error, dict) and error.get("message"):
                field = f" ({error['field']})" if error.get("field") else ""
                messages.append(f"{error['message']}{field}")
        if not messages and body.get("message"):  # Mailgun: {"message": ...}
            messages.append(str(body["message"]))
    return remote_text("; ".join(messages) or json.dumps(body), secrets, MAX_REASON)


def classify(provider: str, response: httpx.Response, credential: str, secrets: tuple[str, ...] = ()) -> DeliveryError:
    """429 and 5xx: worth retrying. 401/403: the credentials were refused. Other 4xx: permanent.
    `credential` names what was refused ("API key"); `secrets` are the values never to echo."""
    status = response.status_code
    text = provider_text(response, secrets)
    if status in (401, 403):
        return PermanentDeliveryError(f"{provider} refused the {credential} ({status}): {text}", code=status)
    if status == 429 or status >= 500:
        return TransientDeliveryError(f"{provider} answered {status}: {text}", code=status)
    return PermanentDeliveryError(f"{provider} rejected the message ({status}): {text}", code=status)


def transport_error(provider: str, exc: httpx.HTTPError) -> TransientDeliveryError:
    # The type only: httpx messages can carry the URL, and some APIs put keys in URLs.
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        # No request left this machine: the provider is unreachable, nothing was handed over.
        return ServerUnreachable(f"{provider} could not be reached ({type(exc).__name__})")
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else f"could not be reached ({type(exc).__name__})"
    return TransientDeliveryError(f"{provider} {kind}")


def split_recipients(message: EmailMessage, recipients: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """(to, cc, bcc) for APIs that want them apart: To/Cc headers place the envelope's recipients,
    every envelope recipient not shown there is a Bcc. The envelope is the truth: a header
    address that is not in it is not sent to."""
    wanted = {r.lower() for r in recipients}
    placed: set[str] = set()

    def shown(header: str) -> list[tuple[str, str]]:
        out = []
        for name, addr in getaddresses(message.get_all(header, [])):
            if addr and addr.lower() in wanted and addr.lower() not in placed:
                placed.add(addr.lower())
                out.append((name, addr))
        return out

    to, cc = shown("To"), shown("Cc")
    bcc = [r for r in recipients if r.lower() not in placed]
    return to, cc, bcc


def body_parts(message: EmailMessage) -> tuple[str | None, str | None]:
    """(text, html) of a message built by build_message (or any MIME message)."""
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    return (
        text.get_content() if text is not None else None,  # type: ignore[attr-defined]
        html.get_content() if html is not None else None,  # type: ignore[attr-defined]
    )
