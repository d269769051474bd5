"""Sender secrets at rest: MultiFernet, key rotation, the generated dev key."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from mailqueue.config import Settings, settings_env
from mailqueue.crypto import SecretBox, SecretKeyError, new_key
from mailqueue.models import SenderSettings, WebhookEndpoint
from mailqueue.accounts import new_id
from mailqueue.senders import rotate_secrets
from mailqueue.db import create_engine, sessionmaker
from tests.conftest import scratch_database
from tests.helpers import make_sender, run_cli


def test_data_encrypted_with_the_old_key_decrypts_after_a_new_key_is_added() -> None:
    old, new = new_key(), new_key()
    token = SecretBox([old]).encrypt("hunter2")
    assert "hunter2" not in token
    rotated_box = SecretBox([new, old])
    assert rotated_box.decrypt(token) == "hunter2"
    fresh = rotated_box.encrypt("x")
    assert SecretBox([new]).decrypt(fresh) == "x"  # the first key encrypts
    with pytest.raises(SecretKeyError) as caught:
        SecretBox([new]).decrypt(token)  # the old key is still needed until rotation
    assert "hunter2" not in str(caught.value)
    assert SecretBox([new]).decrypt(rotated_box.rotate(token)) == "hunter2"


def test_bad_keys_are_refused_with_a_clear_message() -> None:
    with pytest.raises(SecretKeyError, match="Fernet keys"):
        SecretBox(["not-a-key"])
    with pytest.raises(SecretKeyError, match="no key"):
        SecretBox([])


def test_without_a_configured_key_one_is_generated_once_privately(tmp_path: Path) -> None:
    settings = Settings(secret_key_file=tmp_path / "data" / "secret.key", _env_file=None)  # type: ignore[call-arg]
    with ThreadPoolExecutor(8) as pool:  # API and worker starting at once
        boxes = list(pool.map(lambda _: SecretBox.from_settings(settings), range(8)))
    token = boxes[0].encrypt("s")
    assert all(b.decrypt(token) == "s" for b in boxes)
    assert stat.S_IMODE(os.stat(settings.secret_key_file).st_mode) == 0o600
    assert sorted(p.name for p in settings.secret_key_file.parent.iterdir()) == ["secret.key"]


async def test_rotate_secrets_reencrypts_every_stored_secret(tmp_path: Path) -> None:
    # A database of its own: rotate-secrets re-encrypts every stored secret, so another test's rows
    # (encrypted with the test stacks' key) would make it refuse, depending on the order tests run in.
    with scratch_database(tmp_path) as database_url:
        engine = create_engine(database_url)
        try:
            await _rotate_secrets_reencrypts_every_stored_secret(sessionmaker(engine), database_url)
        finally:
            await engine.dispose()


async def _rotate_secrets_reencrypts_every_stored_secret(sessions: Any, database_url: str) -> None:
    old, new = new_key(), new_key()
    box = SecretBox([old])
    user_id = await make_sender(sessions, driver="ses", api_key_enc=box.encrypt("AKIA1"), api_secret_enc=box.encrypt("sek"), ses_region="eu-west-1",
                                mailgun_webhook_signing_key_enc=box.encrypt("mg-signing"))

    endpoint_id = new_id()
    async with sessions() as s:
        s.add(WebhookEndpoint(id=endpoint_id, owner=f"user:{user_id}", url="https://hooks.example.com/in", secret_enc=box.encrypt("whsec_c2lnbmluZw==")))
        await s.commit()

    env = settings_env(Settings(secret_key=f"{new},{old}", database_url=database_url, _env_file=None))  # type: ignore[call-arg]
    run = run_cli("rotate-secrets", env=env)
    assert run.returncode == 0, run.stderr
    assert "re-encrypted" in run.stdout and "sek" not in run.stdout + run.stderr and "mg-signing" not in run.stdout + run.stderr

    async with sessions() as s:
        row = (await s.exec(select(SenderSettings).where(SenderSettings.user_id == user_id))).one()
    only_new = SecretBox([new])
    assert only_new.decrypt(row.api_key_enc or "") == "AKIA1" and only_new.decrypt(row.api_secret_enc or "") == "sek"
    assert only_new.decrypt(row.mailgun_webhook_signing_key_enc or "") == "mg-signing"  # the inbound signing key too
    async with sessions() as s:
        endpoint = await s.get(WebhookEndpoint, endpoint_id)
    assert endpoint is not None and only_new.decrypt(endpoint.secret_enc) == "whsec_c2lnbmluZw=="  # webhook signing secrets too
    assert await rotate_secrets(sessions, SecretBox([new])) >= 1  # idempotent: again with the new key alone

    wrong = env | {"MAILQUEUE_SECRET_KEY": new_key()}
    refused = run_cli("rotate-secrets", env=wrong)
    assert refused.returncode == 1 and "nothing changed" in refused.stderr
