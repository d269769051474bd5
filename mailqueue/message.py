"""Turning an email spec and its rendered content into a MIME message, and what may go into its headers."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from email import message_from_string
from email.errors import MessageError
from email.message import EmailMessage, MIMEPart
from email.policy import SMTP
from email.policy import default as READER
from email.utils import formatdate, getaddresses

from mailqueue.contracts import AttachmentRef, Content, EmailSpec
from mailqueue.errors import PermanentDeliveryError

# --- what a sender may put into headers -------------------------------------------------------

# Headers a sender may give besides X-*: mailing-list headers (RFC 2369, 2919, 8058: unsubscribe
# links that mail clients show and bulk senders must give), threading (RFC 5322 In-Reply-To,
# References), informational fields (RFC 5322 Keywords, Comments) and auto-reply markers
# (RFC 3834 Auto-Submitted, Precedence). None of them says who sent the mail or how it travelled.
ALLOWED_HEADERS = (
    "List-Unsubscribe", "List-Unsubscribe-Post", "List-Id", "List-Help", "List-Subscribe", "List-Post",
    "List-Owner", "List-Archive", "In-Reply-To", "References", "Keywords", "Comments", "Auto-Submitted", "Precedence",
)
_ALLOWED = {h.lower() for h in ALLOWED_HEADERS}

# Set by mailqueue from the request's fields (or by MIME): the field to use instead, if any.
OWN_HEADERS = {
    "from": "from", "sender": "from", "reply-to": "reply_to", "to": "to", "cc": "cc", "bcc": "bcc", "subject": "subject",
    "date": None, "message-id": None, "mime-version": None,
}

# Never, not even as X-*: what receivers, filters and relays trust as evidence of who sent a mail,
# how it was checked and which way it came, and instructions to the relay's own account.
_REFUSED: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "an authentication or filtering result that only receiving and signing servers add",
        ("authentication-results", "dkim-signature", "domainkey-signature", "received-spf", "x-google-dkim-signature",
         "x-forefront-antispam-report", "x-authenticated-sender", "x-authenticated-user"),
        ("arc-", "x-ms-exchange-", "x-microsoft-antispam", "x-spam-", "x-virus-"),
    ),
    (
        "a trace header: only the servers a mail passes through add it",
        ("received", "return-path", "delivered-to", "envelope-to", "x-originating-ip", "x-received", "x-delivered-to",
         "x-apparently-to"),
        ("x-original-", "x-envelope-", "x-forwarded-"),
    ),
    ("a Resent-* header: mailqueue sends new mail only, it does not resend", (), ("resent-",)),
    (
        "an instruction to a relay provider's account (SendGrid, SES, Mailgun, Postmark, Mandrill, SparkPost, Mailjet)",
        ("x-smtpapi", "x-msys-api"),
        ("x-ses-", "x-mailgun-", "x-pm-", "x-mc-", "x-mj-"),
    ),
)

HEADERS_RULE = (
    "Custom headers: any X-* header, and " + ", ".join(ALLOWED_HEADERS) + ". Always refused, even as X-*: "
    "authentication and filtering results (Authentication-Results, ARC-*, DKIM-Signature, DomainKey-Signature, "
    "Received-SPF, X-Google-DKIM-Signature, X-MS-Exchange-*, X-Microsoft-Antispam*, X-Forefront-Antispam-Report, "
    "X-Spam-*, X-Virus-*, X-Authenticated-*), trace headers (Received, Return-Path, Delivered-To, Envelope-To, "
    "X-Original-*, X-Originating-IP, X-Received, X-Envelope-*, X-Forwarded-*, X-Delivered-To, X-Apparently-To), "
    "Resent-*, and relay-provider instructions (X-SMTPAPI, X-SES-*, X-Mailgun-*, X-PM-*, X-MC-*, X-MSYS-API, X-MJ-*). "
    "From, To, Subject and the other headers mailqueue sets come from their own fields."
)


def header_refusal(name: str) -> str | None:
    """Why a sender may not give a header of this name (None: they may)."""
    low = name.lower()
    for why, names, prefixes in _REFUSED:
        if low in names or low.startswith(prefixes):
            return f"header {name!r} is {why}; it cannot be given"
    if low in OWN_HEADERS or low.startswith("content-"):
        field = OWN_HEADERS.get(low)
        return f"header {name!r} is set by mailqueue and cannot be given" + (f"; use the `{field}` field" if field else "")
    if low.startswith("x-") or low in _ALLOWED:
        return None
    return f"header {name!r} is not allowed: give X-* headers, or one of {', '.join(ALLOWED_HEADERS)}"


# --- what header text may hold -----------------------------------------------------------------

# Bidirectional embeddings, overrides and isolates reorder the text around them: "Invoice<RLO>fdp.exe"
# shows as "Invoiceexe.pdf". The marks U+200E, U+200F and U+061C stay allowed: right-to-left
# languages need them, and they cannot reverse a run of text.
BIDI_CONTROLS = frozenset(map(chr, (*range(0x202A, 0x202F), *range(0x2066, 0x206A))))


def _character_problem(value: str) -> str | None:
    for ch in value:
        if ch in "\r\n":
            return "CR or LF characters"
        # Every control character but TAB, and the Unicode line and paragraph separators: Python's
        # email package breaks lines at VT, FF, FS, GS, RS, NEL, U+2028 and U+2029 as well.
        if (unicodedata.category(ch) == "Cc" and ch != "\t") or ch in "\u2028\u2029":
            return f"control or line-separator characters (U+{ord(ch):04X})"
        if ch in BIDI_CONTROLS:
            return f"bidirectional override or isolate characters (U+{ord(ch):04X} {unicodedata.name(ch)})"
    return None


def decoded_header(value: str) -> str:
    """A header value as mail programs show it: RFC 2047 encoded words (=?utf-8?b?...?=) decoded."""
    return str(SMTP.header_factory("subject", value))


def header_text_problem(value: str) -> str | None:
    """What makes `value` unfit for a header, as words ("CR or LF characters"), or None. Encoded
    words are decoded first: mail programs (and Python's email package, which writes the decoded
    text out again) would otherwise turn =?utf-8?q?=0D=0A...?= into a line break in the header."""
    problem = _character_problem(value)
    if problem is None and "=?" in value:
        try:
            decoded = decoded_header(value)
        except (MessageError, ValueError, LookupError):
            return "an encoded word (=?charset?...?=) that cannot be decoded"
        problem = _character_problem(decoded)
        if problem is not None:
            problem += " inside an encoded word (=?charset?...?=)"
    return problem


def bare_address(value: str) -> str:
    """"Ann <ann@example.com>" -> "ann@example.com"."""
    return getaddresses([value])[0][1]


def build_message(spec: EmailSpec, content: Content, files: Sequence[tuple[AttachmentRef, bytes]] = ()) -> EmailMessage:
    """The MIME message. PermanentDeliveryError when a header cannot be written safely: the same
    spec would fail the same way on every attempt (the API refuses such input at the door).

    `files` (each attachment with its bytes, already checked against its size and hash) go in
    base64 whatever their type, so they arrive byte for byte. Inline files sit beside the HTML in a
    multipart/related part, where the HTML's cid: links find them; other files follow the body in
    a multipart/mixed one, in the order given. An inline file the HTML cannot show (a text-only
    email, or no content_id) goes as an ordinary attachment rather than being refused: the
    recipient still gets it, and nothing else in the email depends on it."""
    msg = EmailMessage(policy=SMTP)
    headers = [("From", spec.from_address), ("To", ", ".join(spec.to))]
    if spec.cc:
        headers.append(("Cc", ", ".join(spec.cc)))
    if spec.reply_to:
        headers.append(("Reply-To", spec.reply_to))
    headers += [
        ("Subject", " ".join(content.subject.splitlines())),
        ("Date", formatdate(usegmt=True)),
        ("Message-ID", spec.message_id),
        *spec.headers.items(),
    ]
    for name, value in headers:
        try:
            msg[name] = value
            written = str(msg[name])  # parsed as it will be written: encoded words decoded
        except (MessageError, ValueError) as exc:
            raise PermanentDeliveryError(f"header {name} cannot be written: {exc}") from None
        if "\r" in written or "\n" in written:
            raise PermanentDeliveryError(f"header {name} would hold a line break (in an encoded word?)")
    if content.text is not None:
        msg.set_content(content.text)
        if content.html is not None:
            msg.add_alternative(content.html, subtype="html")
    else:
        msg.set_content(content.html or "", subtype="html")
    if files:
        _attach(msg, files, html_shown=content.html is not None)
    return msg


# --- attachments ---------------------------------------------------------------------------------

# RFC 6838 type and subtype names.
_TYPE_NAME = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
# What fits between the <> of a Content-ID: printable ASCII, no spaces, no angle brackets.
_CONTENT_ID = re.compile(r"[\x21-\x3b=\x3f-\x7e]{1,250}")
# RFC 2046 forbids base64 for message/* and multipart/*, and readers parse such a body as MIME
# (Python's email package drops a base64 message/rfc822 body): those files go as opaque bytes.
_PARSED_AS_MIME = ("message", "multipart")


def _attach(msg: EmailMessage, files: Sequence[tuple[AttachmentRef, bytes]], *, html_shown: bool) -> None:
    def in_html(ref: AttachmentRef) -> bool:
        return html_shown and ref.disposition == "inline" and bool(ref.content_id)

    inline = [(ref, data) for ref, data in files if in_html(ref)]
    listed = [(ref, data) for ref, data in files if not in_html(ref)]
    if inline:
        html = msg.get_body(("html",))
        assert html is not None  # build_message wrote it
        html.make_related()  # type: ignore[attr-defined]
        for ref, data in inline:
            html.attach(_file_part(ref, data, inline=True))
    if listed:
        msg.make_mixed()
        for ref, data in listed:
            msg.attach(_file_part(ref, data, inline=False))


def _file_part(ref: AttachmentRef, data: bytes, *, inline: bool) -> MIMEPart:
    """One file as a MIME part: base64, its type, Content-Disposition with its filename (RFC 2231
    when not ASCII, in continuations when long) and, inline, its Content-ID. PermanentDeliveryError
    when a reader of the written headers would not get back exactly this filename and Content-ID."""
    problem = header_text_problem(ref.filename)
    if problem is not None:
        raise PermanentDeliveryError(f"attachment filename {ref.filename!r} holds {problem}")
    cid = None
    if inline:
        if not _CONTENT_ID.fullmatch(ref.content_id or ""):
            raise PermanentDeliveryError(f"attachment {ref.filename!r}: content_id {ref.content_id!r} cannot be a Content-ID")
        cid = f"<{ref.content_id}>"
    maintype, subtype, params = _file_type(ref)
    part = MIMEPart(policy=SMTP)
    try:
        part.set_content(data, maintype, subtype, cte="base64", disposition="inline" if inline else "attachment",
                         filename=ref.filename, cid=cid, params=params)
    except (MessageError, ValueError) as exc:
        raise PermanentDeliveryError(f"attachment {ref.filename!r} cannot be written: {exc}") from None
    read = _headers_as_read(part)
    if read.get_filename() != ref.filename:
        raise PermanentDeliveryError(f"attachment filename {ref.filename!r} would arrive as {read.get_filename()!r}")
    if cid is not None and read["Content-ID"] != cid:
        raise PermanentDeliveryError(f"attachment {ref.filename!r}: Content-ID {cid} would arrive as {read['Content-ID']}")
    return part


def _file_type(ref: AttachmentRef) -> tuple[str, str, dict[str, str]]:
    """(maintype, subtype, params) to send the file with: its checked type, only a text type's
    charset kept (it tells readers how to show the bytes, which stay as they are)."""
    header = SMTP.header_factory("content-type", ref.content_type)
    maintype, subtype = header.maintype.lower(), header.subtype.lower()  # type: ignore[attr-defined]
    if header.defects or not (_TYPE_NAME.fullmatch(maintype) and _TYPE_NAME.fullmatch(subtype)):
        raise PermanentDeliveryError(f"attachment {ref.filename!r}: content type {ref.content_type!r} cannot be written")
    if maintype in _PARSED_AS_MIME:
        return "application", "octet-stream", {}
    charset = header.params.get("charset") if maintype == "text" else None  # type: ignore[attr-defined]
    if charset and _TYPE_NAME.fullmatch(charset.lower()):
        return maintype, subtype, {"charset": charset}
    return maintype, subtype, {}


def _headers_as_read(part: MIMEPart) -> EmailMessage:
    """The part's headers as a reader parses them from the lines that will be sent."""
    written = "".join(SMTP.fold(name, value) for name, value in part.items())
    return message_from_string(written + "\r\n", policy=READER)  # type: ignore[return-value]


def envelope(spec: EmailSpec) -> tuple[str, list[str]]:
    """(MAIL FROM, RCPT TO list): Bcc goes only here, never into the headers."""
    recipients = [bare_address(a) for a in (*spec.to, *spec.cc, *spec.bcc)]
    return bare_address(spec.from_address), list(dict.fromkeys(recipients))


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
