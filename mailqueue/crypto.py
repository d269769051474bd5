"""Secrets at rest: sender passwords and API keys, encrypted with MultiFernet.

`MAILQUEUE_SECRET_KEY` holds one or more Fernet keys, comma-separated. The first encrypts;
every one of them decrypts. To rotate: put a new key first (`new,old`), restart, run
`mailqueue rotate-secrets` (re-encrypts every stored secret with the new key), then drop
the old key. Without the variable, the embedded setup keeps a generated key in
`.mailqueue/secret.key` (readable by its owner only) so that `make dev` works out of the box.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from mailqueue.config import Settings


class SecretKeyError(RuntimeError):
    """No usable key, or a stored secret no configured key can open (message names no secret)."""


def new_key() -> str:
    return Fernet.generate_key().decode()


def split_keys(value: str) -> list[str]:
    """Comma-separated keys, newest first, blanks dropped."""
    return [k.strip() for k in value.split(",") if k.strip()]


def secret_keys(settings: Settings) -> list[str]:
    """The secret box's keys, newest first: from MAILQUEUE_SECRET_KEY, else the generated key file."""
    if settings.secret_key is not None:
        return split_keys(settings.secret_key.get_secret_value())
    return key_file(Path(settings.secret_key_file), new_key)


def key_file(path: Path, generate: Callable[[], str]) -> list[str]:
    """The keys kept in `path`, which gets one `generate()`d key (readable by its owner only) if it does not exist yet."""
    if not path.exists():
        # The API and the worker may both get here at once: write a whole file aside, then link
        # it into place (atomic, and it fails if the other was first). Nobody reads half a key.
        path.parent.mkdir(parents=True, exist_ok=True)
        aside = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(generate() + "\n")
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        finally:
            aside.unlink()
    return split_keys(path.read_text())


class SecretBox:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise SecretKeyError("MAILQUEUE_SECRET_KEY holds no key")
        try:
            self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])
        except (ValueError, TypeError):
            raise SecretKeyError("MAILQUEUE_SECRET_KEY must be Fernet keys (32 url-safe base64 bytes), comma-separated") from None

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        return cls(secret_keys(settings))

    def encrypt(self, value: str) -> str:
        return self._fernet.encrypt(value.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise SecretKeyError("a stored secret cannot be decrypted with any configured MAILQUEUE_SECRET_KEY") from None

    def rotate(self, token: str) -> str:
        """The same secret, encrypted with the first (newest) key."""
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken:
            raise SecretKeyError("a stored secret cannot be decrypted with any configured MAILQUEUE_SECRET_KEY") from None
