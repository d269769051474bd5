"""Attachments through the real stack: given inline (base64) or uploaded, stored by reference, sent
byte for byte, never in a workflow history; refused precisely at the door with nothing queued."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import boto3
import pytest
import sqlalchemy as sa
from moto.server import ThreadedMotoServer
from temporalio.client import Client

from devstack.net import free_port
from mailqueue.blobs import SqlBlobs, purge_blobs
from mailqueue.email_store import insert_email, record_from_spec
from mailqueue.models import Blob, BlobChunk, EmailAttachment
from tests.conftest import DnsStub, TemporalDevServer
from tests.helpers import Stack, closed_run, delivered, email, make_spec, new_user, running_stack, total_emails, wait_status

MB = 1024 * 1024


def png(size: int) -> bytes:
    """A valid PNG of about `size` bytes (random pixels barely compress)."""
    width = 256
    rows = max(1, size // (width * 3))
    raw = b"".join(b"\x00" + os.urandom(width * 3) for _ in range(rows))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, rows, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b"")


def pdf(size: int) -> bytes:
    return b"%PDF-1.7\n" + os.urandom(size) + b"\n%%EOF\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parts_by_name(message: EmailMessage) -> dict[str, EmailMessage]:
    return {p.get_filename(): p for p in message.walk() if p.get_filename()}


async def upload(http: Any, name: str, data: bytes, content_type: str | None = None) -> Any:
    return await http.post("/v1/uploads", files={"file": (name, data, content_type)} if content_type else {"file": (name, data)})


async def blob_count(sessions: Any) -> int:
    async with sessions() as session:
        return (await session.exec(sa.select(sa.func.count()).select_from(Blob))).one()[0]


# --- the acceptance email ----------------------------------------------------------------


async def test_a_10_mb_pdf_an_inline_png_and_a_non_ascii_name_arrive_byte_exact_and_no_bytes_reach_the_history(
    stack: Stack, client: Client, sessions: Any,
) -> None:
    report, logo, notes = pdf(10 * MB), png(100 * 1024), "Grüße aus Köln\r\nZeile 2 – ünïcödé\r\n".encode()
    notes_name = "Überweisung – März 2026 年.txt"
    got = await stack.http.post("/v1/emails", json=email(
        subject="Your report",
        html='<p>Report attached.</p><img src="cid:logo@mailqueue" alt="logo">',
        text="Report attached.",
        attachments=[
            {"filename": "report.pdf", "content_type": "application/pdf", "content": b64(report)},
            {"filename": "logo.png", "content": b64(logo), "disposition": "inline", "content_id": "logo@mailqueue"},
            {"filename": notes_name, "content_type": "text/plain", "content": b64(notes)},
        ],
    ))
    assert got.status_code == 202, got.text[:2000]
    email_id = got.json()["id"]
    record = await wait_status(stack.http, email_id, "sent")
    assert [(a["filename"], a["size"], a["sha256"], a["disposition"]) for a in record["attachments"]] == [
        ("report.pdf", len(report), sha(report), "attachment"),
        ("logo.png", len(logo), sha(logo), "inline"),
        (notes_name, len(notes), sha(notes), "attachment"),
    ]
    assert record["attachments"][1]["content_type"] == "image/png"  # sniffed: none was declared

    (caught,) = await delivered(stack.sink, email_id)
    message = caught.message
    parts = parts_by_name(message)
    assert set(parts) == {"report.pdf", "logo.png", notes_name}
    assert sha(parts["report.pdf"].get_payload(decode=True)) == sha(report)
    assert sha(parts["logo.png"].get_payload(decode=True)) == sha(logo)
    assert parts[notes_name].get_payload(decode=True) == notes
    assert parts["logo.png"]["Content-ID"] == "<logo@mailqueue>"
    related = [p for p in message.walk() if p.get_content_type() == "multipart/related"]
    assert related and parts["logo.png"] in related[0].get_payload()
    html = next(p for p in message.walk() if p.get_content_type() == "text/html")
    assert "cid:logo@mailqueue" in html.get_content() and html in related[0].get_payload()
    assert re.search(rb"filename\*(0\*)?=utf-8''%C3%9Cberweisung", caught.data)  # RFC 2231, in UTF-8

    history = await closed_run(client, email_id)
    size = sum(e.ByteSize() for e in history.events)
    assert size < 32 * 1024, f"the history is {size} bytes"
    assert len(report) > 300 * size  # the files (10 MB) stayed out of it


async def test_an_upload_is_attached_to_many_emails_by_id_and_only_by_its_owner(stack: Stack, sessions: Any) -> None:
    data = pdf(300 * 1024)
    async with new_user(stack, sessions) as ann, new_user(stack, sessions) as bob:
        up = await upload(ann.http, "../../etc/price list.pdf", data, "application/pdf")
        assert up.status_code == 201, up.text
        body = up.json()
        assert body["filename"] == "price list.pdf" and body["size"] == len(data) and body["sha256"] == sha(data)
        assert body["content_type"] == "application/pdf"
        assert datetime.fromisoformat(body["expires_at"]) > datetime.now(UTC) + timedelta(hours=100)
        upload_id = body["upload_id"]
        assert (await ann.http.get(f"/v1/uploads/{upload_id}")).json() == body
        assert (await bob.http.get(f"/v1/uploads/{upload_id}")).status_code == 404

        ids = []
        for name in ("prices-march.pdf", "prices-april.pdf"):
            sent = await ann.http.post("/v1/emails", json=ann.mail(attachments=[{"filename": name, "upload_id": upload_id}]))
            assert sent.status_code == 202, sent.text
            ids.append((sent.json()["id"], name))
        for email_id, name in ids:
            await wait_status(ann.http, email_id, "sent")
            (caught,) = await delivered(stack.sink, email_id)
            part = parts_by_name(caught.message)[name]
            assert part.get_payload(decode=True) == data and part.get_content_type() == "application/pdf"

        before = await total_emails(stack.http)
        stolen = await bob.http.post("/v1/emails", json=bob.mail(attachments=[{"filename": "x.pdf", "upload_id": upload_id}]))
        assert stolen.status_code == 422 and "no upload" in stolen.text and stolen.json()["detail"][0]["loc"][-1] == "upload_id"
        assert await total_emails(stack.http) == before


async def test_a_file_gone_from_the_store_fails_the_email_naming_it(stack: Stack, sessions: Any) -> None:
    """Never sent without its files: the email fails, and says which file."""
    got = await stack.http.post("/v1/emails", json=email(
        send_at=(datetime.now(UTC) + timedelta(seconds=3)).isoformat(),
        attachments=[{"filename": "gone.pdf", "content": b64(pdf(1000))}],
    ))
    assert got.status_code == 202, got.text
    email_id = got.json()["id"]
    async with sessions() as session:
        (blob_id,) = (await session.exec(sa.select(EmailAttachment.blob_id).where(EmailAttachment.email_id == email_id))).one()
        await session.exec(sa.delete(BlobChunk).where(BlobChunk.blob_id == blob_id))
        await session.commit()
    failed = await wait_status(stack.http, email_id, "failed")
    assert "gone.pdf" in failed["last_error"] and "no longer stored" in failed["last_error"]
    assert not [m for m in stack.sink.messages if email_id in str(m.message["Message-ID"])]


# --- refusals at the door ----------------------------------------------------------------


@pytest.fixture(scope="module")
async def small(
    client: Client, database_url: str, temporal_server: TemporalDevServer, tmp_path_factory: pytest.TempPathFactory, dns_stub: DnsStub,
) -> AsyncIterator[Stack]:
    """A stack with small limits: 100 KB a file, 150 KB an email, 3 files."""
    async with running_stack(
        client, database_url, temporal_server.address, dns_stub.server, tmp_path_factory.mktemp("small"), "small",
        attachment_max_bytes=100_000, attachments_max_total_bytes=150_000, attachments_max_count=3,
    ) as stack:
        yield stack


EXE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + bytes(48) + b"PE\x00\x00" + bytes(200)
REFUSED: list[tuple[str, list[dict[str, Any]], dict[str, Any], int, list[str]]] = [
    ("bad base64", [{"filename": "a.pdf", "content": "not*base64!"}], {}, 422, ["a.pdf", "base64"]),
    ("over a file's limit", [{"filename": "big.pdf", "content": b64(pdf(100_001))}], {}, 413, ["big.pdf", "per file"]),
    ("over an email's total", [{"filename": f"part{i}.pdf", "content": b64(pdf(60_000))} for i in range(3)], {}, 413, ["part2.pdf", "per email"]),
    ("too many", [{"filename": f"n{i}.txt", "content": b64(b"x")} for i in range(4)], {}, 422, ["4 attachments", "at most 3"]),
    ("an executable", [{"filename": "setup.exe", "content": b64(EXE)}], {}, 422, ["setup.exe"]),
    ("a script", [{"filename": "run.js", "content": b64(b"alert(1)")}], {}, 422, ["run.js"]),
    ("declared PDF, a PNG inside", [{"filename": "a.pdf", "content_type": "application/pdf", "content": b64(png(2000))}], {}, 422,
     ["a.pdf", "image/png"]),
    ("inline with no content_id", [{"filename": "l.png", "content": b64(png(500)), "disposition": "inline"}], {}, 422, ["l.png", "content_id"]),
    ("inline with no html", [{"filename": "l.png", "content": b64(png(500)), "disposition": "inline", "content_id": "l"}],
     {"html": None}, 422, ["l.png", "no html"]),
    ("content and upload_id", [{"filename": "a.txt", "content": b64(b"x"), "upload_id": "0b5b7e7e-3f7e-4c1e-9a55-1f0f2c3d4e5f"}], {}, 422,
     ["a.txt", "either"]),
    ("unknown upload", [{"filename": "a.txt", "upload_id": "0b5b7e7e-3f7e-4c1e-9a55-1f0f2c3d4e5f"}], {}, 422, ["no upload"]),
    ("nothing left of the name", [{"filename": "../..", "content": b64(b"x")}], {}, 422, ["filename"]),
]


@pytest.mark.parametrize(("files", "extra", "status", "words"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
async def test_bad_attachments_get_a_precise_4xx_and_nothing_is_queued_or_stored(
    small: Stack, sessions: Any, files: list[dict[str, Any]], extra: dict[str, Any], status: int, words: list[str],
) -> None:
    emails_before, blobs_before = await total_emails(small.http), await blob_count(sessions)
    got = await small.http.post("/v1/emails", json=email(attachments=files, **extra))
    assert got.status_code == status, got.text[:1000]
    for word in words:
        assert word in got.text, got.text[:1000]
    assert len(got.content) < 10_000  # the file is not echoed back
    batch = await small.http.post("/v1/emails/batch", json={"emails": [email(attachments=files, **extra), email()]})
    assert [i["status"] for i in batch.json()["items"]] == [status, 202]
    assert await total_emails(small.http) == emails_before + 1  # the batch's good one only
    assert await blob_count(sessions) == blobs_before


async def test_uploads_are_checked_like_attachments(small: Stack, sessions: Any) -> None:
    blobs_before = await blob_count(sessions)
    too_big = await upload(small.http, "huge.bin", os.urandom(100_001))
    assert too_big.status_code == 413 and "huge.bin" in too_big.text
    exe = await upload(small.http, "tool.exe", EXE)
    assert exe.status_code == 422 and "tool.exe" in exe.text
    liar = await upload(small.http, "photo.png", pdf(1000), "image/png")
    assert liar.status_code == 422 and "photo.png" in liar.text
    assert (await small.http.post("/v1/uploads", data={"x": "y"})).status_code == 422  # no file
    # Over the form's own limit: refused before it is read.
    over = await small.http.post("/v1/uploads", files={"file": ("x.bin", os.urandom(100_000 + 2 * MB))})
    assert over.status_code == 413
    assert await blob_count(sessions) == blobs_before


async def test_graphql_takes_attachments_and_refuses_bad_ones(small: Stack) -> None:
    mutation = """mutation($input: SendEmailInput!) { sendEmail(input: $input) { id } }"""
    base = {"to": ["ann@example.com"], "subject": "Hi", "text": "Hi"}
    good = {**base, "attachments": [{"filename": "a.txt", "content": b64(b"hello")}]}
    got = (await small.http.post("/graphql", json={"query": mutation, "variables": {"input": good}})).json()
    assert "errors" not in got, got
    record = await wait_status(small.http, got["data"]["sendEmail"]["id"], "sent")
    assert record["attachments"][0]["sha256"] == sha(b"hello")
    big = {**base, "attachments": [{"filename": "big.pdf", "content": b64(pdf(100_001))}]}
    refused = (await small.http.post("/graphql", json={"query": mutation, "variables": {"input": big}})).json()
    assert refused["errors"][0]["extensions"]["code"] == "PAYLOAD_TOO_LARGE" and "big.pdf" in refused["errors"][0]["message"]
    bad = {**base, "attachments": [{"filename": "b.pdf", "content": "***"}]}
    refused = (await small.http.post("/graphql", json={"query": mutation, "variables": {"input": bad}})).json()
    assert refused["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT" and "base64" in refused["errors"][0]["message"]


# --- S3 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def s3_stack(
    client: Client, database_url: str, temporal_server: TemporalDevServer, tmp_path_factory: pytest.TempPathFactory,
    dns_stub: DnsStub, moto_s3: str,
) -> AsyncIterator[tuple[Stack, Any]]:
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "eu-west-1"}
    saved = {k: os.environ.get(k) for k in aws}
    os.environ.update(aws)  # boto3's own chain, in this process (the worker) and the API's
    s3 = boto3.client("s3", endpoint_url=moto_s3, region_name="eu-west-1")
    s3.create_bucket(Bucket="mail-blobs", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    try:
        async with running_stack(
            client, database_url, temporal_server.address, dns_stub.server, tmp_path_factory.mktemp("s3"), "s3",
            blob_url="s3://mail-blobs/attachments", s3_endpoint_url=moto_s3, s3_region="eu-west-1",
        ) as stack:
            yield stack, s3
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


async def test_with_an_s3_store_the_bytes_live_in_the_bucket_and_arrive_byte_exact(s3_stack: tuple[Stack, Any], sessions: Any) -> None:
    stack, s3 = s3_stack
    inline, uploaded = pdf(2 * MB), png(50_000)
    up = await upload(stack.http, "chart.png", uploaded)
    assert up.status_code == 201, up.text
    got = await stack.http.post("/v1/emails", json=email(attachments=[
        {"filename": "q3.pdf", "content": b64(inline)},
        {"filename": "chart.png", "upload_id": up.json()["upload_id"], "disposition": "inline", "content_id": "chart"},
    ], html='<img src="cid:chart">'))
    assert got.status_code == 202, got.text
    email_id = got.json()["id"]
    await wait_status(stack.http, email_id, "sent")
    (caught,) = await delivered(stack.sink, email_id)
    parts = parts_by_name(caught.message)
    assert parts["q3.pdf"].get_payload(decode=True) == inline and parts["chart.png"].get_payload(decode=True) == uploaded

    async with sessions() as session:
        ids = (await session.exec(sa.select(EmailAttachment.blob_id).where(EmailAttachment.email_id == email_id)
                                  .order_by(EmailAttachment.position))).all()
        ids = [row[0] for row in ids]
        chunks = (await session.exec(sa.select(sa.func.count()).select_from(BlobChunk).where(BlobChunk.blob_id.in_(ids)))).one()[0]
        storages = {row[0] for row in (await session.exec(sa.select(Blob.storage).where(Blob.id.in_(ids)))).all()}
    assert chunks == 0 and storages == {"s3"}
    stored = [s3.get_object(Bucket="mail-blobs", Key=f"attachments/{blob_id}")["Body"].read() for blob_id in ids]
    assert stored == [inline, uploaded]


# --- blob lifetime ---------------------------------------------------------------------------


async def test_purge_removes_only_blobs_no_email_names_and_none_still_attachable(sessions: Any) -> None:
    """What retention will call after removing final emails: a blob an email still names stays, an
    upload stays until it expires, and the database itself refuses to drop a named blob."""
    store, now = SqlBlobs(), datetime.now(UTC)
    names = {}

    async with sessions() as session:
        def blob(label: str, expires: datetime | None) -> Blob:
            names[label] = f"{label}-{os.urandom(6).hex()}"[:36]
            return Blob(id=names[label], owner_type="system", size=1, sha256=sha(b"x"), content_type="text/plain",
                        filename=f"{label}.txt", expires_at=expires)

        session.add_all([blob("named", None), blob("orphan", None), blob("expired", now - timedelta(hours=1)),
                         blob("fresh", now + timedelta(hours=1))])
        await session.flush()
        for label in names:
            await store.put(session, names[label], b"x")
        spec = make_spec()
        record = record_from_spec(spec)
        record.attachments = [{"blob_id": names["named"], "filename": "named.txt", "content_type": "text/plain", "size": 1,
                               "sha256": sha(b"x"), "disposition": "attachment", "content_id": None}]
        await insert_email(session, record)
        await session.commit()

    async with sessions() as session:
        while await purge_blobs(session, store, now, limit=1000):
            pass
        left = {row[0] for row in (await session.exec(sa.select(Blob.id).where(Blob.id.in_(list(names.values()))))).all()}
        assert left == {names["named"], names["fresh"]}
        assert await store.get(session, names["named"]) == b"x" and await store.get(session, names["orphan"]) is None
        with pytest.raises(sa.exc.IntegrityError):  # named by an email: the foreign key keeps it
            await session.exec(sa.delete(Blob).where(Blob.id == names["named"]))
            await session.commit()
        await session.rollback()
        await session.exec(sa.delete(type(record)).where(type(record).id == spec.email_id))  # the email purged
        await session.commit()
        assert await purge_blobs(session, store, now, limit=1000) >= 1
        assert (await session.exec(sa.select(Blob.id).where(Blob.id == names["named"]))).first() is None
