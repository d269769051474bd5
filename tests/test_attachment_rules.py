"""The rules an attachment passes before it is stored (mailqueue/attachments.py): filenames, content
ids, the content type against the content, and executables and scripts. Pure functions, real file
headers made here byte by byte."""

from __future__ import annotations

import gzip
import io
import re
import struct
import unicodedata
import wave
import zipfile
import zlib

import pytest

from mailqueue import attachments
from mailqueue.attachments import (
    ATTACHMENT_RULES,
    DANGEROUS_EXTENSIONS,
    SNIFF_BYTES,
    AttachmentRefused,
    checked_type,
    clean_filename,
    content_id_problem,
)

DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
ODT = "application/vnd.oasis.opendocument.text"
SETTING = "MAILQUEUE_ATTACHMENT_ALLOWED_TYPES"


# --- real, tiny files ---------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(*, animated: bool = False) -> bytes:
    """A 1x1 greyscale PNG; with an acTL chunk it is an animated PNG of one frame."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
    animation = _png_chunk(b"acTL", struct.pack(">II", 1, 0)) if animated else b""
    return b"\x89PNG\r\n\x1a\n" + header + animation + _png_chunk(b"IDAT", zlib.compress(b"\x00\x00")) + _png_chunk(b"IEND", b"")


def _zip(*entries: tuple[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, text in entries:
            # ODF and EPUB want their first entry, "mimetype", stored as is.
            archive.writestr(name, text, compress_type=zipfile.ZIP_STORED if name == "mimetype" else zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def _wav() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x00" * 8)
    return buf.getvalue()


def _pe() -> bytes:
    """A DOS header pointing at a PE header for x86-64, as in every Windows .exe and .dll."""
    dos = bytearray(64)
    dos[0:2] = b"MZ"
    dos[2:4] = b"\x90\x00"
    dos[0x3C:0x40] = struct.pack("<I", 64)
    return bytes(dos) + b"PE\x00\x00" + struct.pack("<HH", 0x8664, 1) + bytes(16)


PNG = _png()
APNG = _png(animated=True)
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"
GIF = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"
PDF = b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
ZIP = _zip(("notes.txt", "hello"))
DOCX_FILE = _zip(("[Content_Types].xml", "<Types/>"), ("_rels/.rels", "<Relationships/>"), ("word/document.xml", "<w:document/>"))
XLSX_FILE = _zip(("[Content_Types].xml", "<Types/>"), ("xl/workbook.xml", "<workbook/>"))
ODT_FILE = _zip(("mimetype", ODT), ("content.xml", "<office:document-content/>"))
EPUB_FILE = _zip(("mimetype", "application/epub+zip"), ("META-INF/container.xml", "<container/>"))
GZIP = gzip.compress(b"name,amount\nann,1\n")
WAV = _wav()
PE = _pe()
ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + struct.pack("<HHI", 2, 0x3E, 1) + bytes(48)
MACH_O = struct.pack("<IiiI", 0xFEEDFACF, 0x01000007, 3, 2) + bytes(24)
MACH_O_UNIVERSAL = struct.pack(">II", 0xCAFEBABE, 2) + bytes(40)
JAVA_CLASS = struct.pack(">IHH", 0xCAFEBABE, 0, 65) + bytes(16)


# --- filenames ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\x\\y.txt", "y.txt"),
        ("a/b/c.pdf", "c.pdf"),
        ("C:y.txt", "y.txt"),
        ("\\\\server\\share\\report.pdf", "report.pdf"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("report\r\nBcc: x.pdf", "reportBcc_ x.pdf"),
        ("a\x00b.txt", "ab.txt"),
        ("tab\there.txt", "tabhere.txt"),
        ("bell\x07 del\x7f nel\x85.txt", "bell del nel.txt"),
        ("line\u2028para\u2029.txt", "linepara.txt"),
        ("Invoice\u202efdp.exe", "Invoicefdp.exe"),
        ("a\u2066b\u2069c\u202ad.txt", "abcd.txt"),
        ("lone\ud800surrogate.txt", "lonesurrogate.txt"),
        ('what<is>this:"x"|y?*.txt', "what_is_this__x__y__.txt"),
        ("  .hidden.txt. ", "hidden.txt"),
        ("...report.pdf...", "report.pdf"),
        ("nul.txt", "_nul.txt"),
        ("CON", "_CON"),
        ("com1.log", "_com1.log"),
        ("console.txt", "console.txt"),
        ("Résumé – 2026 年.pdf", "Résumé – 2026 年.pdf"),
        ("\u200fשלום.pdf", "\u200fשלום.pdf"),  # a right-to-left mark cannot reverse text: kept
        ("plain name.pdf", "plain name.pdf"),
    ],
)
def test_clean_filename_keeps_only_a_safe_last_name(given: str, sent: str) -> None:
    assert clean_filename(given) == sent


def test_clean_filename_composes_decomposed_accents() -> None:
    decomposed = "Re\u0301sume\u0301.pdf"
    assert clean_filename(decomposed) == "R\u00e9sum\u00e9.pdf"
    assert unicodedata.is_normalized("NFC", clean_filename(decomposed))


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("a" * 300 + ".pdf", "a" * 251 + ".pdf"),
        ("é" * 300 + ".pdf", "é" * 125 + ".pdf"),  # 2-byte characters are never split: 254 bytes
        ("年" * 100 + ".docx", "年" * 83 + ".docx"),
        ("x" * 300, "x" * 255),
        ("a" * 300 + ". Smith and sons", "a" * 255),  # ". Smith and sons" is no extension
        ("b" * 250 + "   c" * 5 + ".txt", "b" * 250 + ".txt"),  # no trailing spaces before the extension
    ],
)
def test_clean_filename_shortens_to_255_bytes_keeping_the_extension(given: str, sent: str) -> None:
    assert clean_filename(given) == sent
    assert len(sent.encode()) <= 255


@pytest.mark.parametrize("given", ["", ".", "..", "...", "   ", "/", "a/", "C:", "C:\\", "\x00\x01", "\u202e", ". .", "\r\n"])
def test_clean_filename_refuses_names_with_nothing_left(given: str) -> None:
    with pytest.raises(AttachmentRefused) as refused:
        clean_filename(given)
    assert str(refused.value) == (
        f"filename {given!r} has nothing left once path parts, unsafe characters and surrounding dots are removed"
    )


def test_a_bidi_disguised_executable_is_refused_once_cleaned() -> None:
    name = clean_filename("Invoice\u202efdp.exe")  # shows as "Invoiceexe.pdf"
    with pytest.raises(AttachmentRefused) as refused:
        checked_type(name, "application/pdf", PDF)
    assert str(refused.value) == (
        "file 'Invoicefdp.exe' is an executable (.exe): executables and scripts are refused; "
        f"an operator can allow .exe with {SETTING}"
    )


# --- content ids --------------------------------------------------------------------------------


@pytest.mark.parametrize("cid", ["logo", "logo@example.com", "part1.2b3c$x_y-z+w", "a" * 250, "!", "~"])
def test_content_id_accepts_printable_ascii(cid: str) -> None:
    assert content_id_problem(cid) is None


@pytest.mark.parametrize(
    ("cid", "problem"),
    [
        ("", "content_id is empty"),
        ("a" * 251, "content_id is longer than 250 characters"),
        ("a b", "content_id 'a b' holds ' ': only printable ASCII characters without spaces are allowed"),
        ("a\tb", "content_id 'a\\tb' holds '\\t': only printable ASCII characters without spaces are allowed"),
        ("a\r\nb", "content_id 'a\\r\\nb' holds '\\r': only printable ASCII characters without spaces are allowed"),
        ("lögo", "content_id 'lögo' holds 'ö': only printable ASCII characters without spaces are allowed"),
        ("<logo>", "content_id '<logo>' holds '<'; give the id without <> and without quotes, backslashes or parentheses"),
        ("logo>", "content_id 'logo>' holds '>'; give the id without <> and without quotes, backslashes or parentheses"),
        ('a"b', "content_id 'a\"b' holds '\"'; give the id without <> and without quotes, backslashes or parentheses"),
        ("a'b", "content_id \"a'b\" holds \"'\"; give the id without <> and without quotes, backslashes or parentheses"),
        ("a\\b", "content_id 'a\\\\b' holds '\\\\'; give the id without <> and without quotes, backslashes or parentheses"),
        ("a(b)", "content_id 'a(b)' holds '('; give the id without <> and without quotes, backslashes or parentheses"),
    ],
)
def test_content_id_problem_says_what_is_wrong(cid: str, problem: str) -> None:
    assert content_id_problem(cid) == problem


# --- the type against the content ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "declared", "head", "sent_as"),
    [
        ("logo.png", "image/png", PNG, "image/png"),
        ("logo.png", "IMAGE/PNG; name=logo.png", PNG, "image/png"),
        ("anim.png", "image/png", APNG, "image/png"),  # an animated PNG is a PNG
        ("photo.jpg", "image/jpeg", JPEG, "image/jpeg"),
        ("photo.jpg", "image/jpg", JPEG, "image/jpeg"),
        ("photo.jpg", "image/pjpeg", JPEG, "image/jpeg"),
        ("a.gif", "image/gif", GIF, "image/gif"),
        ("r.pdf", "application/pdf", PDF, "application/pdf"),
        ("r.pdf", "application/x-pdf", PDF, "application/pdf"),
        ("a.zip", "application/zip", ZIP, "application/zip"),
        ("a.zip", "application/x-zip-compressed", ZIP, "application/zip"),
        ("d.docx", DOCX, DOCX_FILE, DOCX),
        ("d.docx", DOCX, ZIP, DOCX),  # the sniffer sees only a ZIP: a .docx is one
        ("d.zip", "application/zip", DOCX_FILE, "application/zip"),  # and the reverse
        ("t.odt", ODT, ODT_FILE, ODT),
        ("book.epub", "application/epub+zip", EPUB_FILE, "application/epub+zip"),
        ("book.epub", "application/epub+zip", ZIP, "application/epub+zip"),
        ("s.wav", "audio/x-wav", WAV, "audio/wav"),
        ("s.wav", "audio/wav", WAV, "audio/wav"),
        ("a.csv.gz", "application/x-gzip", GZIP, "application/gzip"),
        ("notes.txt", "text/plain", b"hello\n", "text/plain"),
        ("notes.txt", "text/plain; charset=utf-8", "héllo wörld\n".encode(), "text/plain"),
        ("notes.txt", "text/plain", b"", "text/plain"),
        # Text whose first letters spell a short magic number is still text.
        ("cars.csv", "text/csv", b"BMW,Audi\n1,2\n", "text/csv"),
        ("readme.txt", "text/plain", b"MZ is a postcode area\n", "text/plain"),
        ("tags.txt", "text/plain", b"ID3 tags and FWS notes\n", "text/plain"),
        ("table.xls", "application/vnd.ms-excel", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600), "application/vnd.ms-excel"),
    ],
)
def test_a_declared_type_that_agrees_with_the_content_is_sent(filename: str, declared: str, head: bytes, sent_as: str) -> None:
    assert checked_type(filename, declared, head) == sent_as


@pytest.mark.parametrize(
    ("filename", "declared", "head", "refusal"),
    [
        ("x.pdf", "application/pdf", PNG, "file 'x.pdf' is declared application/pdf but its content is image/png"),
        ("photo.jpg", "image/jpeg", PNG, "file 'photo.jpg' is declared image/jpeg but its content is image/png"),
        ("notes.txt", "text/plain", PNG, "file 'notes.txt' is declared text/plain but its content is image/png"),
        ("a.zip", "application/zip", PDF, "file 'a.zip' is declared application/zip but its content is application/pdf"),
        ("d.docx", DOCX, XLSX_FILE, f"file 'd.docx' is declared {DOCX} but its content is {XLSX}"),
        ("t.odt", ODT, EPUB_FILE, f"file 't.odt' is declared {ODT} but its content is application/epub+zip"),
        ("s.wav", "audio/wav", GZIP, "file 's.wav' is declared audio/wav but its content is application/gzip"),
        ("x.png", "image/png", b"hello", "file 'x.png' is declared image/png but its content is not a PNG image"),
        ("x.png", "image/png", b"", "file 'x.png' is declared image/png but its content is not a PNG image"),
        ("r.pdf", "application/pdf", b"just text\n", "file 'r.pdf' is declared application/pdf but its content is not a PDF document"),
        ("a.gz", "application/gzip", b"text\n", "file 'a.gz' is declared application/gzip but its content is not a gzip file"),
        ("d.docx", DOCX, b"plain text\n", f"file 'd.docx' is declared {DOCX} but its content is not a ZIP archive"),
        ("a.zip", "application/zip", b"PK but not\n", "file 'a.zip' is declared application/zip but its content is not a ZIP archive"),
    ],
)
def test_a_declared_type_the_content_contradicts_is_refused(filename: str, declared: str, head: bytes, refusal: str) -> None:
    with pytest.raises(AttachmentRefused) as refused:
        checked_type(filename, declared, head)
    assert str(refused.value) == refusal


@pytest.mark.parametrize(
    ("filename", "head", "sent_as"),
    [
        ("x.bin", PNG, "image/png"),
        ("x.pdf", PDF, "application/pdf"),
        ("d.docx", DOCX_FILE, DOCX),
        ("x.bin", b"\x01\x02\x03 unknown", "application/octet-stream"),
        ("x.pdf", b"not a pdf\n", "application/octet-stream"),  # the caller said it does not know
    ],
)
def test_declared_octet_stream_takes_the_sniffed_type(filename: str, head: bytes, sent_as: str) -> None:
    assert checked_type(filename, "application/octet-stream", head) == sent_as


@pytest.mark.parametrize(
    ("filename", "head", "sent_as"),
    [
        ("report.pdf", PDF, "application/pdf"),
        ("REPORT.PDF", PDF, "application/pdf"),
        ("notes.txt", b"hi\n", "text/plain"),
        ("data.csv", b"a,b\n1,2\n", "text/csv"),
        ("page.html", b"<p>hi</p>", "text/html"),
        ("d.docx", DOCX_FILE, DOCX),
        ("d.docx", ZIP, DOCX),
        ("sheet.xlsx", XLSX_FILE, XLSX),
        ("t.odt", ODT_FILE, ODT),
        ("archive.tar.gz", GZIP, "application/gzip"),
        ("song.wav", WAV, "audio/wav"),
        ("icon.ico", b"\x00\x00\x01\x00\x01\x00\x10\x10", "image/vnd.microsoft.icon"),
        ("logo", PNG, "image/png"),  # no extension: the content says
        ("logo.unknownext", PNG, "image/png"),
        ("mystery.xyz", b"what is this\n", "application/octet-stream"),
        ("mystery", b"\x01\x02\x03", "application/octet-stream"),
    ],
)
def test_without_a_declared_type_the_extension_then_the_content_decides(filename: str, head: bytes, sent_as: str) -> None:
    assert checked_type(filename, None, head) == sent_as


@pytest.mark.parametrize(
    ("filename", "head", "refusal"),
    [
        ("photo.pdf", PNG, "file 'photo.pdf' is named like application/pdf (.pdf) but its content is image/png"),
        ("logo.png", b"text\n", "file 'logo.png' is named like image/png (.png) but its content is not a PNG image"),
        ("d.docx", XLSX_FILE, f"file 'd.docx' is named like {DOCX} (.docx) but its content is {XLSX}"),
    ],
)
def test_a_guessed_type_the_content_contradicts_is_refused(filename: str, head: bytes, refusal: str) -> None:
    with pytest.raises(AttachmentRefused) as refused:
        checked_type(filename, None, head)
    assert str(refused.value) == refusal


@pytest.mark.parametrize(
    ("declared", "refusal"),
    [
        ("pdf", "file 'a.pdf' has content_type 'pdf', which is not a type/subtype"),
        ("", "file 'a.pdf' has content_type '', which is not a type/subtype"),
        ("image/*", "file 'a.pdf' has content_type 'image/*', which is not a type/subtype"),
        ("/pdf", "file 'a.pdf' has content_type '/pdf', which is not a type/subtype"),
        ("application/", "file 'a.pdf' has content_type 'application/', which is not a type/subtype"),
        ("application pdf", "file 'a.pdf' has content_type 'application pdf', which is not a type/subtype"),
        ("application/pdf\r\nBcc: x", "file 'a.pdf' has content_type 'application/pdf\\r\\nBcc: x', which is not a type/subtype"),
        ("applicätion/pdf", "file 'a.pdf' has content_type 'applicätion/pdf', which is not a type/subtype"),
        ("multipart/mixed", "file 'a.pdf' has content_type 'multipart/mixed': a multipart type cannot be a file's type"),
    ],
)
def test_a_malformed_declared_type_is_refused(declared: str, refusal: str) -> None:
    with pytest.raises(AttachmentRefused) as refused:
        checked_type("a.pdf", declared, PDF)
    assert str(refused.value) == refusal


def test_only_the_first_sniff_bytes_are_read() -> None:
    assert checked_type("notes.txt", "text/plain", b"a" * SNIFF_BYTES + PE) == "text/plain"
    assert checked_type("d.docx", DOCX, DOCX_FILE + b"\x00" * SNIFF_BYTES) == DOCX


# --- executables and scripts --------------------------------------------------------------------


def _executables_refusal(filename: str, what: str, entry: str) -> str:
    return f"file {filename!r} {what}: executables and scripts are refused; an operator can allow {entry} with {SETTING}"


@pytest.mark.parametrize(
    ("filename", "extension", "kind"),
    [
        ("setup.exe", ".exe", "an executable"),
        ("SETUP.EXE", ".exe", "an executable"),
        ("invoice.pdf.exe", ".exe", "an executable"),
        ("setup.exe. ", ".exe", "an executable"),  # Windows drops the trailing dot and space
        ("screensaver.scr", ".scr", "an executable"),
        ("lib.dll", ".dll", "an executable"),
        ("tool.jar", ".jar", "an executable"),
        ("install.msi", ".msi", "an installer"),
        ("app.apk", ".apk", "an installer"),
        ("run.bat", ".bat", "a script"),
        ("run.cmd", ".cmd", "a script"),
        ("app.js", ".js", "a script"),
        ("macro.vbs", ".vbs", "a script"),
        ("page.hta", ".hta", "a script"),
        ("task.ps1", ".ps1", "a script"),
        ("keys.reg", ".reg", "a script"),
        ("deploy.sh", ".sh", "a script"),
        ("link.lnk", ".lnk", "a shortcut"),
        ("disk.iso", ".iso", "a disk image"),
        ("disk.dmg", ".dmg", "a disk image"),
        (".exe", ".exe", "an executable"),
    ],
)
def test_a_dangerous_extension_is_refused_naming_the_file(filename: str, extension: str, kind: str) -> None:
    with pytest.raises(AttachmentRefused) as refused:
        checked_type(filename, None, b"harmless text\n")
    assert str(refused.value) == _executables_refusal(filename, f"is {kind} ({extension})", extension)


def test_the_setup_exe_refusal_reads_as_documented() -> None:
    with pytest.raises(AttachmentRefused) as refused:
        checked_type("setup.exe", None, b"")
    assert str(refused.value) == (
        "file 'setup.exe' is an executable (.exe): executables and scripts are refused; "
        "an operator can allow .exe with MAILQUEUE_ATTACHMENT_ALLOWED_TYPES"
    )


@pytest.mark.parametrize(
    ("filename", "allowed", "head", "sent_as"),
    [
        ("app.js", [".js"], b"alert(1)\n", "text/javascript"),
        ("app.js", [".JS"], b"alert(1)\n", "text/javascript"),
        ("run.bat", ["bat"], b"@echo off\r\n", "text/plain"),
        ("deploy.sh", [".sh", ".js"], b"#!/bin/sh\necho hi\n", "application/x-sh"),
        ("disk.iso", [".iso"], b"\x01\x02\x03", "application/octet-stream"),
    ],
)
def test_an_allowed_extension_lifts_the_extension_rule(filename: str, allowed: list[str], head: bytes, sent_as: str) -> None:
    assert checked_type(filename, None, head, allowed=allowed) == sent_as


@pytest.mark.parametrize("allowed", [["text/javascript"], [".vbs"], ["application/x-msdownload"]])
def test_other_entries_do_not_lift_the_extension_rule(allowed: list[str]) -> None:
    with pytest.raises(AttachmentRefused) as refused:
        checked_type("app.js", None, b"alert(1)\n", allowed=allowed)
    assert str(refused.value) == _executables_refusal("app.js", "is a script (.js)", ".js")


@pytest.mark.parametrize(
    ("declared", "named_as", "head"),
    [
        ("application/x-msdownload", "application/x-msdownload", b"text\n"),
        ("application/x-msdos-program", "application/x-msdownload", b"text\n"),
        ("application/vnd.microsoft.portable-executable", "application/x-msdownload", b"text\n"),
        ("application/javascript", "text/javascript", b"alert(1)\n"),
        ("text/javascript", "text/javascript", b"alert(1)\n"),
        ("Application/X-JavaScript", "text/javascript", b"alert(1)\n"),
        ("application/x-sh", "application/x-sh", b"echo hi\n"),
        ("text/vbscript", "text/vbscript", b"MsgBox 1\n"),
        ("application/hta", "application/hta", b"<html/>\n"),
        ("application/x-ms-installer", "application/x-ms-installer", b"text\n"),
        ("application/java-archive", "application/java-archive", ZIP),
        ("application/x-executable", "application/x-executable", b"text\n"),
    ],
)
def test_a_dangerous_declared_type_is_refused_and_allowing_it_lifts_that_rule(declared: str, named_as: str, head: bytes) -> None:
    with pytest.raises(AttachmentRefused) as refused:
        checked_type("notes.txt", declared, head)
    assert str(refused.value) == _executables_refusal(
        "notes.txt", f"is declared {named_as}, a type of executable or script", named_as
    )
    assert checked_type("notes.txt", declared, head, allowed=[declared.upper()]) == named_as
    assert checked_type("notes.txt", declared, head, allowed=[named_as]) == named_as


def test_an_allowed_extension_does_not_lift_the_declared_type_rule() -> None:
    with pytest.raises(AttachmentRefused) as refused:
        checked_type("app.js", "text/javascript", b"alert(1)\n", allowed=[".js"])
    assert str(refused.value) == _executables_refusal(
        "app.js", "is declared text/javascript, a type of executable or script", "text/javascript"
    )


@pytest.mark.parametrize(
    ("head", "program"),
    [
        (PE, "application/x-msdownload"),
        (ELF, "application/x-executable"),
        (MACH_O, "application/x-mach-binary"),
        (MACH_O_UNIVERSAL, "application/x-mach-binary"),
        (JAVA_CLASS, "application/java-vm"),
    ],
)
@pytest.mark.parametrize(("filename", "declared"), [("report.pdf", "application/pdf"), ("data.bin", None), ("x.bin", "application/octet-stream")])
def test_program_content_is_refused_whatever_the_name_or_declared_type(
    head: bytes, program: str, filename: str, declared: str | None
) -> None:
    with pytest.raises(AttachmentRefused) as refused:
        checked_type(filename, declared, head)
    assert str(refused.value) == _executables_refusal(filename, f"holds a program ({program})", program)


@pytest.mark.parametrize(
    ("filename", "head", "allowed", "sent_as"),
    [
        ("setup.exe", PE, [".exe", "application/x-msdownload"], "application/x-msdownload"),
        ("tool", ELF, ["application/x-executable"], "application/x-executable"),
        ("tool.bin", MACH_O, ["application/x-mach-binary"], "application/x-mach-binary"),
    ],
)
def test_allowing_the_program_type_lifts_the_content_rule(filename: str, head: bytes, allowed: list[str], sent_as: str) -> None:
    assert checked_type(filename, None, head, allowed=allowed) == sent_as


def test_each_rule_needs_its_own_entry() -> None:
    with pytest.raises(AttachmentRefused) as refused:
        checked_type("setup.exe", None, PE, allowed=[".exe"])
    assert str(refused.value) == _executables_refusal(
        "setup.exe", "holds a program (application/x-msdownload)", "application/x-msdownload"
    )
    # Allowing programs does not make a program pass as a PDF.
    with pytest.raises(AttachmentRefused) as refused:
        checked_type("report.pdf", "application/pdf", PE, allowed=["application/x-msdownload"])
    assert str(refused.value) == "file 'report.pdf' is declared application/pdf but its content is application/x-msdownload"


def test_dangerous_extensions_cover_the_usual_suspects_and_are_all_documented() -> None:
    usual = set(
        ".exe .com .bat .cmd .scr .pif .msi .msp .dll .cpl .hta .js .jse .vbs .vbe .wsf .wsh .ws .ps1 .psm1 .reg "
        ".lnk .jar .vb .sct .msc .app .scf .inf .gadget".split()
    )
    assert usual <= DANGEROUS_EXTENSIONS
    listed = attachments.__doc__.split("DANGEROUS_EXTENSIONS follows", 1)[1].split("Files inside archives", 1)[0]
    documented = set(re.findall(r"(?<![\w.])\.[a-z0-9_-]+", listed))
    assert documented == DANGEROUS_EXTENSIONS


def test_attachment_rules_is_one_line_naming_the_rules() -> None:
    assert "\n" not in ATTACHMENT_RULES
    for words in ("path parts", "content type must match", "executables", ".exe", "operator"):
        assert words in ATTACHMENT_RULES
