"""Turning an email spec and its rendered content into a MIME message."""

from __future__ import annotations

from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, getaddresses

from mailqueue.contracts import Content, EmailSpec


def bare_address(value: str) -> str:
    """"Ann <ann@example.com>" -> "ann@example.com"."""
    return getaddresses([value])[0][1]


def build_message(spec: EmailSpec, content: Content) -> EmailMessage:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = spec.from_address
    msg["To"] = ", ".join(spec.to)
    if spec.cc:
        msg["Cc"] = ", ".join(spec.cc)
    if spec.reply_to:
        msg["Reply-To"] = spec.reply_to
    msg["Subject"] = " ".join(content.subject.splitlines())
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = spec.message_id
    for name, value in spec.headers.items():
        msg[name] = value
    if content.text is not None:
        msg.set_content(content.text)
        if content.html is not None:
            msg.add_alternative(content.html, subtype="html")
    else:
        msg.set_content(content.html or "", subtype="html")
    return msg


def envelope(spec: EmailSpec) -> tuple[str, list[str]]:
    """(MAIL FROM, RCPT TO list): Bcc goes only here, never into the headers."""
    recipients = [bare_address(a) for a in (*spec.to, *spec.cc, *spec.bcc)]
    return bare_address(spec.from_address), list(dict.fromkeys(recipients))


def domain_of(address: str) -> str:
    return Address(addr_spec=bare_address(address)).domain


def redirect(message: EmailMessage, recipients: list[str], to: str) -> list[str]:
    """Test mode: deliver to `to` only; the intended recipients travel in X-Original-* headers."""
    for header in ("To", "Cc"):
        if message[header]:
            message[f"X-Original-{header}"] = message[header]
    shown = {a.lower() for _, a in getaddresses([message["To"] or "", message["Cc"] or ""])}
    bcc = [r for r in recipients if r.lower() not in shown]
    if bcc:
        message["X-Original-Bcc"] = ", ".join(bcc)
    # Headers too, so that no driver (some build their recipient lists from them) reaches anyone else.
    del message["To"], message["Cc"]
    message["To"] = to
    return [bare_address(to)]
