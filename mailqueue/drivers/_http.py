"""What the HTTP mail APIs share: classifying their answers, reading their error messages, parts of a message."""

from __future__ import annotations

import json
from email.message import EmailMessage
from email.utils import getaddresses

import httpx

from mailqueue.errors import DeliveryError, PermanentDeliveryError, ServerUnreachable, TransientDeliveryError

MAX_REASON = 300


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """`text` without any of `secrets`: providers may quote a refused key back in their error."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def provider_text(response: httpx.Response, secrets: tuple[str, ...] = ()) -> str:
    """The provider's own words: the message(s) of a JSON error body, else the body's start.
    Secrets are removed before truncating, so that no prefix of one can survive the cut."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return redact(response.text.strip(), secrets)[:MAX_REASON]
    messages: list[str] = []
    if isinstance(body, dict):
        for error in body.get("errors") or []:  # SendGrid: {"errors": [{"message", "field"}]}
            if isinstance(error, dict) and error.get("message"):
                field = f" ({error['field']})" if error.get("field") else ""
                messages.append(f"{error['message']}{field}")
        if not messages and body.get("message"):  # Mailgun: {"message": ...}
            messages.append(str(body["message"]))
    return redact("; ".join(messages) or json.dumps(body), secrets)[:MAX_REASON]


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
