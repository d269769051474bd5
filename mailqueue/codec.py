"""Payloads in Temporal, encrypted: a PayloadCodec doing AES-256-GCM with named, rotatable keys.

Everything the API and the workers hand to Temporal (workflow inputs and results, activity
arguments, queries, updates, failure messages) passes through this codec, so the Temporal
server, its database, `temporal workflow show` and the Web UI see ciphertext only. People
holding an admin key read it through the API's codec endpoint (api/routes/codec.py).

Keys: `MAILQUEUE_PAYLOAD_KEYS`, comma-separated, newest first; each is 32 random bytes in
url-safe base64 (the same shape as a Fernet key, e.g. `Fernet.generate_key()`; use its own,
not the secret key). The first encrypts, every one decrypts: to rotate, put a new key first
(`new,old`) and restart the API and the workers; drop the old one once no running workflow and no
history anyone still needs to read was written with it (the namespace's retention period after
the last email queued under it; workers rewrite the reconcile schedule with the newest key when
they start). Histories are never re-encrypted: Temporal does not change them. A key's id is
derived from the key (8 hex digits of a hash), so nobody names ids, and an id says nothing
about the key. Without the variable, the embedded setup keeps a generated key in
`payload_key_file` (.mailqueue/payload.key), as for the secret key.

An encrypted payload is `nonce (12 bytes) || AES-GCM(key, nonce, original Payload serialized,
associated data = key id)`, with metadata `encoding: binary/encrypted` and
`encryption-key-id: <id>`. Payloads without that encoding (histories recorded before the
codec) decode as they are.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from mailqueue.config import Settings
from mailqueue.crypto import key_file, split_keys

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
NONCE_BYTES = 12
KEY_BYTES = 32


class PayloadKeyError(ValueError):
    """No usable payload key, or a payload no configured key opens. The message names key ids, never a key."""


def new_payload_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode()


def key_id(raw: bytes) -> str:
    # A hash of the key under a label of its own: the id can be shown anywhere and reveals nothing.
    return hashlib.sha256(b"mailqueue payload key id\0" + raw).hexdigest()[:8]


def _raw(key: str, position: int) -> bytes:
    try:
        raw = base64.b64decode(key, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise PayloadKeyError(
            f"MAILQUEUE_PAYLOAD_KEYS: key {position} is not 32 bytes in url-safe base64 "
            "(make one with: python -c 'from mailqueue.codec import new_payload_key; print(new_payload_key())')"
        )
    return raw


class PayloadCipher(PayloadCodec):
    """AES-256-GCM over whole payloads. The first key encrypts; any key, found by the payload's key id, decrypts."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise PayloadKeyError("MAILQUEUE_PAYLOAD_KEYS holds no key")
        self._ciphers: dict[str, AESGCM] = {}
        seen: dict[str, bytes] = {}
        for position, key in enumerate(keys, start=1):
            raw = _raw(key, position)
            kid = key_id(raw)
            if kid in seen and seen[kid] != raw:  # one chance in 4 billion; refuse rather than guess
                raise PayloadKeyError(f"MAILQUEUE_PAYLOAD_KEYS: two different keys share the id {kid}; replace one")
            seen[kid] = raw
            self._ciphers.setdefault(kid, AESGCM(raw))
        self.current = key_id(_raw(keys[0], 1))

    @classmethod
    def from_settings(cls, settings: Settings) -> PayloadCipher:
        if settings.payload_keys is not None:
            return cls(split_keys(settings.payload_keys.get_secret_value()))
        return cls(key_file(Path(settings.payload_key_file), new_payload_key))

    @property
    def key_ids(self) -> list[str]:
        """The ids of the configured keys, newest first."""
        return list(self._ciphers)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(p) for p in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        nonce = os.urandom(NONCE_BYTES)
        kid = self.current.encode()
        sealed = self._ciphers[self.current].encrypt(nonce, payload.SerializeToString(), kid)
        return Payload(metadata={"encoding": ENCODING, KEY_ID: kid}, data=nonce + sealed)

    def decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload  # not ours: written before the codec, or by another client; left as it is
        kid_bytes = payload.metadata.get(KEY_ID, b"")
        kid = kid_bytes.decode("ascii", "replace")
        if not kid:
            raise PayloadKeyError("an encrypted payload carries no encryption-key-id")
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise PayloadKeyError(
                f"a payload is encrypted with key id {kid}, which is not among MAILQUEUE_PAYLOAD_KEYS "
                f"(ids {', '.join(self._ciphers)}): add that key back, after the current one"
            )
        data = payload.data
        try:
            plain = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], kid_bytes)
        except InvalidTag:
            raise PayloadKeyError(f"a payload encrypted with key id {kid} does not decrypt: it was altered or cut") from None
        return Payload.FromString(plain)
