"""The headless browser the catcher's test renders mail with: Debian's chromium, installed by apt-get when missing.

    python -m devstack.browser      (make test runs it first: no apt call when /usr/bin/chromium is there)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
INSTALL = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]


class BrowserMissing(RuntimeError):
    """Chromium is not installed and could not be installed; the message says why and what to do."""


def _apt(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)


def ensure_chromium(say: bool = True) -> Path:
    """/usr/bin/chromium, installed first with apt-get when it is missing. BrowserMissing when it cannot be."""
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None:
        raise BrowserMissing(
            f"{CHROMIUM} is missing and there is no apt-get to install it: install Chromium (Debian's `chromium` "
            "package) for the catcher's browser test"
        )
    if say:
        print(f"mailqueue: {CHROMIUM} is missing; installing Debian's chromium for the catcher's browser test "
              f"({' '.join(INSTALL)}, once)", flush=True)
    done = _apt(INSTALL)
    if done.returncode != 0:  # a fresh machine has no package lists yet
        updated = _apt(["apt-get", "update", "-qq"])
        done = _apt(INSTALL) if updated.returncode == 0 else updated
    if done.returncode != 0 or not CHROMIUM.exists():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        root = "" if os.geteuid() == 0 else " (apt-get needs root: run it with sudo)"
        raise BrowserMissing(f"could not install chromium with `{' '.join(INSTALL)}`{root}:\n{tail}")
    return CHROMIUM


def main() -> int:
    try:
        ensure_chromium()
    except BrowserMissing as exc:
        print(f"mailqueue: {exc}\nmailqueue: the catcher's browser test (tests/test_catcher.py) will fail until it is installed",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
