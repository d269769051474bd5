"""The SMTP driver against real aiosmtpd servers: security modes, auth, and error classes."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailqueue.config import SmtpSecurity
from mailqueue.drivers.smtp import SmtpDriver
from mailqueue.errors import PermanentDeliveryError, TransientDeliveryError
from mailqueue.net import free_port
from tests.helpers import ScriptedHandler

PASSWORD = "s3cret-Passw0rd!"


def _auth(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    def text(value: str | bytes) -> str:
        return value.decode() if isinstance(value, bytes) else value

    ok = isinstance(data, LoginPassword) and text(data.login) == "mailer" and text(data.password) == PASSWORD
    return AuthResult(success=ok, handled=False)  # handled=False: the server answers 235/535 itself


@pytest.fixture(scope="module")
def server_tls() -> ssl.SSLContext:
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


def _serve(**kw: Any) -> tuple[Controller, ScriptedHandler, int]:
    handler = ScriptedHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, **kw)
    controller.start()
    return controller, handler, port


@pytest.fixture
def starttls_server(server_tls: ssl.SSLContext) -> Iterator[tuple[ScriptedHandler, int]]:
    controller, handler, port = _serve(
        tls_context=server_tls, require_starttls=True, authenticator=_auth, auth_require_tls=True,
        # aiosmtpd's LOGIN does not take the initial response aiosmtplib sends; PLAIN is what relays offer.
        auth_exclude_mechanism=["LOGIN"],
    )
    yield handler, port
    controller.stop()


def message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"], msg["Message-ID"] = "a@example.com", "b@example.com", "t", "<x@example.com>"
    msg.set_content("hello")
    return msg


async def test_starttls_with_auth_delivers(starttls_server: tuple[ScriptedHandler, int]) -> None:
    handler, port = starttls_server
    driver = SmtpDriver("127.0.0.1", port, security=SmtpSecurity.STARTTLS, username="mailer", password=PASSWORD,
                        validate_certs=False, timeout=5)
    delivery = await driver.send(message(), "a@example.com", ["b@example.com"])
    assert len(handler.messages) == 1 and delivery.provider_message_id.startswith("C")


async def test_wrong_password_is_permanent_and_never_echoes_the_secret(starttls_server: tuple[ScriptedHandler, int]) -> None:
    handler, port = starttls_server
    wrong = "not-the-" + PASSWORD
    driver = SmtpDriver("127.0.0.1", port, security=SmtpSecurity.STARTTLS, username="mailer", password=wrong,
                        validate_certs=False, timeout=5)
    with pytest.raises(PermanentDeliveryError) as exc:
        await driver.send(message(), "a@example.com", ["b@example.com"])
    assert "authentication refused" in exc.value.reason and exc.value.code == 535
    assert wrong not in str(exc.value) and "mailer" not in str(exc.value)
    assert handler.messages == []


async def test_plain_connection_to_a_starttls_only_server_is_refused_permanently(starttls_server: tuple[ScriptedHandler, int]) -> None:
    _, port = starttls_server
    driver = SmtpDriver("127.0.0.1", port, security=SmtpSecurity.NONE, timeout=5)
    with pytest.raises(PermanentDeliveryError, match="530"):
        await driver.send(message(), "a@example.com", ["b@example.com"])


async def test_implicit_tls_delivers(server_tls: ssl.SSLContext) -> None:
    controller, handler, port = _serve(ssl_context=server_tls)
    try:
        driver = SmtpDriver("127.0.0.1", port, security=SmtpSecurity.TLS, validate_certs=False, timeout=5)
        await driver.send(message(), "a@example.com", ["b@example.com"])
        assert len(handler.messages) == 1
    finally:
        controller.stop()


async def test_untrusted_certificate_is_refused_when_validating(server_tls: ssl.SSLContext) -> None:
    controller, handler, port = _serve(ssl_context=server_tls)
    try:
        driver = SmtpDriver("127.0.0.1", port, security=SmtpSecurity.TLS, validate_certs=True, timeout=5)
        with pytest.raises(TransientDeliveryError, match="cannot talk to"):
            await driver.send(message(), "a@example.com", ["b@example.com"])
        assert handler.messages == []
    finally:
        controller.stop()


@pytest.mark.parametrize(
    ("reply", "error"),
    [("451 4.3.0 Try again later", TransientDeliveryError), ("421 4.4.2 Closing", TransientDeliveryError),
     ("550 5.7.1 Spam", PermanentDeliveryError), ("554 5.0.0 Failed", PermanentDeliveryError)],
)
async def test_smtp_replies_are_classified(reply: str, error: type[Exception]) -> None:
    controller, handler, port = _serve()
    handler.data_replies.append(reply)
    try:
        with pytest.raises(error, match=reply.split()[0]):
            await SmtpDriver("127.0.0.1", port, timeout=5).send(message(), "a@example.com", ["b@example.com"])
    finally:
        controller.stop()


async def test_partly_refused_recipients_are_reported_not_failed() -> None:
    controller, handler, port = _serve()
    handler.rejected_recipients["gone@example.com"] = "550 5.1.1 No such user"
    try:
        delivery = await SmtpDriver("127.0.0.1", port, timeout=5).send(
            message(), "a@example.com", ["b@example.com", "gone@example.com"]
        )
        assert list(delivery.refused_recipients) == ["gone@example.com"]
        assert handler.messages[0].rcpt_tos == ["b@example.com"]
    finally:
        controller.stop()


async def test_nothing_listening_is_transient() -> None:
    with pytest.raises(TransientDeliveryError, match="cannot talk to"):
        await SmtpDriver("127.0.0.1", free_port(), timeout=2).send(message(), "a@example.com", ["b@example.com"])


async def test_a_silent_server_times_out_as_transient() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TransientDeliveryError):
            await SmtpDriver("127.0.0.1", listener.getsockname()[1], timeout=1).send(
                message(), "a@example.com", ["b@example.com"]
            )
        assert asyncio.get_running_loop().time() - started < 5
    finally:
        for s in accepted:
            s.close()
        listener.close()
