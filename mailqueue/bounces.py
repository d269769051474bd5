"""Bounces that come back by mail: the VERP addresses an email's mail carries, and reading what
arrives at them (RFC 3464 delivery status notifications, best effort for anything else).

Every SMTP send with MAILQUEUE_BOUNCE_DOMAIN set goes out with the envelope sender (MAIL FROM,
which receivers keep as Return-Path) `bounce+<email id>@<bounce domain>`: a bounce names its email
without guessing from its text. `unsubscribe+<email id>@<bounce domain>` is the mailto half of an
email's List-Unsubscribe. mailqueue/bounce_server.py listens for both; this module only reads.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import logging
import re
import uuid
from dataclasses import dataclass, field
from email.message import Message
from email.parser import HeaderParser
from email.utils import getaddresses
from enum import StrEnum

from mailqueue.drivers.base import remote_text

log = logging.getLogger("mailqueue.bounces")

BOUNCE = "bounce"  # bounce+<email id>@<bounce domain>: the envelope sender of every SMTP send
UNSUBSCRIBE = "unsubscribe"  # unsubscribe+<email id>@<bounce domain>: List-Unsubscribe's mailto
SOURCE_DSN = "smtp-dsn"  # Feedback.source of what arrives at a bounce address
SOURCE_UNSUBSCRIBE_MAIL = "unsubscribe mail"  # ... and at an unsubscribe address

DIAGNOSTIC_LIMIT = 300  # characters of a remote server's words kept
_TEXT_LIMIT = 64_000  # characters of a non-report's text searched for a status code

# --- the addresses -------------------------------------------------------------------------------


def bounce_address(email_id: str, domain: str) -> str:
    """The envelope sender of an email's SMTP sends (VERP): its bounces come back here."""
    return f"{BOUNCE}+{email_id}@{domain}"


def unsubscribe_address(email_id: str, domain: str) -> str:
    return f"{UNSUBSCRIBE}+{email_id}@{domain}"


def unsubscribe_mailto(email_id: str, domain: str) -> str:
    """List-Unsubscribe's mailto part (RFC 2369): a mail to it from the recipient unsubscribes them.
    The local part is 48 characters, within RFC 5321's 64."""
    return f"<mailto:{unsubscribe_address(email_id, domain)}?subject=unsubscribe>"


@dataclass(frozen=True)
class Addressed:
    """What a recipient address of the listener stands for: `kind` (BOUNCE or UNSUBSCRIBE) of `email_id`."""

    kind: str
    email_id: str


_VERP = re.compile(rf"^({BOUNCE}|{UNSUBSCRIBE})\+([0-9a-fA-F-]{{36}})@(.+)$", re.IGNORECASE)


def addressed(address: str, domain: str) -> Addressed | None:
    """The email a listener address names, or None when it is not one of ours (another local part,
    another domain, not a UUID). Matching ignores case: some relays change it."""
    match = _VERP.match(address.strip().strip("<>"))
    if match is None or match[3].rstrip(".").lower() != domain.rstrip(".").lower():
        return None
    try:
        email_id = str(uuid.UUID(match[2]))
    except ValueError:
        return None
    if email_id != match[2].lower():  # only the canonical form (8-4-4-4-12) names an email
        return None
    return Addressed(match[1].lower(), email_id)


# --- what a bounce says --------------------------------------------------------------------------


class Action(StrEnum):
    """RFC 3464 section 2.3.3."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"
    EXPANDED = "expanded"


@dataclass(frozen=True)
class RecipientStatus:
    """One recipient's fate as the report states it."""

    recipient: str | None  # Original-Recipient if given (the address we sent to), else Final-Recipient
    action: Action
    status: str  # RFC 3463 enhanced status code: 5.1.1
    diagnostic: str = ""  # Diagnostic-Code (the remote server's reply), made safe and short
    final_recipient: str | None = None

    @property
    def hard(self) -> bool:
        """Permanent by the status code's class: 5.x.x is hard, 4.x.x soft (RFC 3463)."""
        return self.status.startswith("5")


@dataclass(frozen=True)
class Report:
    """What one message to a bounce address says."""

    dsn: bool  # an RFC 3464 report (else the best-effort reading of a message that is not one)
    key: str  # the message's own id: its Message-ID, else a hash of its bytes
    recipients: list[RecipientStatus] = field(default_factory=list)
    # Not a report: the addresses its text names (the listener keeps those the email was sent to).
    mentioned: list[str] = field(default_factory=list)
    auto_reply: bool = False  # an out-of-office or other automatic answer (RFC 3834) with no status code: not a bounce


_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_REPLY = re.compile(r"(?:^|[\s#:(\[])([245][0-5]\d)(?=[ -]\S)", re.M)
_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+")
# Where bounce texts start quoting the returned message: nothing after these is the server's word.
_QUOTE_MARKERS = re.compile(
    r"^.*(?:below this line is a copy of the message|this is a copy of the message|original message follows|"
    r"-+ ?original message ?-+|-+ ?the header of the original message|returned mail follows|undelivered message follows).*$",
    re.I | re.M,
)
_REPORT_TYPES = ("message/delivery-status", "message/global-delivery-status")
NO_CODE = "no status code found in the bounce"


def _text(value: object) -> str:
    return " ".join(str(value).split()) if value is not None else ""


def _address_field(value: object) -> str | None:
    """"rfc822; ann@example.com" -> "ann@example.com" (the address type is dropped)."""
    text = _text(value)
    if not text:
        return None
    _, _, address = text.rpartition(";")
    address = address.strip().strip("<>").strip()
    return address or None


def _status_of(fields: Message, action: Action) -> str:
    """The Status field's code; else one in the Diagnostic-Code; else the class the action implies."""
    for value in (fields.get("Status"), fields.get("Diagnostic-Code")):
        match = _STATUS.search(_text(value))
        if match:
            return ".".join(match.groups())
    reply = _REPLY.search(_text(fields.get("Diagnostic-Code")))
    if reply:
        return f"{reply[1][0]}.0.0"
    return "5.0.0" if action is Action.FAILED else "4.0.0" if action is Action.DELAYED else "2.0.0"


def _field_groups(part: Message) -> list[Message]:
    """The field groups of a delivery-status part: the per-message one, then one per recipient.
    Python parses message/delivery-status into a list of them; anything it could not (encoded,
    the UTF-8 global form) is read here from the decoded text."""
    payload = part.get_payload()
    if isinstance(payload, list) and part.get_content_type() == "message/delivery-status":
        return [p for p in payload if isinstance(p, Message)]
    if isinstance(payload, list):  # another message/* type: Python read it as one message, its groups in the body
        raw = b"".join(p.as_bytes() for p in payload if isinstance(p, Message))
    else:
        raw = part.get_payload(decode=True) or b""
    assert isinstance(raw, bytes)
    text = raw.decode("utf-8", "replace").replace("\r\n", "\n")  # RFC 6533: the global form is UTF-8
    parser = HeaderParser(policy=email.policy.compat32)
    return [parser.parsestr(block.strip() + "\n") for block in re.split(r"\n[ \t]*\n", text) if block.strip()]


def _from_dsn(part: Message) -> list[RecipientStatus]:
    found = []
    for fields in _field_groups(part)[1:]:  # the first group is about the message as a whole
        action_text = _text(fields.get("Action")).lower().split(" ")[0] if fields.get("Action") else ""
        try:
            action = Action(action_text)
        except ValueError:
            if fields.get("Final-Recipient") is None:
                continue  # not a recipient's group
            action = Action.FAILED  # a recipient named with no (or an unknown) action: failed is what reports mean
        diagnostic = _text(fields.get("Diagnostic-Code"))
        kind, sep, words = diagnostic.partition(";")
        if sep and re.fullmatch(r"[A-Za-z0-9-]+", kind.strip()):
            diagnostic = words.strip()  # "smtp; 550 ..." -> "550 ...": the type says how to read it, and it is SMTP
        final = _address_field(fields.get("Final-Recipient"))
        original = _address_field(fields.get("Original-Recipient"))
        found.append(RecipientStatus(
            recipient=original or final, action=action, status=_status_of(fields, action),
            diagnostic=remote_text(diagnostic, limit=DIAGNOSTIC_LIMIT), final_recipient=final,
        ))
    return found


def _plain_text(message: Message) -> str:
    """The text of a message that is not a report, without what it quotes of the returned message."""
    parts = []
    for part in message.walk():
        if part.get_content_type() in ("message/rfc822", "text/rfc822-headers"):
            break  # the returned message: not the server's words
        if part.get_content_maintype() == "text" and not part.is_multipart():
            raw = part.get_payload(decode=True)
            if isinstance(raw, bytes):
                parts.append(raw.decode(part.get_content_charset() or "utf-8", "replace"))
    text = "\n".join(parts)[:_TEXT_LIMIT]
    cut = _QUOTE_MARKERS.search(text)
    return text[: cut.start()] if cut else text


def _guess(text: str) -> RecipientStatus:
    """Best effort for a bounce that is not a report: a 5.x.x status or a 5xx reply in its text is
    hard, anything else soft. The diagnostic is the line the code was found on."""
    match = _STATUS.search(text)
    code = ".".join(match.groups()) if match else None
    if match is None and (reply := _REPLY.search(text)):
        match, code = reply, f"{reply[1][0]}.0.0"
    if code is None or code.startswith("2"):
        return RecipientStatus(None, Action.FAILED, "4.0.0", NO_CODE)
    start = text.rfind("\n", 0, match.start()) + 1
    end = text.find("\n", match.end())
    line = text[start: end if end >= 0 else None]
    return RecipientStatus(None, Action.FAILED, code, remote_text(_text(line), limit=DIAGNOSTIC_LIMIT))


def _auto_reply(message: Message) -> bool:
    """An automatic answer (vacation, out of office) that came to the envelope sender: RFC 3834's
    Auto-Submitted: auto-replied, and the headers common responders set instead."""
    submitted = _text(message.get("Auto-Submitted")).lower()
    if submitted.startswith("auto-replied"):
        return True
    return any(message.get(h) is not None for h in ("X-Autoreply", "X-Autorespond")) or _text(message.get("Precedence")).lower() == "auto_reply"


def message_key(message: Message | None, data: bytes) -> str:
    """The message's own id: its Message-ID (receivers send a report once under one), else a hash of its bytes."""
    mid = _text(message.get("Message-ID")) if message is not None else ""
    if mid and len(mid) <= 500:
        return mid
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse(data: bytes) -> Report:
    """What a message that arrived at a bounce address says. Never raises: a message that cannot be
    read as mail is read as text."""
    try:
        message = email.message_from_bytes(data, policy=email.policy.compat32)
    except Exception as exc:  # noqa: BLE001 - any bytes are someone's mail; logged and read as text
        log.warning("a message could not be parsed as mail (%s); read as text", type(exc).__name__)
        text = data[:_TEXT_LIMIT].decode("utf-8", "replace")
        return Report(False, message_key(None, data), [_guess(text)], _ADDRESS.findall(text)[:50])
    key = message_key(message, data)
    for part in message.walk():
        if part.get_content_type() in _REPORT_TYPES:
            try:
                recipients = _from_dsn(part)
            except Exception as exc:  # noqa: BLE001 - a malformed report is read as text below
                log.warning("a delivery status part could not be read (%s: %s); read as text", type(exc).__name__, exc)
                break
            if recipients:
                return Report(True, key, recipients)
            break  # a report that names no recipient: read as text
    try:
        text = _plain_text(message)
    except Exception as exc:  # noqa: BLE001 - garbage in a part: the raw bytes as text
        log.warning("a bounce's text could not be decoded (%s); read as raw text", type(exc).__name__)
        text = data[:_TEXT_LIMIT].decode("utf-8", "replace")
    guess = _guess(text or _text(message.get("Subject")))
    # An automatic answer is one only if it carries no status code: servers mark bounces auto-replied too.
    auto_reply = _auto_reply(message) and guess.diagnostic == NO_CODE
    return Report(False, key, [guess], _ADDRESS.findall(text)[:50], auto_reply=auto_reply)


def sender_of(data: bytes) -> str | None:
    """The address in a message's From header (the first, if it names several), or None."""
    try:
        message = email.message_from_bytes(data, policy=email.policy.compat32)
        found = [address for _, address in getaddresses([str(v) for v in message.get_all("From", [])]) if "@" in address]
    except Exception as exc:  # noqa: BLE001 - an unreadable From names nobody; logged
        log.info("a From header could not be read (%s)", type(exc).__name__)
        return None
    return found[0] if found else None
