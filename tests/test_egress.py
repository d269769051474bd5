"""The egress policy against the real stack: where a user's settings can make mailqueue connect,
what a stored password may be sent to, and what a user's server's words may tell them.

A TCP listener sits on 127.0.0.1 at a port the stack allows for SMTP: where every forbidden
spelling of a loopback address points. It counts the connections it accepts; each test that
probes it expects none.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult
from temporalio.client import Client

from devstack.devserver import TemporalDevServer
from devstack.net import free_port
from mailqueue.crypto import SecretBox
from mailqueue.models import SenderSettings
from tests.dns_stub import DnsStub
from tests.helpers import AUTH, ApiProcess, ScriptedHandler, SmtpSink, Stack, fast_settings, tls_issued_by, trusted_ca, verify_domain, wait_status
from worker import build_worker

PASSWORD = "egress-Smtp-passw0rd-4c2e"
FROM = "Ann <ann@example.org>"  # the users here verify example.org
PUBLIC = "93.184.215.14"  # a public address: the check accepts it (nothing is ever sent to it here)
BANNER = "SSH-2.0-OpenSSH_9.6 db-internal-01.corp"


class Listener:
    """A TCP port on 127.0.0.1 that counts the connections it accepts; it can speak first (a banner)."""

    def __init__(self, port: int = 0, banner: bytes | None = None) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self.banner = banner
        self.accepted = 0
        self._open: list[socket.socket] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.banner is not None:
                conn.sendall(self.banner)
            self._open.append(conn)  # held open: the client decides when it has heard enough

    def close(self) -> None:
        self._stopped = True
        self._thread.join(timeout=5)
        for conn in self._open:
            conn.close()
        self._sock.close()


def _port_2525_or_free() -> int:
    """2525 (an SMTP port the policy allows anyway) when nothing holds it, else a free port the stack allows too."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 2525))
            return 2525
        except OSError:
            return free_port()


class AuthRecorder:
    """An SMTP server that offers AUTH with or without TLS and accepts any login, recording every
    connection and AUTH command: only the client's own rules keep a password from it."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.connections = 0
        self.auth: list[str] = []
        self.handler = ScriptedHandler()
        self.port = free_port()
        recorder = self

        class Recording(SMTP):
            def connection_made(self, transport: Any) -> None:
                if self.transport is None:  # STARTTLS calls it again on the same connection
                    recorder.connections += 1
                super().connection_made(transport)

            async def smtp_AUTH(self, arg: str) -> None:
                recorder.auth.append(arg.split()[0] if arg else "")
                await super().smtp_AUTH(arg)

        class RecordingController(Controller):
            def factory(self) -> SMTP:
                return Recording(self.handler, **self.SMTP_kwargs)

        tls_kw: dict[str, Any] = {"tls_context": tls} if tls is not None else {}
        self._controller = RecordingController(
            self.handler, hostname="127.0.0.1", port=self.port, authenticator=lambda *a: AuthResult(success=True),
            auth_require_tls=False, auth_exclude_mechanism=["LOGIN"], **tls_kw,
        )
        self._controller.start()
        self.connections = 0  # start() made a readiness connection of its own

    def close(self) -> None:
        self._controller.stop()


# --- the stack ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[trustme.CA]:
    with trusted_ca(tmp_path_factory.mktemp("ca")) as authority:
        yield authority


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    found = Listener(_port_2525_or_free())
    yield found
    found.close()


@pytest.fixture(scope="module")
async def egress(
    client: Client, database_url: str, temporal_server: TemporalDevServer, tmp_path_factory: pytest.TempPathFactory,
    dns_stub: DnsStub, listener: Listener,
) -> AsyncIterator[Stack]:
    # Names the tests' DNS answers for. `evil.test` and `plain.test` stand for public servers
    # (allowed by name, as the stack cannot reach a real one); the others must all be refused.
    for name, rdtype, value in [
        ("loop.test", "A", "127.0.0.1"), ("loop6.test", "AAAA", "::1"), ("mapped.test", "AAAA", "::ffff:127.0.0.1"),
        ("mixed.test", "A", PUBLIC), ("mixed.test", "A", "127.0.0.1"), ("private.test", "A", "10.0.0.5"),
        ("metadata.google.internal", "A", "127.0.0.1"), ("public.test", "A", PUBLIC),
        ("evil.test", "A", "127.0.0.1"), ("plain.test", "A", "127.0.0.1"),
    ]:
        dns_stub.add(name, rdtype, value)
    tmp = tmp_path_factory.mktemp("egress")
    with SmtpSink() as sink:
        settings = fast_settings(
            database_url, temporal_server.address, sink.port, f"egress-{uuid.uuid4()}", dns_servers=[dns_stub.server],
            egress_allow=["localhost", "evil.test", "plain.test"], smtp_plaintext_auth_hosts=["plain.test"],
            egress_smtp_ports=sorted({25, 465, 587, 2525, listener.port}), user_unreachable_wait_seconds=3,
        )
        async with build_worker(client, settings):
            async with ApiProcess(settings, tmp / "api.log") as api:
                async with httpx.AsyncClient(base_url=api.url, headers=AUTH, timeout=60) as http:
                    yield Stack(http, sink, settings, tmp)


@pytest.fixture
async def ann(egress: Stack, sessions: Any) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """A user with a key, sending from example.org (verified)."""
    made = await egress.http.post("/v1/users", json={"name": f"ann-{uuid.uuid4().hex[:8]}", "email": "ann@example.org"})
    assert made.status_code == 201, made.text
    user_id = made.json()["id"]
    key = (await egress.http.post(f"/v1/users/{user_id}/api-keys", json={"name": "tests"})).json()["key"]
    await verify_domain(sessions, user_id, "example.org")
    async with httpx.AsyncClient(base_url=str(egress.http.base_url), headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        yield user_id, http


async def store_past_the_door(sessions: Any, egress: Stack, user_id: str, **fields: Any) -> None:
    """Settings written straight to the database, as if the door had let them through (or DNS
    changed since): the send must hold the line on its own."""
    if "smtp_password" in fields:
        fields["smtp_password_enc"] = SecretBox.from_settings(egress.settings).encrypt(fields.pop("smtp_password"))
    async with sessions() as s:
        row = await s.get(SenderSettings, user_id) or SenderSettings(user_id=user_id)
        for name, value in ({"driver": "user_smtp", "default_from": FROM, "smtp_security": "none"} | fields).items():
            setattr(row, name, value)
        s.add(row)
        await s.commit()


async def send_one(http: httpx.AsyncClient, subject: str) -> str:
    sent = await http.post("/v1/emails", json={"from": FROM, "to": ["bob@example.com"], "subject": subject, "text": "hi"})
    assert sent.status_code == 202, sent.text
    return str(sent.json()["id"])


# --- SSRF: refused at the door, and again at send -----------------------------------------------

# Every spelling of a forbidden destination, with the rule the answer must name. The first ones
# all mean the listener's address; the names' answers never say which address they resolved to.
REFUSED = {
    "2130706433": "is a loopback address",  # 127.0.0.1 as one number
    "0177.0.0.1": "is a loopback address",  # octal
    "0x7f.0.0.1": "is a loopback address",  # hex
    "0x7f000001": "is a loopback address",
    "127.1": "is a loopback address",  # the short form
    "127.0.0.1.": "is a loopback address",  # a trailing dot
    "0": "is an unspecified address",  # 0.0.0.0: reaches this host
    "::ffff:127.0.0.1": "is a loopback address",  # IPv4-mapped IPv6
    "[::1]": "is a loopback address",
    "64:ff9b::7f00:1": "is a loopback address",  # NAT64 of 127.0.0.1
    "2002:7f00:1::": "is a loopback address",  # 6to4 of 127.0.0.1
    "localhost.": "is a local name",  # not the allowed name `localhost`, as written
    "loop.test": "resolves to a loopback address",
    "loop6.test": "resolves to a loopback address",
    "mapped.test": "resolves to a loopback address",
    "mixed.test": "resolves to a loopback address",  # one public address does not excuse the other
    "private.test": "resolves to a private address",
    "169.254.169.254": "is a cloud metadata address",
    "fd00:ec2::254": "is a cloud metadata address",
    "100.100.100.200": "is a cloud metadata address",
    "metadata.google.internal": "is a cloud metadata name",
    "10.0.0.5": "is a private address",
    "172.16.0.1": "is a private address",
    "100.64.0.1": "is a shared (CGNAT) address",
    "fe80::1": "is a link-local address",
    "224.0.0.1": "is a multicast address",
    "198.18.0.1": "is a benchmarking address",
    "192.0.2.1": "is a documentation address",
    "postgresql": "is not a fully qualified domain name",  # a neighbour by its service name
    "nowhere.test": "does not resolve to any address",
}


async def test_every_spelling_of_a_forbidden_host_is_refused_at_the_door_and_nothing_is_connected_to(
    egress: Stack, ann: tuple[str, httpx.AsyncClient], listener: Listener, dns_stub: DnsStub,
) -> None:
    _, http = ann
    before = listener.accepted
    answers = {}
    for host in REFUSED:
        put = await http.put("/v1/settings/mail", json={"driver": "user_smtp", "smtp_host": host, "smtp_port": listener.port,
                                                         "smtp_security": "starttls", "default_from": FROM})
        assert put.status_code == 422, (host, put.text)
        [error] = put.json()["detail"]
        assert error["loc"] == ["body", "smtp_host"] and error["type"] == "egress_refused", (host, error)
        answers[host] = error["msg"]
    assert answers == {host: f"{host} {reason}" for host, reason in REFUSED.items()}
    assert not any("127.0.0.1" in msg for host, msg in answers.items() if host.endswith(".test")), answers  # no address told

    # The port: an SMTP port only (the listener's is allowed in this stack), whatever the host.
    for port in (22, 5432, 6379):
        put = await http.put("/v1/settings/mail", json={"driver": "user_smtp", "smtp_host": "public.test", "smtp_port": port})
        assert put.status_code == 422 and put.json()["detail"][0]["loc"] == ["body", "smtp_port"], put.text
        assert put.json()["detail"][0]["msg"].startswith(f"port {port} is not an SMTP port (allowed: 25, "), put.text
    fine = await http.put("/v1/settings/mail", json={"driver": "user_smtp", "smtp_host": "public.test", "smtp_port": 587})
    assert fine.status_code == 200, fine.text  # a public server on a mail port passes
    assert listener.accepted == before, "a refused destination was connected to"


async def test_a_forbidden_host_stored_past_the_door_fails_at_send_and_nothing_is_connected_to(
    egress: Stack, ann: tuple[str, httpx.AsyncClient], listener: Listener, sessions: Any, client: Client,
) -> None:
    user_id, http = ann
    before = listener.accepted
    for host in ("2130706433", "0", "::ffff:127.0.0.1", "0x7f.1", "loop.test", "localhost."):
        await store_past_the_door(sessions, egress, user_id, smtp_host=host, smtp_port=listener.port)
        email_id = await send_one(http, f"to {host}")
        failed = await wait_status(http, email_id, "failed")
        assert failed["last_error"] == f"destination refused: {host} {REFUSED.get(host, 'is a loopback address')}", failed
        assert failed["attempts"] == 1, failed  # permanent: the policy's word does not change on a retry
    assert listener.accepted == before, "a refused destination was connected to"


async def test_dns_rebinding_after_the_door_cannot_reach_loopback(
    egress: Stack, ann: tuple[str, httpx.AsyncClient], listener: Listener, dns_stub: DnsStub,
) -> None:
    """The name was public at the door and points at the listener by the time the mail goes: the
    send checks again and connects only to what it checked."""
    _, http = ann
    name = f"rebind-{uuid.uuid4().hex[:8]}.test"
    dns_stub.set(name, "A", PUBLIC)
    put = await http.put("/v1/settings/mail", json={"driver": "user_smtp", "smtp_host": name, "smtp_port": listener.port,
                                                     "smtp_security": "none", "default_from": FROM})
    assert put.status_code == 200, put.text
    before = listener.accepted
    dns_stub.set(name, "A", "127.0.0.1")
    failed = await wait_status(http, await send_one(http, "rebound"), "failed")
    assert failed["last_error"] == f"destination refused: {name} resolves to a loopback address", failed
    tested = await http.post("/v1/settings/mail/test", json={"to": "bob@example.com"})
    assert tested.json()["status"] == "failed" and tested.json()["error"] == failed["last_error"], tested.text
    assert listener.accepted == before, "the rebound name was connected to"


# --- secrets bound to their destination ---------------------------------------------------------


async def test_a_host_change_clears_the_password_and_the_new_server_never_sees_auth(
    egress: Stack, ann: tuple[str, httpx.AsyncClient], ca: trustme.CA,
) -> None:
    user_id, http = ann
    relay, evil = AuthRecorder(tls_issued_by(ca, "localhost")), AuthRecorder(tls_issued_by(ca, "evil.test"))
    try:
        good = {"driver": "user_smtp", "smtp_host": "localhost", "smtp_port": relay.port, "smtp_username": "ann",
                "smtp_security": "starttls", "default_from": FROM}
        assert (await http.put("/v1/settings/mail", json=good | {"smtp_password": PASSWORD})).json()["smtp_password_set"] is True
        sent = await wait_status(http, await send_one(http, "through Ann's relay"), "sent")
        assert relay.auth == ["PLAIN"] and len(relay.handler.messages) == 1, sent  # the password works where it was given

        # Someone holding Ann's key (or an admin through ?user_id=) moves the settings to their server.
        for mover, params in ((http, {}), (egress.http, {"user_id": user_id})):
            moved = await mover.put("/v1/settings/mail", params=params, json=good | {"smtp_host": "evil.test", "smtp_port": evil.port})
            assert moved.status_code == 200 and moved.json()["smtp_password_set"] is False, moved.text
            failed = await wait_status(http, await send_one(http, "to the new server"), "failed")
            assert "no password is stored" in failed["last_error"], failed
            assert (await http.put("/v1/settings/mail", json=good | {"smtp_password": PASSWORD})).json()["smtp_password_set"] is True
        # Over a plain connection AUTH is refused at the door too.
        plain = await http.put("/v1/settings/mail", json=good | {"smtp_host": "evil.test", "smtp_port": evil.port, "smtp_security": "none",
                                                               "smtp_password": PASSWORD})
        assert plain.status_code == 422 and plain.json()["detail"][0]["loc"] == ["body", "smtp_security"], plain.text
        assert evil.auth == [] and evil.connections == 0, "the new server was sent to"
        assert relay.auth == ["PLAIN"]
    finally:
        relay.close()
        evil.close()


async def test_auth_over_a_plain_connection_is_refused_and_never_sent(
    egress: Stack, ann: tuple[str, httpx.AsyncClient], sessions: Any,
) -> None:
    user_id, http = ann
    server = AuthRecorder()  # offers AUTH without TLS: it would take the password
    try:
        await store_past_the_door(sessions, egress, user_id, smtp_host="localhost", smtp_port=server.port, smtp_security="none",
                                  smtp_username="ann", smtp_password=PASSWORD)
        failed = await wait_status(http, await send_one(http, "plain AUTH"), "failed")
        assert failed["last_error"].startswith(f"AUTH refused: the connection to localhost:{server.port} is not encrypted"), failed
        assert failed["attempts"] == 1
        # STARTTLS asked for and not offered: the session ends before AUTH, for good.
        await store_past_the_door(sessions, egress, user_id, smtp_host="localhost", smtp_port=server.port, smtp_security="starttls")
        failed = await wait_status(http, await send_one(http, "no STARTTLS"), "failed")
        assert failed["last_error"] == f"localhost:{server.port} does not offer STARTTLS (security is starttls); nothing was sent", failed
        assert failed["attempts"] == 1
        assert server.auth == [] and server.handler.messages == []

        # A host the operator named in MAILQUEUE_SMTP_PLAINTEXT_AUTH_HOSTS: AUTH goes, in clear, as allowed.
        await store_past_the_door(sessions, egress, user_id, smtp_host="plain.test", smtp_port=server.port, smtp_security="none")
        await wait_status(http, await send_one(http, "allowed plain AUTH"), "sent")
        assert server.auth == ["PLAIN"]  # so the refusals above were ours, not the server's
    finally:
        server.close()


# --- remote words: classified for users, kept for the operator's log -----------------------------


async def test_the_test_send_says_the_same_for_a_closed_port_a_silent_one_and_another_service(
    egress: Stack, ann: tuple[str, httpx.AsyncClient], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="mailqueue.drivers.smtp")
    _, http = ann
    ssh, silent = Listener(banner=(BANNER + "\x1b[2J\r\n").encode()), Listener()
    closed = free_port()
    answers, records = {}, {}
    try:
        for kind, port in (("ssh", ssh.port), ("silent", silent.port), ("closed", closed)):
            put = await http.put("/v1/settings/mail", json={"driver": "user_smtp", "smtp_host": "localhost", "smtp_port": port,
                                                             "smtp_security": "none", "default_from": FROM})
            assert put.status_code == 200, put.text
            tested = await http.post("/v1/settings/mail/test", json={"to": "bob@example.com"})
            assert tested.status_code == 200, tested.text
            answers[kind] = tested.json()
            records[kind] = (await http.get(f"/v1/emails/{tested.json()['email_id']}")).text
    finally:
        ssh.close()
        silent.close()
    assert ssh.accepted and silent.accepted  # both were reached: the words below hide only what they are
    shapes = {kind: (a["status"], re.sub(r"localhost:\d+", "localhost:PORT", a["error"] or "")) for kind, a in answers.items()}
    assert set(shapes.values()) == {("failed", "could not reach an SMTP server at localhost:PORT")}, shapes
    for text in (json.dumps(answers), *records.values()):
        assert "SSH" not in text and "db-internal" not in text
    logged = [r.getMessage() for r in caplog.records if r.name == "mailqueue.drivers.smtp"]
    assert any(BANNER in line for line in logged), logged  # the operator sees what answered, scrubbed
    assert not any("\x1b" in line for line in logged)


async def test_a_users_unreachable_server_is_waited_for_the_users_wait_not_hours(
    egress: Stack, ann: tuple[str, httpx.AsyncClient],
) -> None:
    _, http = ann
    closed = free_port()
    put = await http.put("/v1/settings/mail", json={"driver": "user_smtp", "smtp_host": "localhost", "smtp_port": closed,
                                                     "smtp_security": "none", "default_from": FROM})
    assert put.status_code == 200, put.text
    failed = await wait_status(http, await send_one(http, "nobody home"), "failed")
    waits = [e["detail"] for e in failed["events"] if e["event"] == "retrying"]
    assert waits and all("up to 3s in all" in (d or "") for d in waits), waits  # user_unreachable_wait_seconds, not 6 h
    assert f"could not reach an SMTP server at localhost:{closed}" in failed["last_error"], failed
    assert "still unreachable after waiting" in failed["last_error"], failed


# --- the policy itself: what MAILQUEUE_EGRESS_ALLOW lifts ----------------------------------------


async def test_egress_allow_lifts_both_rules_only_for_exactly_what_it_names(dns_stub: DnsStub) -> None:
    from mailqueue.config import Settings
    from mailqueue.egress import DestinationRefused, Kind, check_destination

    dns_stub.set("relay.corp.test", "A", "10.9.9.9")
    dns_stub.set("in-range.corp.test", "A", "10.1.2.3")
    dns_stub.set("half.corp.test", "A", "10.1.2.3", PUBLIC)
    settings = Settings(egress_allow=["10.1.0.0/16", "relay.corp.test"], dns_servers=[dns_stub.server], _env_file=None)  # type: ignore[call-arg]

    async def verdict(host: str, port: int = 25) -> str:
        try:
            return ", ".join(str(ip) for ip in await check_destination(settings, host, port, kind=Kind.SMTP))
        except DestinationRefused as exc:
            return f"refused: {exc.reason}"

    assert await verdict("10.1.2.3", 2200) == "10.1.2.3"  # a listed network: address and port rules lifted
    assert await verdict("in-range.corp.test", 2200) == "10.1.2.3"  # a name whose every address is in it, too
    assert await verdict("10.2.0.1") == "refused: is a private address"  # next door is not listed
    assert await verdict("relay.corp.test", 2200) == "10.9.9.9"  # a listed name, exactly as written (case aside)
    assert await verdict("RELAY.corp.test", 2200) == "10.9.9.9"
    assert await verdict("relay.corp.test.") == "refused: resolves to a private address"  # another spelling is another name
    assert await verdict("half.corp.test", 2200) == "refused: port 2200 is not an SMTP port (allowed: 25, 465, 587, 2525)"
    assert set((await verdict("half.corp.test", 587)).split(", ")) == {"10.1.2.3", PUBLIC}  # DNS keeps no order
    assert await verdict(PUBLIC, 443) == "refused: port 443 is not an SMTP port (allowed: 25, 465, 587, 2525)"
    assert [str(ip) for ip in await check_destination(settings, PUBLIC, 443, kind=Kind.HTTP)] == [PUBLIC]
