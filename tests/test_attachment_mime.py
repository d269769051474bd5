"""Attachments in the MIME message and through every driver: byte for byte, with their names, at a
real SMTP server, SendGrid's and Mailgun's fakes and moto's SES."""

from __future__ import annotations

import base64
import hashlib
import random
import struct
import zlib
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import boto3
import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.server import ThreadedMotoServer
from moto.ses.models import ses_backends

from devstack.net import free_port
from mailqueue.contracts import AttachmentRef, Content, EmailSpec
from mailqueue.drivers.mailgun import MailgunDriver
from mailqueue.drivers.sendgrid import SendGridDriver
from mailqueue.drivers.ses import SesDriver
from mailqueue.drivers.smtp import SmtpDriver
from mailqueue.errors import PermanentDeliveryError
from mailqueue.message import build_message, envelope
from tests.fake_providers import FakeMailgun, FakeSendGrid
from tests.helpers import SmtpSink, make_spec

SENDGRID_KEY = "SG.attachments-test-key"
MAILGUN_KEY = "key-mailgun-attachments"
AWS_KEY_ID, AWS_SECRET = "AKIATESTATTACH00", "aws-secret-attachments"

LOGO_CID = "logo.7f3a@mailqueue.test"
NON_ASCII_NAME = "Überweisung – März 2026 年.txt"
HTML = f'<p>Guten Tag,</p><p><img src="cid:{LOGO_CID}" alt="Logo"></p>\n'
TEXT = "Guten Tag,\nanbei die Unterlagen.\n"

Files = list[tuple[AttachmentRef, bytes]]
# (filename, content type, disposition, content id, sha256) of one file as it arrived
Arrived = tuple[str, str, str, str | None, str]


def png(width: int, height: int, rng: random.Random) -> bytes:
    """A valid RGB PNG of random pixels (they do not compress, so the size is about width*height*3)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + rng.randbytes(width * 3) for _ in range(height))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def ref(filename: str, content_type: str, data: bytes, **kw: Any) -> AttachmentRef:
    return AttachmentRef(blob_id=f"blob-{filename}", filename=filename, content_type=content_type, size=len(data),
                         sha256=hashlib.sha256(data).hexdigest(), **kw)


@pytest.fixture(scope="module")
def files() -> Files:
    """The acceptance email's files: a 10 MB PDF, a ~100 KB inline PNG and a text file with a
    non-ASCII name whose content has CRLF, a bare LF, a bare CR and UTF-8 bytes."""
    rng = random.Random(16)
    pdf = b"%PDF-1.7\n" + rng.randbytes(10 * 1024 * 1024) + b"\n%%EOF"
    logo = png(182, 182, rng)
    text = "Betrag: 1.234,56 €\r\nEmpfänger: Jürgen Groß – 年\r\nZeile ohne CR\nnur CR\rEnde ohne Zeilenende".encode()
    return [
        (ref("Rechnung 2026-03.pdf", "application/pdf", pdf), pdf),
        (ref("logo.png", "image/png", logo, disposition="inline", content_id=LOGO_CID), logo),
        (ref(NON_ASCII_NAME, "text/plain", text), text),
    ]


def acceptance_spec() -> EmailSpec:
    spec = make_spec(to=["Ann <ann@example.com>"], cc=["cc@example.com"], bcc=["hidden@example.com"])
    spec.content = Content(subject="Ihre Unterlagen", text=TEXT, html=HTML)
    return spec


def expected(files: Files) -> list[Arrived]:
    """In the order a reader walks the acceptance email: the inline logo beside the HTML first."""
    by_name = {r.filename: (r, hashlib.sha256(data).hexdigest()) for r, data in files}
    order = ["logo.png", "Rechnung 2026-03.pdf", NON_ASCII_NAME]
    return [(n, by_name[n][0].content_type, by_name[n][0].disposition, by_name[n][0].content_id, by_name[n][1]) for n in order]


def tree(part: EmailMessage) -> Any:
    """The message's MIME structure: a content type, or [multipart type, *children]."""
    if part.get_content_maintype() != "multipart":
        return part.get_content_type()
    return [part.get_content_type(), *(tree(p) for p in part.iter_parts())]  # type: ignore[arg-type]


def arrived(msg: EmailMessage) -> list[Arrived]:
    """Every part with a filename, decoded from its transfer encoding, in MIME order."""
    return [
        (part.get_filename() or "", part.get_content_type(), part.get_content_disposition() or "",
         str(part["Content-ID"]).strip("<>") if part["Content-ID"] else None,
         hashlib.sha256(part.get_payload(decode=True)).hexdigest())
        for part in msg.walk() if part.get_filename() is not None
    ]


ACCEPTANCE_TREE = [
    "multipart/mixed",
    ["multipart/alternative", "text/plain", ["multipart/related", "text/html", "image/png"]],
    "application/pdf",
    "text/plain",
]


def assert_the_acceptance_email(got: EmailMessage, files: Files) -> None:
    """Structure, every file's bytes by hash, exact names, and the logo's Content-ID the one the HTML names."""
    assert tree(got) == ACCEPTANCE_TREE
    assert arrived(got) == expected(files)
    related = got.get_payload()[0].get_payload()[1]  # type: ignore[index]
    html, logo = related.get_payload()
    assert unix(html.get_content()) == HTML and f'src="cid:{LOGO_CID}"' in HTML
    assert logo["Content-ID"] == f"<{LOGO_CID}>" and logo.get_content_disposition() == "inline"
    assert unix(got.get_body(("plain",)).get_content()) == TEXT  # type: ignore[union-attr]


def unix(text: str) -> str:
    """A text part's content with the wire's CRLF line ends as Python writes them (LF)."""
    return text.replace("\r\n", "\n")


def parsed(data: bytes | str) -> EmailMessage:
    return message_from_bytes(data.encode() if isinstance(data, str) else data, policy=policy.default)  # type: ignore[return-value]


# --- the acceptance email through each driver ----------------------------------------------------


def test_the_acceptance_email_is_built_as_documented(files: Files) -> None:
    msg = build_message(acceptance_spec(), acceptance_spec().content, files)  # type: ignore[arg-type]
    data = msg.as_bytes()
    assert_the_acceptance_email(parsed(data), files)
    # The non-ASCII name in RFC 2231 form (in continuations: it is long), and no line over SMTP's limit.
    assert b"filename*0*=utf-8''%C3%9Cberweisung%20%E2%80%93%20M%C3%A4rz%202026%20;\r\n filename*1*=%E5%B9%B4.txt" in data
    assert max(len(line) for line in data.split(b"\r\n")) <= 78
    assert "Bcc" not in msg and "hidden@example.com" not in data.decode("ascii")


async def test_the_acceptance_email_arrives_byte_for_byte_at_an_smtp_server(sink: SmtpSink, files: Files) -> None:
    spec = acceptance_spec()
    sender, recipients = envelope(spec)
    driver = SmtpDriver("127.0.0.1", sink.port, timeout=30)
    try:
        await driver.send(build_message(spec, spec.content, files), sender, recipients)  # type: ignore[arg-type]
    finally:
        await driver.aclose()
    [caught] = sink.messages
    assert sorted(caught.rcpt_tos) == ["ann@example.com", "cc@example.com", "hidden@example.com"]
    assert_the_acceptance_email(caught.message, files)


@pytest.fixture
def sendgrid() -> Iterator[FakeSendGrid]:
    with FakeSendGrid(SENDGRID_KEY) as fake:
        yield fake


@pytest.fixture
def mailgun() -> Iterator[FakeMailgun]:
    with FakeMailgun(MAILGUN_KEY, "mg.example.com") as fake:
        yield fake


async def test_the_acceptance_email_reaches_sendgrid_as_documented_attachments(sendgrid: FakeSendGrid, files: Files) -> None:
    spec = acceptance_spec()
    driver = SendGridDriver(SENDGRID_KEY, base_url=sendgrid.url, timeout=60)
    try:
        await driver.send(build_message(spec, spec.content, files), *envelope(spec))  # type: ignore[arg-type]
    finally:
        await driver.aclose()
    [got] = sendgrid.received
    body = got.json
    # The body is the email's text and HTML, never a file or the related container.
    assert body["content"] == [{"type": "text/plain", "value": TEXT}, {"type": "text/html", "value": HTML}]
    for attachment in body["attachments"]:
        assert set(attachment) <= {"content", "filename", "type", "disposition", "content_id"}
        assert base64.b64encode(base64.b64decode(attachment["content"], validate=True)).decode() == attachment["content"]
    assert [
        (a["filename"], a["type"], a["disposition"], a.get("content_id"), hashlib.sha256(base64.b64decode(a["content"])).hexdigest())
        for a in body["attachments"]
    ] == expected(files)
    assert "content_id" not in body["attachments"][1] and "content_id" not in body["attachments"][2]


async def test_the_acceptance_email_reaches_mailgun_whole(mailgun: FakeMailgun, files: Files) -> None:
    spec = acceptance_spec()
    msg = build_message(spec, spec.content, files)  # type: ignore[arg-type]
    driver = MailgunDriver(MAILGUN_KEY, "mg.example.com", base_url=mailgun.url, timeout=60)
    try:
        await driver.send(msg, *envelope(spec))
    finally:
        await driver.aclose()
    [got] = mailgun.received
    assert got.path == "/v3/mg.example.com/messages.mime" and got.headers["content-type"].startswith("multipart/form-data")
    assert sorted(got.form["to"]) == ["ann@example.com", "cc@example.com", "hidden@example.com"]
    assert got.mime is not None and got.mime["Message-ID"] == msg["Message-ID"]
    assert_the_acceptance_email(got.mime, files)


@pytest.fixture(scope="module")
def moto_ses() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client("sesv2", region_name="eu-west-1", endpoint_url=url, aws_access_key_id=AWS_KEY_ID,
                 aws_secret_access_key=AWS_SECRET).create_email_identity(EmailIdentity="sender@example.com")
    yield url
    server.stop()


async def test_the_acceptance_email_reaches_ses_as_the_raw_message(moto_ses: str, files: Files) -> None:
    spec = acceptance_spec()
    msg = build_message(spec, spec.content, files)  # type: ignore[arg-type]
    backend = ses_backends[DEFAULT_ACCOUNT_ID]["eu-west-1"]
    before = len(backend.sent_messages)
    delivery = await SesDriver(AWS_KEY_ID, AWS_SECRET, "eu-west-1", endpoint_url=moto_ses, timeout=60).send(msg, *envelope(spec))
    [sent] = backend.sent_messages[before:]
    assert delivery.provider_message_id == sent.id and sent.source == "sender@example.com"
    raw = sent.raw_data.encode() if isinstance(sent.raw_data, str) else sent.raw_data
    assert raw == msg.as_bytes()  # the whole MIME message, as built
    assert_the_acceptance_email(parsed(raw), files)


# --- structure ------------------------------------------------------------------------------------


@pytest.fixture
def small() -> dict[str, tuple[AttachmentRef, bytes]]:
    """Small files to arrange: two attachments, an inline image, an inline part without a content_id."""
    rng = random.Random(7)
    image = png(8, 8, rng)
    return {
        "a": (ref("a.pdf", "application/pdf", b"%PDF-1.4 a"), b"%PDF-1.4 a"),
        "b": (ref("b.csv", "text/csv", b"x;y\r\n1;2\r\n"), b"x;y\r\n1;2\r\n"),
        "img": (ref("img.png", "image/png", image, disposition="inline", content_id="img@x"), image),
        "nocid": (ref("nocid.png", "image/png", image, disposition="inline"), image),
    }


def built(files: Files, *, text: str | None = "Hi\n", html: str | None = '<img src="cid:img@x">\n') -> EmailMessage:
    spec = make_spec()
    return parsed(build_message(spec, Content(subject="s", text=text, html=html), files).as_bytes())


def test_attachments_only_follow_the_alternative_body_in_the_given_order(small: dict[str, Any]) -> None:
    msg = built([small["b"], small["a"]])
    assert tree(msg) == ["multipart/mixed", ["multipart/alternative", "text/plain", "text/html"], "text/csv", "application/pdf"]
    assert [f[0] for f in arrived(msg)] == ["b.csv", "a.pdf"]
    assert {f[2] for f in arrived(msg)} == {"attachment"}
    assert [part.get_payload(decode=True) for part in msg.iter_attachments()] == [small["b"][1], small["a"][1]]


def test_inline_only_is_related_to_the_html_with_no_mixed_part(small: dict[str, Any]) -> None:
    msg = built([small["img"]])
    assert tree(msg) == ["multipart/alternative", "text/plain", ["multipart/related", "text/html", "image/png"]]
    [(name, _, disposition, cid, digest)] = arrived(msg)
    assert (name, disposition, cid, digest) == ("img.png", "inline", "img@x", small["img"][0].sha256)


def test_an_html_only_email_relates_its_images_and_mixes_its_attachments(small: dict[str, Any]) -> None:
    msg = built([small["a"], small["img"]], text=None)
    assert tree(msg) == ["multipart/mixed", ["multipart/related", "text/html", "image/png"], "application/pdf"]
    assert unix(msg.get_body(("html",)).get_content()) == '<img src="cid:img@x">\n'  # type: ignore[union-attr]


def test_a_text_only_email_sends_inline_files_as_ordinary_attachments(small: dict[str, Any]) -> None:
    msg = built([small["img"], small["a"]], html=None)
    assert tree(msg) == ["multipart/mixed", "text/plain", "image/png", "application/pdf"]
    assert [(f[0], f[2], f[3]) for f in arrived(msg)] == [("img.png", "attachment", None), ("a.pdf", "attachment", None)]
    assert unix(msg.get_body(("plain",)).get_content()) == "Hi\n"  # type: ignore[union-attr]


def test_an_inline_file_without_a_content_id_is_an_ordinary_attachment(small: dict[str, Any]) -> None:
    msg = built([small["nocid"], small["img"]])
    assert tree(msg) == [
        "multipart/mixed", ["multipart/alternative", "text/plain", ["multipart/related", "text/html", "image/png"]], "image/png",
    ]
    assert [(f[0], f[2], f[3]) for f in arrived(msg)] == [("img.png", "inline", "img@x"), ("nocid.png", "attachment", None)]


def test_no_files_leaves_the_message_as_it_was() -> None:
    spec = make_spec()
    without, empty = build_message(spec, spec.content), build_message(spec, spec.content, [])  # type: ignore[arg-type]
    for msg in (without, empty):
        assert tree(parsed(msg.as_bytes())) == ["multipart/alternative", "text/plain", "text/html"]
        assert arrived(parsed(msg.as_bytes())) == []
    text_only = build_message(spec, Content(subject="s", text="Hi"), [])
    assert tree(parsed(text_only.as_bytes())) == "text/plain"


@pytest.mark.parametrize("name", [
    "ä" * 120 + ".pdf",  # long and not ASCII: RFC 2231 continuations
    "日本語のファイル名" * 12 + ".png",
    "a" * 200 + ".txt",  # long ASCII
    'quote " back\\slash; semi=colon (paren).txt',
    "x'y''z %41 *.txt",
    "tab\tinside.txt",
])
def test_filenames_come_back_exactly_from_a_standard_parser(name: str) -> None:
    data = "α\r\nβ".encode()
    spec = make_spec()
    written = build_message(spec, spec.content, [(ref(name, "text/plain", data), data)]).as_bytes()  # type: ignore[arg-type]
    [(got, _, _, _, digest)] = arrived(parsed(written))
    assert got == name and digest == hashlib.sha256(data).hexdigest()
    assert max(len(line) for line in written.split(b"\r\n")) <= 78


def test_a_text_files_charset_is_kept_and_its_bytes_untouched() -> None:
    data = "Grüße\r\nLatin-1 irrelevant\n".encode("latin-1", "replace")
    msg = built([(ref("l1.txt", "Text/Plain; charset=ISO-8859-1; name=other.txt", data), data)])
    [part] = msg.iter_attachments()
    assert part.get_content_type() == "text/plain" and part.get_param("charset") == "ISO-8859-1"
    assert part.get_filename() == "l1.txt" and part["Content-Transfer-Encoding"] == "base64"
    assert part.get_payload(decode=True) == data


def test_a_forwarded_message_file_goes_as_opaque_bytes() -> None:
    """A base64 message/rfc822 body would be parsed as MIME by readers (and dropped by Python's)."""
    data = b"From: a@example.com\r\nSubject: old\r\n\r\nbody\r\n"
    msg = built([(ref("old.eml", "message/rfc822", data), data)])
    [part] = msg.iter_attachments()
    assert part.get_content_type() == "application/octet-stream" and part.get_filename() == "old.eml"
    assert part.get_payload(decode=True) == data


@pytest.mark.parametrize(("change", "words"), [
    ({"filename": "a.txt\r\nBcc: victim@example.com"}, "CR or LF"),
    ({"filename": "a.txt\nContent-Type: text/html"}, "CR or LF"),
    ({"filename": "=?utf-8?q?a=0D=0ABcc:_victim@example.com?=.txt"}, "inside an encoded word"),
    ({"filename": "=?utf-8?q?harmless?=.txt"}, "would arrive as 'harmless.txt'"),
    ({"filename": "invoice\u202efdp.exe"}, "bidirectional"),
    ({"content_id": "img@x>\r\nBcc: victim@example.com"}, "cannot be a Content-ID"),
    ({"content_id": "img@x> <other@x"}, "cannot be a Content-ID"),
    ({"content_id": "a b@x"}, "cannot be a Content-ID"),
    ({"content_type": "image/png\r\nBcc: victim@example.com"}, "content type"),
    ({"content_type": "image/png; x=\"\r\nBcc: victim@example.com\""}, "content type"),
    ({"content_type": "no-slash"}, "content type"),
])
def test_a_header_injection_through_a_file_is_refused_not_written(change: dict[str, str], words: str) -> None:
    image = b"\x89PNG\r\n\x1a\nnot really"
    attachment = ref("img.png", "image/png", image, disposition="inline", content_id="img@x")
    for name, value in change.items():
        setattr(attachment, name, value)
    spec = make_spec()
    with pytest.raises(PermanentDeliveryError, match="attachment") as caught:
        build_message(spec, spec.content, [(attachment, image)])  # type: ignore[arg-type]
    assert words in str(caught.value)
