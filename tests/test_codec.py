"""Workflow data in Temporal is encrypted (mailqueue/codec.py): the Temporal server, its CLI and raw
histories show no recipient, subject or body, while admins read them through the API's codec
endpoint, as the Temporal Web UI and CLI do. Keys rotate; the Temporal connection takes TLS, mTLS
and an API key. (Histories recorded before the codec replay in tests/test_replay.py.)"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import json_format
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.converter import DataConverter

from devstack.devserver import TemporalDevServer, temporal_cli
from devstack.net import free_port
from devstack.supervisor import codec_endpoint, dev_settings
from mailqueue.codec import KEY_ID, PayloadCipher, PayloadKeyError, key_id, new_payload_key
from mailqueue.config import Settings
from mailqueue.contracts import workflow_id_for
from mailqueue.temporal import TemporalSettingsError, connect, data_converter, tls_config
from tests.helpers import (
    KEY,
    PROCESS_STARTS,
    TEST_PAYLOAD_KEY,
    SmtpSink,
    Stack,
    delivered,
    email,
    eventually,
    make_spec,
    post_email,
    wait_status,
)
from worker import build_worker
from workflows.send_email import SendEmailWorkflow

UI_ORIGIN = "http://127.0.0.1:8233"  # a default of MAILQUEUE_CODEC_CORS_ORIGINS (the UI of `make dev` and compose)
ENCRYPTED = b"binary/encrypted"


def _plain(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(text).encode())


def _as_json(*payloads: Payload) -> dict[str, Any]:
    return {"payloads": [json_format.MessageToDict(p) for p in payloads]}


def _from_json(body: dict[str, Any]) -> list[Payload]:
    return [json_format.ParseDict(p, Payload()) for p in body["payloads"]]


def _readable(text: str) -> str:
    """What a reader of this JSON sees: the text itself, and every base64 `data` value decoded."""
    decoded = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "data" and isinstance(value, str):
                    try:
                        decoded.append(base64.b64decode(value, validate=True).decode("utf-8", "replace"))
                    except ValueError:
                        pass
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(text))
    return text + "\n".join(decoded)


# --- the codec ------------------------------------------------------------------------------


def test_payloads_are_sealed_whole_and_open_with_any_configured_key() -> None:
    old, new = new_payload_key(), new_payload_key()
    payload = _plain("Zoe <zoe@example.com>")
    sealed = PayloadCipher([old]).encrypt(payload)
    assert b"zoe@example.com" not in sealed.SerializeToString() and b"json/plain" not in sealed.SerializeToString()
    assert sealed.metadata["encoding"] == ENCRYPTED
    assert sealed.metadata[KEY_ID].decode() == key_id(base64.urlsafe_b64decode(old))
    assert PayloadCipher([old]).encrypt(payload).data != sealed.data  # a fresh nonce every time

    rotated = PayloadCipher([new, old])
    assert rotated.decrypt(sealed) == payload  # encrypted before the rotation, read after it
    assert rotated.encrypt(payload).metadata[KEY_ID] == PayloadCipher([new]).encrypt(payload).metadata[KEY_ID]  # the first key encrypts
    assert rotated.key_ids == [PayloadCipher([new]).current, PayloadCipher([old]).current]
    assert rotated.decrypt(payload) is payload  # not encrypted (written before the codec): as it is


def test_a_payload_no_key_opens_is_a_clear_error_naming_the_key_id_only() -> None:
    old, new = new_payload_key(), new_payload_key()
    sealed = PayloadCipher([old]).encrypt(_plain("secret"))
    with pytest.raises(PayloadKeyError) as unknown:
        PayloadCipher([new]).decrypt(sealed)
    message = str(unknown.value)
    assert sealed.metadata[KEY_ID].decode() in message and PayloadCipher([new]).current in message
    assert old not in message and new not in message and "secret" not in message

    tampered = Payload()
    tampered.CopyFrom(sealed)
    tampered.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    with pytest.raises(PayloadKeyError, match="altered"):
        PayloadCipher([old]).decrypt(tampered)
    relabelled = Payload()
    relabelled.CopyFrom(sealed)
    relabelled.metadata[KEY_ID] = PayloadCipher([new]).current.encode()  # the key id is bound to the ciphertext
    with pytest.raises(PayloadKeyError, match="altered"):
        PayloadCipher([new, old]).decrypt(relabelled)


@pytest.mark.parametrize("keys", [[], ["not-base64!"], [base64.urlsafe_b64encode(b"short").decode()], [new_payload_key(), "x"]])
def test_bad_keys_are_refused_with_a_clear_message(keys: list[str]) -> None:
    with pytest.raises(PayloadKeyError, match="MAILQUEUE_PAYLOAD_KEYS") as caught:
        PayloadCipher(keys)
    assert not any(k and k in str(caught.value) for k in keys)


def test_without_configured_keys_one_is_generated_once_privately(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    settings = Settings(payload_key_file=tmp_path / "data" / "payload.key", _env_file=None)  # type: ignore[call-arg]
    with ThreadPoolExecutor(8) as pool:  # the API and the worker starting at once
        ciphers = list(pool.map(lambda _: PayloadCipher.from_settings(settings), range(8)))
    sealed = ciphers[0].encrypt(_plain("x"))
    assert all(c.decrypt(sealed) == _plain("x") for c in ciphers)
    assert oct(settings.payload_key_file.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in settings.payload_key_file.parent.iterdir()) == ["payload.key"]


def test_codec_cpu_cost_per_payload() -> None:
    """Not a bound: the figure, for the report (an email's run writes about ten payloads)."""
    converter = DataConverter.default
    spec = make_spec(to=["Zoe Example <zoe@example.com>"], subject="Your invoice for March")
    spec.content.html = "<p>" + "Dear customer, your invoice is attached. " * 40 + "</p>"  # type: ignore[union-attr]
    spec.content.text = "Dear customer, your invoice is attached. " * 40  # type: ignore[union-attr]
    payload = converter.payload_converter.to_payloads([spec])[0]
    cipher = PayloadCipher([TEST_PAYLOAD_KEY])
    n = 10_000
    started = time.process_time()
    for _ in range(n):
        cipher.decrypt(cipher.encrypt(payload))
    cpu = (time.process_time() - started) / n
    print(f"\ncodec: encode+decode of an EmailSpec payload ({payload.ByteSize()} bytes): {cpu * 1e6:.1f} µs CPU ({n} runs)")
    assert cipher.decrypt(cipher.encrypt(payload)) == payload


# --- what Temporal shows, and what the codec endpoint shows to admins -------------------------------


@pytest.fixture(scope="module")
async def sent(stack: Stack) -> dict[str, str]:
    """An email with a recipient, subject and body nobody else uses, delivered through the stack."""
    tag = uuid.uuid4().hex[:10]
    mail = {"to": f"zoe.{tag}@example.com", "subject": f"Payroll {tag}", "body": f"IBAN DE{tag} salary"}
    r = await post_email(stack.http, email(to=[f"Zoe <{mail['to']}>"], subject=mail["subject"], text=mail["body"], html=f"<p>{mail['body']}</p>"), key=tag)
    assert r.status_code == 202, r.text
    mail["id"] = r.json()["id"]
    await wait_status(stack.http, mail["id"], "sent")
    return mail


def _show(address: str, workflow_id: str, *extra: str) -> str:
    """`temporal workflow show` as an operator runs it."""
    run = subprocess.run(
        [temporal_cli(), "workflow", "show", "--workflow-id", workflow_id, "--address", address, "--output", "json", *extra],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


async def test_temporal_shows_no_recipient_subject_or_body(stack: Stack, sent: dict[str, str], temporal_server: TemporalDevServer) -> None:
    shown = _readable(await asyncio.to_thread(_show, temporal_server.address, workflow_id_for(sent["id"])))
    assert sent["id"] in shown  # it is the email's workflow
    for field in ("to", "subject", "body"):
        assert sent[field] not in shown, f"the {field} is readable in `temporal workflow show`"

    # A client without the codec (anyone with access to Temporal) reads the same ciphertext.
    bare = await Client.connect(temporal_server.address)
    history = await bare.get_workflow_handle(workflow_id_for(sent["id"])).fetch_history()
    raw = _readable(history.to_json())
    assert not [f for f in ("to", "subject", "body") if sent[f] in raw]
    sealed = [p for e in history.events for p in _event_payloads(e)]
    assert sealed and all(p.metadata["encoding"] == ENCRYPTED for p in sealed)
    print(f"\ncodec: the run of one email wrote {history.to_json().count(base64.b64encode(ENCRYPTED).decode())} encrypted payloads")

    # The check can fail: the same command through the API's codec endpoint shows them all.
    api = str(stack.http.base_url).rstrip("/")
    decoded = await asyncio.to_thread(
        _show, temporal_server.address, workflow_id_for(sent["id"]), "--codec-endpoint", f"{api}/codec", "--codec-auth", f"Bearer {KEY}",
    )
    for field in ("to", "subject", "body"):
        assert sent[field] in _readable(decoded), f"the codec endpoint did not decode the {field}"


def _event_payloads(event: Any) -> list[Payload]:
    """The payloads of the events that carry the email: the workflow's input, activities' inputs and results."""
    if event.HasField("workflow_execution_started_event_attributes"):
        return list(event.workflow_execution_started_event_attributes.input.payloads)
    if event.HasField("activity_task_scheduled_event_attributes"):
        return list(event.activity_task_scheduled_event_attributes.input.payloads)
    if event.HasField("activity_task_completed_event_attributes"):
        return list(event.activity_task_completed_event_attributes.result.payloads)
    return []


async def _workflow_input(client: Client, email_id: str) -> Payload:
    history = await client.get_workflow_handle(workflow_id_for(email_id)).fetch_history()
    return history.events[0].workflow_execution_started_event_attributes.input.payloads[0]


@pytest.fixture
async def browser(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """Requests as the Temporal UI's page makes them: from the UI's origin, with no key of its own."""
    async with httpx.AsyncClient(base_url=str(stack.http.base_url), headers={"Origin": UI_ORIGIN}, timeout=30) as http:
        yield http


async def test_the_web_ui_decodes_through_the_codec_endpoint(browser: httpx.AsyncClient, sent: dict[str, str], client: Client) -> None:
    # The page asks first (a preflight, never with credentials): the UI's origin may post JSON with its headers.
    preflight = await browser.options("/codec/decode", headers={
        "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,x-namespace,authorization",
    })
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == UI_ORIGIN
    assert preflight.headers["access-control-allow-credentials"] == "true"
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert "x-namespace" in allowed and "authorization" in allowed and "content-type" in allowed

    sealed = await _workflow_input(client, sent["id"])
    assert sealed.metadata["encoding"] == ENCRYPTED
    # The browser adds the Basic login it was given at /codec (include credentials): any user name, an admin key.
    r = await browser.post("/codec/decode", json=_as_json(sealed), headers={"X-Namespace": "default"}, auth=("ui", KEY))
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == UI_ORIGIN and r.headers["access-control-allow-credentials"] == "true"
    [opened] = _from_json(r.json())
    assert opened.metadata["encoding"] == b"json/plain"
    for field in ("to", "subject", "body"):
        assert sent[field] in opened.data.decode()

    signed_in = await browser.get("/codec", auth=("ui", KEY))  # where the browser is asked for the key once
    assert signed_in.status_code == 200 and signed_in.json() == {"status": "ok", "key_ids": [PayloadCipher([TEST_PAYLOAD_KEY]).current]}


async def test_cors_opens_the_codec_endpoint_to_the_ui_origins_only(stack: Stack) -> None:
    base = str(stack.http.base_url)
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    async with httpx.AsyncClient(base_url=base) as anon:
        other = await anon.options("/codec/decode", headers={"Origin": "https://evil.example", **ask})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        answer = await anon.post("/codec/decode", json={"payloads": []}, headers={"Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"})
        assert "access-control-allow-origin" not in answer.headers  # the page cannot read it
        # The UI's origin reaches /codec, and nothing else: the rest of the API stays closed to other origins' scripts.
        api = await anon.options("/v1/emails", headers={"Origin": UI_ORIGIN, **ask})
        assert "access-control-allow-origin" not in api.headers
        listed = await anon.get("/v1/emails", headers={"Origin": UI_ORIGIN, "Authorization": f"Bearer {KEY}"})
        assert listed.status_code == 200 and "access-control-allow-origin" not in listed.headers


async def test_only_admins_use_the_codec_endpoint(stack: Stack, browser: httpx.AsyncClient, sent: dict[str, str], client: Client) -> None:
    body = _as_json(await _workflow_input(client, sent["id"]))
    user = (await stack.http.post("/v1/users", json={"name": f"codec-{uuid.uuid4().hex[:8]}"})).json()
    user_key = (await stack.http.post(f"/v1/users/{user['id']}/api-keys", json={"name": "codec"})).json()["key"]
    for path in ("/codec/decode", "/codec/encode"):
        for auth in ({"Authorization": f"Bearer {user_key}"}, {"Authorization": "Basic " + base64.b64encode(f"u:{user_key}".encode()).decode()}):
            refused = await browser.post(path, json=body, headers=auth)
            assert refused.status_code == 403, refused.text
            assert sent["to"] not in refused.text and sent["subject"] not in refused.text
        anonymous = await browser.post(path, json=body)
        assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"].startswith("Basic")
        assert sent["to"] not in anonymous.text
        wrong = await browser.post(path, json=body, headers={"Authorization": "Bearer not-a-key"})
        assert wrong.status_code == 401
    assert (await browser.get("/codec")).status_code == 401

    admin = (await stack.http.post("/v1/users", json={"name": f"codec-admin-{uuid.uuid4().hex[:8]}", "role": "admin"})).json()
    admin_key = (await stack.http.post(f"/v1/users/{admin['id']}/api-keys", json={"name": "ui"})).json()["key"]
    opened = await browser.post("/codec/decode", json=body, headers={"Authorization": f"Bearer {admin_key}"})
    assert opened.status_code == 200 and sent["to"] in _from_json(opened.json())[0].data.decode()


async def test_the_codec_endpoint_encodes_as_the_workers_do_and_refuses_what_it_cannot_open(stack: Stack) -> None:
    http = stack.http
    plain = _plain("Zoe <zoe@example.com>")
    encoded = await http.post("/codec/encode", json=_as_json(plain))
    assert encoded.status_code == 200, encoded.text
    [sealed] = _from_json(encoded.json())
    assert sealed.metadata["encoding"] == ENCRYPTED and b"zoe@example.com" not in sealed.data
    assert PayloadCipher([TEST_PAYLOAD_KEY]).decrypt(sealed) == plain  # what the workers can read
    back = await http.post("/codec/decode", json=_as_json(sealed, plain))
    assert _from_json(back.json()) == [plain, plain]  # not encrypted: passed through

    foreign = PayloadCipher([new_payload_key()])
    unknown = await http.post("/codec/decode", json=_as_json(plain, foreign.encrypt(plain)))
    assert unknown.status_code == 422
    [error] = unknown.json()["detail"]
    assert error["loc"] == ["body", "payloads", 1] and foreign.current in error["msg"] and "not among" in error["msg"]

    tampered = Payload()
    tampered.CopyFrom(sealed)
    tampered.data = sealed.data[:-2]
    cut = await http.post("/codec/decode", json=_as_json(tampered))
    assert cut.status_code == 422 and "altered or cut" in cut.json()["detail"][0]["msg"]

    malformed = {
        "not base64": {"payloads": [{"metadata": {"encoding": "anNvbi9wbGFpbg=="}, "data": "%%%"}]},
        "metadata not base64": {"payloads": [{"metadata": {"encoding": "!"}, "data": ""}]},
        "not Payloads": {"payloads": "nope"},
        "too many": {"payloads": [{"data": ""}] * 1001},
    }
    for case, body in malformed.items():
        r = await http.post("/codec/decode", json=body)
        assert r.status_code == 422 and r.json()["detail"], (case, r.text)
        assert r.json()["detail"][0]["loc"][:2] == ["body", "payloads"], (case, r.text)
    not_json = await http.post("/codec/decode", content=b"{not json", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422


# --- key rotation over a running workflow ------------------------------------------------------------


async def test_an_email_queued_before_a_key_rotation_is_sent_after_it(settings: Settings, sink: SmtpSink) -> None:
    old, new = new_payload_key(), new_payload_key()
    before = await connect(settings.model_copy(update={"payload_keys": SecretStr(old)}))
    spec = make_spec(to=["Zoe <zoe@example.com>"])
    handle = await before.start_workflow(SendEmailWorkflow.run, spec, id=workflow_id_for(spec.email_id), task_queue=settings.task_queue)

    # Workers restarted with `new,old`: they read the input written with the old key, and write with the new one.
    rotated = settings.model_copy(update={"payload_keys": SecretStr(f"{new},{old}")})
    after = await connect(rotated)
    async with build_worker(after, rotated):
        await after.get_workflow_handle(handle.id).result()
    await delivered(sink, spec.email_id)

    history = await handle.fetch_history()
    ids = [p.metadata[KEY_ID].decode() for e in history.events for p in _event_payloads(e)]
    old_id, new_id = PayloadCipher([old]).current, PayloadCipher([new]).current
    assert ids[0] == old_id and new_id in ids[1:] and old_id not in ids[1:], ids

    # Without the old key the input is unreadable: the rotation kept it for that.
    only_new = data_converter(settings.model_copy(update={"payload_keys": SecretStr(new)}))
    with pytest.raises(PayloadKeyError, match=old_id):
        await only_new.decode(list(history.events[0].workflow_execution_started_event_attributes.input.payloads))


# --- the Temporal connection: TLS, mTLS, API key -----------------------------------------------------


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, *, ca: bool = False, dns: str | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
            key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        assert issuer is not None
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False)
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None = None, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        assert key is not None
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


class TlsFront:
    """A TLS (and mTLS) front for the test's Temporal: HTTP/2 over TLS on its own port, relayed in
    clear to the dev server, as a TLS-terminating load balancer in front of a Temporal cluster."""

    def __init__(self, tmp: Path, upstream: str) -> None:
        self.upstream, self.port = upstream, free_port()
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert("mailqueue test CA", ca_key, None, ca=True)
        server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        self.ca = _write(tmp / "ca.pem", ca)
        self.client_cert = _write(tmp / "client.pem", _cert("mailqueue worker", client_key, (ca, ca_key)))
        self.client_key = _write(tmp / "client.key", key=client_key)
        server_cert = _write(tmp / "server.pem", _cert("temporal.test", server_key, (ca, ca_key), dns="temporal.test"))
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.ca)
        self.context.load_cert_chain(server_cert, _write(tmp / "server.key", key=server_key))
        self.context.verify_mode = ssl.CERT_REQUIRED  # mTLS: no client certificate, no connection
        self.context.set_alpn_protocols(["h2"])
        self.handshakes = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        host, port = self.upstream.rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def __aenter__(self) -> TlsFront:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port, ssl=self.context)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


async def test_temporal_over_mtls_with_a_private_ca_and_server_name(tmp_path: Path, temporal_server: TemporalDevServer) -> None:
    async with TlsFront(tmp_path, temporal_server.address) as front:
        base = Settings(temporal_address=front.address, payload_keys=TEST_PAYLOAD_KEY, _env_file=None)  # type: ignore[call-arg]
        mtls = base.model_copy(update={
            "temporal_tls_ca_file": front.ca, "temporal_tls_server_name": "temporal.test",
            "temporal_tls_cert_file": front.client_cert, "temporal_tls_key_file": front.client_key,
            "temporal_api_key": SecretStr("tmprl-test-api-key"),  # sent as a Bearer header over that TLS
        })
        client = await connect(mtls)
        assert await client.service_client.check_health()
        assert front.handshakes >= 1

        # Each part matters: no client certificate, no trusted CA, or the wrong name: no connection.
        refused = {
            "no client certificate": mtls.model_copy(update={"temporal_tls_cert_file": None, "temporal_tls_key_file": None}),
            "system roots only": mtls.model_copy(update={"temporal_tls_ca_file": None}),
            "the address's name": mtls.model_copy(update={"temporal_tls_server_name": None}),
        }
        for case, settings in refused.items():
            try:
                await asyncio.wait_for(connect(settings), timeout=PROCESS_STARTS)
            except RuntimeError:
                continue
            pytest.fail(f"connected with {case}")


async def test_an_api_key_alone_means_tls(temporal_server: TemporalDevServer) -> None:
    """Temporal Cloud takes an API key over TLS: with the key set, the client speaks TLS, which the
    plain dev server does not (while the same settings without the key connect)."""
    plain = Settings(temporal_address=temporal_server.address, payload_keys=TEST_PAYLOAD_KEY, _env_file=None)  # type: ignore[call-arg]
    assert tls_config(plain) is None and await (await connect(plain)).service_client.check_health()
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(connect(plain.model_copy(update={"temporal_api_key": SecretStr("tmprl-key")})), timeout=PROCESS_STARTS)
    assert tls_config(plain.model_copy(update={"temporal_tls": True})) is True  # system roots


def test_tls_settings_that_cannot_work_are_refused_clearly(tmp_path: Path) -> None:
    base = Settings(_env_file=None)  # type: ignore[call-arg]
    with pytest.raises(TemporalSettingsError, match="TLS_CERT_FILE and MAILQUEUE_TEMPORAL_TLS_KEY_FILE go together"):
        tls_config(base.model_copy(update={"temporal_tls_cert_file": tmp_path / "c.pem"}))
    missing = tmp_path / "nowhere" / "ca.pem"
    with pytest.raises(TemporalSettingsError, match="MAILQUEUE_TEMPORAL_TLS_CA_FILE") as caught:
        tls_config(base.model_copy(update={"temporal_tls_ca_file": missing}))
    assert str(missing) in str(caught.value)


# --- make dev: the UI decodes through the API ----------------------------------------------------


async def test_the_dev_ui_is_started_with_the_api_codec_endpoint(tmp_path: Path) -> None:
    import argparse

    args = argparse.Namespace(host="127.0.0.1", api_port=free_port(), ui_port=free_port(), temporal_port=free_port(),
                              smtp_port=free_port(), mail_port=free_port(), data_dir=tmp_path / "state")
    settings = dev_settings(args, Settings(_env_file=None))  # type: ignore[call-arg]
    # The API and the worker share one generated key in the data folder; the dev UI's origin may call /codec.
    assert settings.payload_key_file == (tmp_path / "state" / "payload.key").resolve() and settings.payload_keys is None
    assert f"http://127.0.0.1:{args.ui_port}" in settings.codec_cors_origins
    endpoint = codec_endpoint(args)
    assert endpoint == f"http://127.0.0.1:{args.api_port}/codec"
    with TemporalDevServer(args.temporal_port, ui_port=args.ui_port, ui_codec_endpoint=endpoint):
        async with httpx.AsyncClient(timeout=5) as http:

            async def ui_settings() -> dict[str, Any] | None:
                try:
                    return (await http.get(f"http://127.0.0.1:{args.ui_port}/api/v1/settings")).json()
                except httpx.TransportError:
                    return None

            served = await eventually(ui_settings, timeout=PROCESS_STARTS, interval=0.2, what="the dev UI did not answer")
    assert served["Codec"]["Endpoint"] == endpoint  # what the page in the browser calls
