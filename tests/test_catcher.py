"""The dev catcher shows caught mail as people read it: a page per message (headers decoded and
escaped, the HTML part in a sandboxed iframe, the text part decoded, attachments and the raw source
a click away), `mailqueue mail --show N` in a terminal, and a real browser rendering it."""

from __future__ import annotations

import html
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiosmtplib
import httpx
import pytest

from devstack.browser import BrowserMissing, ensure_chromium
from devstack.net import free_port
from mailqueue.contracts import Content, EmailSpec
from mailqueue.message import build_message
from mailqueue.template_library import read_folder
from mailqueue.templating import TemplateEngine
from tests.headless import Chromium, png_pixels, solid_png
from tests.helpers import PROCESS_STARTS, ROOT, eventually, run_cli

# The templated email: PasswordReset with a name that is not ASCII, so its parts travel quoted-printable.
RESET_DATA = {"UserName": "Zoë Ünal", "ResetUrl": "https://mes.example.com/reset?token=3f9a1c0e7b&lang=de",
              "ExpiresInMinutes": 30, "RequestedFromIp": "203.0.113.7"}
HEADER_BLUE = (0x1F, 0x2D, 0x3D)  # the layout's header bar (templates/_Header)
BUTTON_BLUE = (0x00, 0x7B, 0xFF)  # its .button
LOGO = (255, 0, 170)  # the inline cid: image of the hostile message
HOSTILE_SUBJECT = "<script>alert(1)</script> Grüße & <b>bold</b>"
TEXT_PART = (
    "Prüfbericht für Zoë: the values are a=1, b=2 and the formula is x = y + z; this line is long enough "
    "that quoted-printable has to break it with a soft line break, which a reader must never see.\n"
)
ATTACHMENT = bytes(range(256)) * 40  # every byte value


@dataclass
class Caught:
    url: str
    data_dir: Path
    templated: int  # page indexes of the three messages sent
    hostile: int
    html_only: int
    reset_text: str  # the templated email's text part as rendered
    beacon_hits: list[str]  # requests that reached a "remote" server a message points at


def _render_password_reset() -> Content:
    templates, problems = read_folder(ROOT / "templates")
    assert problems == []
    sources = {t.name: t.source() for t in templates if t.locale == ""}
    return TemplateEngine().render(sources["PasswordReset"], RESET_DATA, sources)


def _hostile(beacon: str) -> EmailMessage:
    """Headers with markup, a quoted-printable text part, HTML with a script and remote loads, an inline image, an attachment."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "Jörg <joerg@example.com>"
    msg["To"] = "ann@example.com"
    msg["Subject"] = HOSTILE_SUBJECT
    msg["Message-ID"] = "<hostile@example.com>"
    msg.set_content(TEXT_PART, cte="quoted-printable")
    msg.add_alternative(
        "<html><head><link rel=stylesheet href='" + beacon + "/style.css'></head><body>"
        "<p id=x>Static text stays.</p><script>document.getElementById('x').textContent = 'SCRIPT RAN'</script>"
        f"<img src='{beacon}/remote.png' width=50 height=50><img src='cid:logo@example.com' width=80 height=80>"
        f"<div style=\"background-image: url('{beacon}/bg.png')\">and a background</div></body></html>",
        subtype="html",
    )
    msg.get_payload()[1].add_related(solid_png(80, 80, LOGO), "image", "png", cid="<logo@example.com>", filename="logo.png")
    msg.add_attachment(ATTACHMENT, "application", "pdf", filename='../../etc/Bericht "März";.pdf')
    return msg


def _html_only() -> EmailMessage:
    msg = EmailMessage(policy=SMTP)
    msg["From"], msg["To"], msg["Subject"] = "app@example.com", "bob@example.com", "Only HTML"
    msg.set_content("<p>Only <b>HTML</b> here, &amp; nothing else.</p>", subtype="html")
    return msg


@pytest.fixture(scope="module")
def beacon() -> Iterator[tuple[str, list[str]]]:
    """A server standing in for the internet: any request a message's HTML makes shows up in its list."""
    hits: list[str] = []

    class Record(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Record)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


@pytest.fixture(scope="module")
async def caught(tmp_path_factory: pytest.TempPathFactory, beacon: tuple[str, list[str]]) -> AsyncIterator[Caught]:
    """`python -m devstack.catcher` as `make dev` runs it, keeping mail in a folder, with three messages delivered by SMTP."""
    data_dir = tmp_path_factory.mktemp("catcher")
    smtp_port, http_port = free_port(), free_port()
    log = (data_dir / "catcher.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "devstack.catcher", "--smtp-port", str(smtp_port), "--http-port", str(http_port),
         "--dir", str(data_dir / "mail")],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{http_port}"
    try:

        async def answering() -> bool:
            assert process.poll() is None, (data_dir / "catcher.log").read_text()
            try:
                return httpx.get(f"{url}/api/messages").status_code == 200
            except httpx.TransportError:
                return False

        await eventually(answering, timeout=PROCESS_STARTS, what="the catcher never answered")
        content = _render_password_reset()
        spec = EmailSpec(email_id="e1", message_id="<reset-1@example.com>", from_address="MES Office <noreply@example.com>",
                         to=["Zoë Ünal <zoe@example.com>"], cc=["audit@example.com"])
        for message in (build_message(spec, content), _hostile(beacon[0]), _html_only()):
            await aiosmtplib.send(message, hostname="127.0.0.1", port=smtp_port)
        yield Caught(url, data_dir, 0, 1, 2, content.text or "", beacon[1])
    finally:
        process.terminate()
        process.wait(30)
        log.close()


class Elements(HTMLParser):
    """Tags of a page with their attributes, and the text of each <pre>."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.pre: list[str] = []
        self._in_pre = False
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "pre":
            self._in_pre = True
            self.pre.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_pre = self._in_pre and tag != "pre"

    def handle_data(self, data: str) -> None:
        if self._in_pre:
            self.pre[-1] += data

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.tags if name == tag]


def _page(caught: Caught, index: int) -> tuple[httpx.Response, Elements]:
    response = httpx.get(f"{caught.url}/messages/{index}")
    assert response.status_code == 200, response.text
    return response, Elements(response.text)


def test_the_page_lists_caught_mail_newest_first_with_links_and_attachment_counts(caught: Caught) -> None:
    page = httpx.get(caught.url + "/")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    rows = page.text.split("<tr>")[2:]  # after the heading row
    assert len(rows) == 3 and all(f"href='/messages/{i}'" in row for i, row in zip((2, 1, 0), rows))
    assert "Only HTML" in rows[0] and "Reset your MES Office password" in rows[2]
    assert "Jörg &lt;joerg@example.com&gt;" in rows[1] and "<td>1</td>" in rows[1]  # one attachment (the logo is inline)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rows[1] and "<script" not in page.text


def test_the_json_list_stays_as_it_was(caught: Caught) -> None:
    listed = httpx.get(f"{caught.url}/api/messages").json()
    assert [m["index"] for m in listed] == [0, 1, 2]
    assert set(listed[0]) == {"index", "received_at", "from", "to", "subject", "message_id", "envelope_to"}
    assert listed[0]["subject"] == "Reset your MES Office password" and listed[0]["message_id"] == "<reset-1@example.com>"
    assert listed[1]["subject"] == HOSTILE_SUBJECT and listed[0]["envelope_to"] == ["zoe@example.com", "audit@example.com"]


def test_a_message_page_shows_decoded_headers_as_text_and_the_html_in_a_sandboxed_frame(caught: Caught) -> None:
    response, page = _page(caught, caught.hostile)
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert "<script" not in response.text and "<b>bold" not in response.text  # all markup from the mail is escaped
    assert "<h1>&lt;script&gt;alert(1)&lt;/script&gt; Grüße &amp; &lt;b&gt;bold&lt;/b&gt;</h1>" in response.text
    assert "<th>From</th><td>Jörg &lt;joerg@example.com&gt;</td>" in response.text  # RFC 2047 words decoded
    assert "=?utf-8?" not in response.text
    [frame] = page.all("iframe")
    assert "sandbox" in frame and frame["sandbox"] in (None, ""), "the frame must be sandboxed, with no allow-* token"
    srcdoc = frame["srcdoc"] or ""
    assert "<script>document.getElementById('x')" in srcdoc  # the mail's HTML as it is: the sandbox keeps it inert
    assert "cid:" not in srcdoc and "data:image/png;base64," in srcdoc  # the inline image travels with the page


def test_the_text_part_is_shown_decoded_not_quoted_printable(caught: Caught) -> None:
    raw = httpx.get(f"{caught.url}/messages/{caught.templated}/raw").text
    assert "Zo=C3=AB" in raw and "token=3D3f9a1c0e7b" in raw and "=\r\n" in raw, "the templated mail should travel quoted-printable"
    _, page = _page(caught, caught.templated)
    assert len(page.pre) == 1 and page.pre[0].rstrip("\n") == caught.reset_text.rstrip("\n")
    assert "token=3f9a1c0e7b&lang=de" in page.pre[0] and "Zoë Ünal" in page.pre[0]
    _, hostile = _page(caught, caught.hostile)
    assert hostile.pre == [TEXT_PART]


def test_attachments_download_byte_for_byte_under_a_safe_name(caught: Caught) -> None:
    _, page = _page(caught, caught.hostile)
    links = [a["href"] or "" for a in page.all("a") if "/parts/" in (a["href"] or "")]
    assert len(links) == 2  # the inline logo and the attachment
    downloads = [httpx.get(caught.url + link) for link in links]
    assert all(d.status_code == 200 and d.headers["content-type"] == "application/octet-stream" for d in downloads)
    pdf = next(d for d in downloads if d.content == ATTACHMENT)
    disposition = pdf.headers["content-disposition"]
    assert disposition.startswith("attachment; ")
    name = urllib.parse.unquote(disposition.split("filename*=UTF-8''")[1])
    assert name == "Bericht März.pdf"  # no folders, no quotes or semicolons
    assert solid_png(80, 80, LOGO) in [d.content for d in downloads]
    assert httpx.get(f"{caught.url}/messages/{caught.hostile}/parts/99").status_code == 404
    assert httpx.get(f"{caught.url}/messages/99").status_code == 404


def test_the_raw_source_is_one_click_away(caught: Caught) -> None:
    _, page = _page(caught, caught.templated)
    assert f"/messages/{caught.templated}/raw" in [a["href"] for a in page.all("a")]
    raw = httpx.get(f"{caught.url}/messages/{caught.templated}/raw")
    assert raw.headers["content-type"].startswith("text/plain")
    eml = sorted((caught.data_dir / "mail").glob("*.eml"))[caught.templated]  # the catcher's order: as they came
    assert raw.content == eml.read_bytes() and b"Message-ID: <reset-1@example.com>" in raw.content


def test_mail_show_prints_headers_and_the_decoded_text(caught: Caught) -> None:
    shown = run_cli("mail", "--data-dir", str(caught.data_dir), "--show", str(caught.hostile))
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    lines = out.splitlines()
    assert lines[0].startswith("From:") and "Jörg <joerg@example.com>" in lines[0]
    assert [line.split(":")[0] for line in lines[:4]] == ["From", "To", "Subject", "Message-ID"]
    assert lines[2].split(":", 1)[1].strip() == HOSTILE_SUBJECT
    assert TEXT_PART in out and "=3D" not in out and "=\n" not in out
    assert f"Bericht März.pdf  application/pdf  {len(ATTACHMENT)} bytes" in out
    assert "logo.png  image/png" in out and "inline, cid:logo@example.com" in out

    templated = run_cli("mail", "--data-dir", str(caught.data_dir), "--show", str(caught.templated)).stdout
    assert caught.reset_text in templated and "Cc:" in templated and "To:" in templated

    html_only = run_cli("mail", "--data-dir", str(caught.data_dir), "--show", str(caught.html_only)).stdout
    assert "Only HTML here, & nothing else." in html_only and "<p>" not in html_only


def test_mail_show_raw_prints_the_source_as_it_came(caught: Caught) -> None:
    raw = run_cli("mail", "--data-dir", str(caught.data_dir), "--show", str(caught.hostile), "--raw")
    assert raw.returncode == 0, raw.stderr
    assert "Content-Transfer-Encoding: quoted-printable" in raw.stdout and "=3D" in raw.stdout
    assert "From: =?utf-8?q?J=C3=B6rg?= <joerg@example.com>" in raw.stdout  # RFC 2047 words as they came
    assert run_cli("mail", "--data-dir", str(caught.data_dir), "--raw").returncode == 2


def _chromium() -> Path:
    """Debian's chromium (`make test` installs it; so does this, when it is missing and apt-get can). Never a skip."""
    try:
        return ensure_chromium()
    except BrowserMissing as exc:
        pytest.fail(str(exc), pytrace=False)


def test_chromium_renders_a_caught_templated_email(caught: Caught, tmp_path: Path) -> None:
    with Chromium(_chromium(), tmp_path) as browser:
        browser.load(f"{caught.url}/messages/{caught.templated}")
        texts = browser.frames_text()
        shot = browser.screenshot(tmp_path / "templated.png")
    assert "about:srcdoc" in texts, f"no iframe document was rendered: {list(texts)}"
    frame = texts["about:srcdoc"]  # the text Chromium laid out inside the sandboxed iframe
    assert "MES Office" in frame and "Reset your password" in frame and "Hello Zoë Ünal," in frame
    assert "Choose a new password" in frame and "203.0.113.7" in frame
    page = texts[f"{caught.url}/messages/{caught.templated}"]
    assert "Reset your MES Office password" in page and "Hello Zoë Ünal," in page  # the subject, and the text part
    width, height, colours = png_pixels(shot)
    assert (width, height) == (1000, 1400) and len(colours) > 50, "a blank screenshot"
    assert colours[HEADER_BLUE] > 5_000, "the layout's header bar was not painted in the frame"
    assert colours[BUTTON_BLUE] > 500, "the reset button was not painted in the frame"


def test_the_sandboxed_frame_runs_no_script_and_loads_nothing_remote(caught: Caught, tmp_path: Path) -> None:
    with Chromium(_chromium(), tmp_path) as browser:
        browser.load(f"{caught.url}/messages/{caught.hostile}")
        frame = browser.frames_text().get("about:srcdoc", "")
        shot = browser.screenshot(tmp_path / "hostile.png")
    assert "Static text stays." in frame and "and a background" in frame
    assert "SCRIPT RAN" not in frame
    assert caught.beacon_hits == [], "the frame loaded from a remote server"
    _, _, colours = png_pixels(shot)
    assert colours[LOGO] > 80 * 80 * 0.9, "the inline cid: image was not shown"
    assert html.escape("Grüße") in httpx.get(f"{caught.url}/messages/{caught.hostile}").text


def test_without_chromium_or_apt_get_the_browser_step_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("devstack.browser.CHROMIUM", tmp_path / "chromium")
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get here
    with pytest.raises(BrowserMissing, match="no apt-get to install it: install Chromium"):
        ensure_chromium(say=False)


def test_when_apt_get_fails_the_browser_step_fails_with_its_words(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apt = tmp_path / "apt-get"
    apt.write_text("#!/bin/sh\necho \"$*\" >> \"$0.calls\"\necho 'E: Unable to locate package chromium' >&2\nexit 100\n")
    apt.chmod(0o755)
    monkeypatch.setattr("devstack.browser.CHROMIUM", tmp_path / "chromium")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrowserMissing, match="(?s)could not install chromium.*Unable to locate package chromium"):
        ensure_chromium(say=False)
    calls = (tmp_path / "apt-get.calls").read_text().splitlines()
    assert calls == ["install -y -qq --no-install-recommends chromium", "update -qq"]  # an update, then no second install
