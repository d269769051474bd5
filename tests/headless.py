"""Headless Chromium for tests: a page loaded, its frames' laid-out text and a screenshot, through the
DevTools protocol over a pipe (--remote-debugging-pipe: no port, no Playwright, no browser download),
and a PNG read back into pixels with the standard library."""

from __future__ import annotations

import base64
import json
import os
import select
import struct
import subprocess
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

# How long one DevTools answer may take: a generous bound for a cold start on a busy machine,
# not a guess of how fast Chromium is (an answer ends the wait the moment it comes).
ANSWER_WITHIN = 120.0


class Chromium:
    """One headless Chromium (Debian's, `executable`) with a fresh profile in `profile`, driven over a pipe."""

    def __init__(self, executable: Path, profile: Path, width: int = 1000, height: int = 1400) -> None:
        self.executable, self.profile, self.size = executable, profile, (width, height)
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict[str, Any]] = []
        self.frame_sessions: dict[str, dict[str, Any]] = {}  # out-of-process iframes (sandboxed ones are): session -> target

    def __enter__(self) -> Chromium:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        args = [
            "--headless=new", "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
            f"--window-size={self.size[0]},{self.size[1]}", "--hide-scrollbars", "--no-first-run",
            "--no-default-browser-check", "--disable-gpu", "--disable-extensions", "--mute-audio",
            "--force-device-scale-factor=1", "about:blank",
        ]
        if os.geteuid() == 0:
            args.insert(0, "--no-sandbox")  # Chromium's process sandbox refuses root; the page's iframe sandbox is another thing
        # The DevTools pipe is the child's fd 3 (commands in) and fd 4 (answers out); bash moves them
        # there (dash takes one-digit fd numbers only).
        self._log = (self.profile / "chromium.log").open("wb")
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_child_r} 4>&{from_child_w}', str(self.executable), *args],
            pass_fds=(to_child_r, from_child_w), stdout=subprocess.DEVNULL, stderr=self._log,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        try:
            self._open_page()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _open_page(self) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=self.session)
        self.call("Emulation.setDeviceMetricsOverride", session=self.session, width=self.size[0], height=self.size[1],
                  deviceScaleFactor=1, mobile=False)
        # Chromium runs sandboxed iframes in processes of their own: attach to them to read their documents.
        self.call("Target.setAutoAttach", session=self.session, autoAttach=True, waitForDebuggerOnStart=False, flatten=True)

    def __exit__(self, *exc: object) -> None:
        try:
            self.call("Browser.close")
        except (OSError, AssertionError):
            pass  # already gone: killed below either way
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_child)
        os.close(self._from_child)
        self._log.close()

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events that come first are kept in `events`)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._receive()
            if answer.get("id") == self._next_id:
                assert "error" not in answer, f"{method}: {answer['error']}"
                return answer["result"]
            self.events.append(answer)

    def wait_for_event(self, method: str) -> dict[str, Any]:
        while True:
            for event in self.events:
                if event.get("method") == method:
                    self.events.remove(event)
                    return event
            self.events.append(self._receive())

    def _receive(self) -> dict[str, Any]:
        deadline = time.monotonic() + ANSWER_WITHIN
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_child], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"Chromium did not answer within {ANSWER_WITHIN:g}s; see {self.profile / 'chromium.log'}"
            chunk = os.read(self._from_child, 1 << 20)
            assert chunk, f"Chromium exited ({self.process.poll()}); see {self.profile / 'chromium.log'}"
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        answer = json.loads(message)
        if answer.get("method") == "Target.attachedToTarget":
            self.frame_sessions[answer["params"]["sessionId"]] = answer["params"]["targetInfo"]
        elif answer.get("method") == "Target.detachedFromTarget":
            self.frame_sessions.pop(answer["params"]["sessionId"], None)
        return answer

    def load(self, url: str) -> None:
        """Open `url` and wait for its load event (which waits for its frames, srcdoc iframes too)."""
        self.events.clear()
        self.call("Page.navigate", session=self.session, url=url)
        self.wait_for_event("Page.loadEventFired")

    def frames_text(self) -> dict[str, str]:
        """Each frame's document URL and the text Chromium laid out in it (what a reader sees, not the source),
        the page's own frames and those in processes of their own alike."""
        out = {}
        for session in (self.session, *self.frame_sessions):
            snapshot = self.call("DOMSnapshot.captureSnapshot", session=session, computedStyles=[])
            strings = snapshot["strings"]
            for document in snapshot["documents"]:
                texts = [strings[i] for i in document["layout"]["text"] if i >= 0]
                out[strings[document["documentURL"]]] = " ".join(" ".join(texts).split())
        return out

    def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode(self.call("Page.captureScreenshot", session=self.session, format="png")["data"])
        path.write_bytes(data)
        return data


def png_pixels(data: bytes) -> tuple[int, int, Counter[tuple[int, int, int]]]:
    """(width, height, how many pixels of each RGB colour) of an 8-bit RGB or RGBA PNG, as Chromium writes them."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = chunk
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, f"unexpected PNG format: depth {depth}, colour type {colour}"
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    previous, colours = bytearray(stride), Counter()
    for y in range(height):
        kind, row = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        if kind == 1:
            for i in range(bpp, stride):
                row[i] = (row[i] + row[i - bpp]) & 0xFF
        elif kind == 2:
            row = bytearray((a + b) & 0xFF for a, b in zip(row, previous))
        elif kind == 3:
            for i in range(stride):
                row[i] = (row[i] + ((row[i - bpp] if i >= bpp else 0) + previous[i]) // 2) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a, b = row[i - bpp] if i >= bpp else 0, previous[i]
                c = previous[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        colours.update(zip(row[0::bpp], row[1::bpp], row[2::bpp]))
        previous = row
    return width, height, colours


def solid_png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A PNG of one colour (for an inline image whose pixels a screenshot can be searched for)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\0" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
