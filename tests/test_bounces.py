"""Bounces by mail for SMTP senders (issue 14, item 3's second half, item 5's mailto): VERP envelope
senders, the bounce listener fed real DSNs over SMTP, and unsubscribe by mail. A real API process,
a real worker, the real SMTP sink and the listener on a free port; the parser on bounces shaped as
Postfix, Exchange and Gmail write them."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml
from temporalio.client import Client

from devstack.devserver import TemporalDevServer
from devstack.net import free_port
from mailqueue.bounce_server import BounceListener, attribute, feedback_of
from mailqueue.bounces import Action, Addressed, RecipientStatus, Report, addressed, parse, sender_of, unsubscribe_mailto
from mailqueue.config import Settings
from mailqueue.feedback import FeedbackKind
from mailqueue.models import SenderSettings
from tests.dns_stub import DnsStub
from tests.helpers import (
    ROOT,
    Sender,
    Stack,
    delivered,
    new_user,
    run_cli,
    running_stack,
    wait_status,
)

DOMAIN = "bounces.example.test"
PUBLIC_URL = "https://mail.example.test"
LINKS = re.compile(r"^<https://mail\.example\.test/u/[A-Za-z0-9_-]{40,}>, <mailto:(unsubscribe\+[0-9a-f-]{36})@bounces\.example\.test\?subject=unsubscribe>$")


@pytest.fixture(scope="module")
async def stack(
    client: Client, database_url: str, temporal_server: TemporalDevServer, tmp_path_factory: pytest.TempPathFactory,
    dns_stub: DnsStub,
) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("bounces")
    async with running_stack(
        client, database_url, temporal_server.address, dns_stub.server, tmp, "bounces", public_url=PUBLIC_URL, bounce_domain=DOMAIN,
        bounce_max_bytes=100_000,
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
async def listener(stack: Stack) -> AsyncIterator[BounceListener]:
    """The bounce listener, as `mailqueue bounces` runs it, on a free port."""
    async with BounceListener(stack.settings, host="127.0.0.1", port=free_port()) as running:
        yield running


@pytest.fixture
async def user(stack: Stack, sessions: Any) -> AsyncIterator[Sender]:
    async with new_user(stack, sessions) as sender:
        yield sender


async def mail_to(listener: BounceListener, rcpt: str, data: bytes, sender: str = "") -> tuple[int, str]:
    """One message over SMTP, as a reporting server sends it (the null sender by default): the DATA reply."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=listener.port, timeout=30) as smtp:
        await smtp.mail(sender)
        await smtp.rcpt(rcpt)
        reply = await smtp.data(data)
    return reply.code, reply.message


async def sent_email(user: Sender, to: str, **fields: Any) -> dict[str, Any]:
    r = await user.http.post("/v1/emails", json=user.mail(to=[to], **fields))
    assert r.status_code == 202, r.text
    return await wait_status(user.http, r.json()["id"], "sent")


# --- bounces as servers write them ------------------------------------------------------------


def postfix_dsn(email_id: str, recipient: str, *, status: str = "5.1.1", action: str = "failed", message_id: str | None = None,
                diagnostic: str | None = None) -> bytes:
    mid = message_id or f"<{uuid.uuid4().hex}@mx.example.net>"
    diag = diagnostic or f"smtp; {status[0]}50 {status} <{recipient}>: Recipient address rejected: User unknown in local recipient table"
    return f"""Return-Path: <>
Received: by mx.example.net (Postfix) id 4Xabc; {formatdate()}
Date: {formatdate()}
From: MAILER-DAEMON@mx.example.net (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: bounce+{email_id}@{DOMAIN}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="4Xabc.1700000000/mx.example.net"
Message-Id: {mid}

This is a MIME-encapsulated message.

--4Xabc.1700000000/mx.example.net
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.example.net.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

<{recipient}>: host mx.example.org[192.0.2.1] said: {diag.removeprefix("smtp; ")}

--4Xabc.1700000000/mx.example.net
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net
X-Postfix-Queue-ID: 4Xabc
X-Postfix-Sender: rfc822; bounce+{email_id}@{DOMAIN}
Arrival-Date: {formatdate()}

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822;{recipient}
Action: {action}
Status: {status}
Remote-MTA: dns; mx.example.org
Diagnostic-Code: {diag}

--4Xabc.1700000000/mx.example.net
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

Return-Path: <bounce+{email_id}@{DOMAIN}>
From: Sender <mail@sender.example>
To: {recipient}
Subject: Hello
Message-ID: <{email_id}@sender.example>

--4Xabc.1700000000/mx.example.net--
""".replace("\n", "\r\n").encode()


EXCHANGE_NDR = """From: postmaster@contoso.onmicrosoft.com
To: bounce+0190f5c2-4d2e-7abc-8def-0123456789ab@bounces.example.test
Date: Mon, 1 Jan 2024 10:00:00 +0000
Subject: Undeliverable: Hello
Message-ID: <a1b2c3d4-e5f6@AM0PR01MB1234.eurprd01.prod.exchangelabs.com>
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="_000_a1b2_"
MIME-Version: 1.0

--_000_a1b2_
Content-Type: multipart/alternative; boundary="_002_a1b2_"

--_002_a1b2_
Content-Type: text/plain; charset="us-ascii"

Your message to bob@contoso.com couldn't be delivered.
bob wasn't found at contoso.com.

Remote Server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup'

--_002_a1b2_
Content-Type: text/html; charset="us-ascii"

<html><body><p>Your message to bob@contoso.com couldn't be delivered.</p></body></html>

--_002_a1b2_--

--_000_a1b2_
Content-Type: message/delivery-status

Reporting-MTA: dns;AM0PR01MB1234.eurprd01.prod.exchangelabs.com
Received-From-MTA: dns;mail.sender.example
Arrival-Date: Mon, 1 Jan 2024 10:00:00 +0000

Original-Recipient: rfc822;Bob@contoso.com
Final-Recipient: rfc822;bob@contoso.com
Action: failed
Status: 5.1.10
Diagnostic-Code: smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup

--_000_a1b2_
Content-Type: message/rfc822

From: Sender <mail@sender.example>
To: <Bob@contoso.com>
Subject: Hello
Message-ID: <0190f5c2-4d2e-7abc-8def-0123456789ab@sender.example>

Hi

--_000_a1b2_--
"""

GMAIL_DELAYED = """Delivered-To: bounce+0190f5c2-4d2e-7abc-8def-0123456789ab@bounces.example.test
Return-Path: <>
From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>
To: bounce+0190f5c2-4d2e-7abc-8def-0123456789ab@bounces.example.test
Auto-Submitted: auto-replied
Subject: Delivery Status Notification (Delay)
Message-ID: <5e8a9f0b.1c69fb81.abcd.1234.GMR@mx.google.com>
Date: Mon, 1 Jan 2024 14:00:00 -0800 (PST)
MIME-Version: 1.0
Content-Type: multipart/report; boundary="000000000000abcd"; report-type=delivery-status

--000000000000abcd
Content-Type: multipart/related; boundary="000000000000ef01"

--000000000000ef01
Content-Type: multipart/alternative; boundary="000000000000ef02"

--000000000000ef02
Content-Type: text/plain; charset="UTF-8"

** Delivery incomplete **

There was a temporary problem delivering your message to carol@example.org. Gmail will retry for 45 more hours.

The response from the remote server was:
421 4.4.0 [example.org: Connection timed out]

--000000000000ef02--
--000000000000ef01--
--000000000000abcd
Content-Type: message/delivery-status

Reporting-MTA: dns; googlemail.com
Arrival-Date: Mon, 01 Jan 2024 10:00:00 -0800 (PST)
X-Original-Message-ID: <0190f5c2-4d2e-7abc-8def-0123456789ab@sender.example>

Final-Recipient: rfc822; carol@example.org
Action: delayed
Status: 4.4.1
Diagnostic-Code: smtp; The recipient server did not accept our requests to connect.
Last-Attempt-Date: Mon, 01 Jan 2024 14:00:00 -0800 (PST)
Will-Retry-Until: Wed, 03 Jan 2024 10:00:00 -0800 (PST)

--000000000000abcd
Content-Type: message/rfc822

From: Sender <mail@sender.example>
Subject: Hello

Hi
--000000000000abcd--
"""

QMAIL_TEXT = """From: MAILER-DAEMON@mail.example.org
To: bounce+0190f5c2-4d2e-7abc-8def-0123456789ab@bounces.example.test
Subject: failure notice

Hi. This is the qmail-send program at mail.example.org.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<dan@example.org>:
Sorry, no mailbox here by that name. (#5.1.1)

--- Below this line is a copy of the message.

Return-Path: <bounce+0190f5c2-4d2e-7abc-8def-0123456789ab@bounces.example.test>
To: dan@example.org, someone-else@example.org
Subject: price list: 450 4.2.2 items
"""

VACATION = """From: Dan <dan@example.org>
To: bounce+0190f5c2-4d2e-7abc-8def-0123456789ab@bounces.example.test
Subject: Out of office: Hello
Auto-Submitted: auto-replied

I am away until Monday, back on 2 January.
"""


# --- the parser ---------------------------------------------------------------------------------


def test_a_postfix_report_is_read_per_recipient() -> None:
    email_id = str(uuid.uuid4())
    report = parse(postfix_dsn(email_id, "ann@example.org", message_id="<dsn-1@mx.example.net>"))
    assert report.dsn and report.key == "<dsn-1@mx.example.net>" and not report.auto_reply
    (status,) = report.recipients
    assert (status.recipient, status.action, status.status, status.hard) == ("ann@example.org", Action.FAILED, "5.1.1", True)
    assert status.diagnostic == "550 5.1.1 <ann@example.org>: Recipient address rejected: User unknown in local recipient table"


def test_an_exchange_report_names_the_original_recipient() -> None:
    report = parse(EXCHANGE_NDR.replace("\n", "\r\n").encode())
    (status,) = report.recipients
    assert report.dsn and report.key == "<a1b2c3d4-e5f6@AM0PR01MB1234.eurprd01.prod.exchangelabs.com>"
    # Original-Recipient is the address we sent to; Final-Recipient what the server made of it.
    assert (status.recipient, status.final_recipient, status.status, status.hard) == ("Bob@contoso.com", "bob@contoso.com", "5.1.10", True)
    assert status.diagnostic.startswith("550 5.1.10 RESOLVER.ADR.RecipientNotFound")


def test_a_gmail_delay_is_soft() -> None:
    (status,) = parse(GMAIL_DELAYED.encode()).recipients
    assert (status.recipient, status.action, status.status, status.hard) == ("carol@example.org", Action.DELAYED, "4.4.1", False)
    assert status.diagnostic == "The recipient server did not accept our requests to connect."


def test_a_report_for_several_recipients_and_one_without_a_status_field() -> None:
    dsn = postfix_dsn(str(uuid.uuid4()), "ann@example.org").decode().replace(
        "Diagnostic-Code:", "X-Spare: 1\r\n\r\nFinal-Recipient: rfc822; eve@example.org\r\nAction: failed\r\n"
        "Diagnostic-Code: smtp; 552 5.2.2 mailbox full\r\n\r\nFinal-Recipient: rfc822; fay@example.org\r\nAction: delivered\r\nStatus: 2.0.0\r\nDiagnostic-Code:", 1,
    )
    found = [(s.recipient, s.action, s.status) for s in parse(dsn.encode()).recipients]
    assert found == [
        ("ann@example.org", Action.FAILED, "5.1.1"), ("eve@example.org", Action.FAILED, "5.2.2"), ("fay@example.org", Action.DELIVERED, "2.0.0"),
    ]


def test_a_utf8_global_report_is_read_too() -> None:
    dsn = postfix_dsn(str(uuid.uuid4()), "ann@example.org").decode()
    dsn = dsn.replace("Content-Type: message/delivery-status", "Content-Type: message/global-delivery-status\r\nContent-Transfer-Encoding: 8bit")
    dsn = dsn.replace("Final-Recipient: rfc822; ann@example.org", "Final-Recipient: utf-8; jörg@example.org").replace("Original-Recipient: rfc822;ann@example.org\r\n", "")
    (status,) = parse(dsn.encode()).recipients
    assert (status.recipient, status.status) == ("jörg@example.org", "5.1.1")


def test_a_bounce_that_is_not_a_report_is_read_from_its_text() -> None:
    report = parse(QMAIL_TEXT.encode())
    (status,) = report.recipients
    assert not report.dsn and report.key.startswith("sha256:")
    # The code in the server's words (#5.1.1), not the 4.2.2 in the returned message's subject.
    assert (status.status, status.hard) == ("5.1.1", True) and "Sorry, no mailbox here" in status.diagnostic
    assert report.mentioned == ["dan@example.org"]  # the returned copy's addresses are not the server's words

    soft = parse(b"From: postmaster@example.org\r\nSubject: Mail delivery failed\r\n\r\nThe mailbox is busy, we will try later.\r\n")
    assert (soft.recipients[0].status, soft.recipients[0].hard) == ("4.0.0", False)
    reply_only = parse(b"Subject: Returned mail\r\n\r\n<gus@example.org>: host mx.example.org said: 554 delivery error\r\n")
    assert (reply_only.recipients[0].status, reply_only.recipients[0].hard) == ("5.0.0", True)


def test_an_automatic_reply_is_not_a_bounce_and_garbage_is_read_as_text() -> None:
    assert parse(VACATION.encode()).auto_reply
    for garbage in (b"", b"\x00\xff\xfe" * 1000, b"Content-Type: multipart/report; boundary=x\r\n\r\n--x\r\nContent-Type: message/delivery-status\r\n\r\n\xff\r\n",
                    b"Content-Type: message/delivery-status\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!notbase64", b"\r\n\r\n\r\n--"):
        report = parse(garbage)
        assert not report.dsn and len(report.recipients) == 1 and not report.recipients[0].hard, garbage[:40]
    assert sender_of(b"From: Lea <Lea@Example.com>\r\n\r\nunsubscribe") == "Lea@Example.com"
    assert sender_of(b"\xff\x00") is None and sender_of(b"From: nobody\r\n\r\n") is None


def test_listener_addresses() -> None:
    email_id = str(uuid.uuid4())
    assert addressed(f"bounce+{email_id}@{DOMAIN}", DOMAIN) == Addressed("bounce", email_id)
    assert addressed(f"<Unsubscribe+{email_id.upper()}@Bounces.Example.TEST>", DOMAIN) == Addressed("unsubscribe", email_id)
    for other in (f"bounce+{email_id}@example.test", f"postmaster@{DOMAIN}", f"bounce+{email_id[:-1]}x@{DOMAIN}", f"bounce-{email_id}@{DOMAIN}",
                  f"bounce+{email_id.replace('-', '')}xxxx@{DOMAIN}", f"bounce+{email_id}@{DOMAIN}.evil.test", ""):
        assert addressed(other, DOMAIN) is None, other
    mailto = unsubscribe_mailto(email_id, DOMAIN)
    assert len(mailto.removeprefix("<mailto:").split("@")[0]) <= 64


def test_a_report_can_suppress_only_a_recipient_of_the_email() -> None:
    """Anyone who got the email knows its VERP address: a forged report naming a stranger suppresses nobody else."""
    forged = parse(postfix_dsn(str(uuid.uuid4()), "victim@elsewhere.example"))
    two = {"ann@example.org": "Ann <ann@example.org>", "bob@example.org": "bob@example.org"}
    assert attribute(forged.recipients[0], forged, two) is None
    # An email to one recipient: a forward's failure (another final address) is that recipient's.
    assert attribute(forged.recipients[0], forged, {"ann@example.org": "ann@example.org"}) == "ann@example.org"
    real = parse(postfix_dsn(str(uuid.uuid4()), "BOB@example.org"))
    assert attribute(real.recipients[0], real, two) == "bob@example.org"


def test_what_each_action_and_status_class_records() -> None:
    report = Report(True, "<r@mx>")

    def fed(action: Action, status: str) -> tuple[FeedbackKind, bool] | None:
        feedback = feedback_of("id", RecipientStatus("a@example.org", action, status), report, "a@example.org")
        return None if feedback is None else (feedback.kind, feedback.hard)

    assert fed(Action.FAILED, "5.7.1") == (FeedbackKind.BOUNCED, True)
    assert fed(Action.FAILED, "4.4.7") == (FeedbackKind.BOUNCED, False)  # given up, but on a temporary cause: not suppressed
    assert fed(Action.DELAYED, "5.0.0") == (FeedbackKind.BOUNCED, False)  # still trying: never hard
    assert fed(Action.DELIVERED, "2.0.0") == fed(Action.EXPANDED, "2.0.0") == (FeedbackKind.DELIVERED, True)
    assert fed(Action.RELAYED, "2.0.0") is None


# --- through the stack and the listener -----------------------------------------------------------


async def test_the_system_relays_sends_carry_the_verp_sender_and_keep_the_from(stack: Stack, user: Sender, sessions: Any) -> None:
    done = await sent_email(user, "Ann <ann@example.com>")
    (caught,) = await delivered(stack.sink, done["id"])
    assert caught.mail_from == f"bounce+{done['id']}@{DOMAIN}"
    assert caught.message["From"] == f"Sender <mail@{user.domain}>"
    assert caught.message["List-Unsubscribe"] is None  # no unsubscribe asked for: no mailto either

    # Not through a user's own SMTP server: it may refuse a MAIL FROM other than its account's.
    async with sessions() as s:
        s.add(SenderSettings(user_id=user.id, driver="user_smtp", smtp_host="localhost", smtp_port=stack.sink.port, smtp_security="none"))
        await s.commit()
    own = await sent_email(user, "bea@example.com")
    (caught,) = await delivered(stack.sink, own["id"])
    assert caught.mail_from == f"mail@{user.domain}" and caught.message["From"] == f"Sender <mail@{user.domain}>"
    assert own["provider"] == "smtp"


async def test_a_hard_bounce_report_bounces_the_email_and_suppresses_the_address(
    stack: Stack, listener: BounceListener, user: Sender, client: Client,
) -> None:
    done = await sent_email(user, "Zed <zed@example.net>")
    email_id = done["id"]
    code, _ = await mail_to(listener, f"bounce+{email_id}@{DOMAIN}", postfix_dsn(email_id, "zed@example.net"))
    assert code == 250

    record = await wait_status(user.http, email_id, "bounced")
    (bounced,) = [e for e in record["events"] if e["event"] == "bounced"]
    assert bounced["status"] == "bounced"
    assert bounced["detail"].startswith("hard bounce from smtp-dsn for zed@example.net: 5.1.1 failed: 550 5.1.1 <zed@example.net>")
    listed = (await user.http.get("/v1/suppressions", params={"address": "zed@example.net"})).json()
    assert [(i["reason"], i["source"]) for i in listed["items"]] == [("hard_bounce", "smtp-dsn")]

    again = await user.http.post("/v1/emails", json=user.mail(to=["zed@example.net"]))
    assert again.status_code == 202 and again.json()["status"] == "suppressed"
    # A feed reader sees it as well.
    feed = (await user.http.get("/v1/events", params={"type": "bounced"})).json()
    assert email_id in [e["email_id"] for e in feed["events"]]


async def test_a_delayed_report_is_a_soft_bounce_that_changes_nothing_else(stack: Stack, listener: BounceListener, user: Sender) -> None:
    done = await sent_email(user, "yan@example.net")
    email_id = done["id"]
    dsn = postfix_dsn(email_id, "yan@example.net", status="4.4.1", action="delayed", diagnostic="smtp; 421 4.4.1 connection timed out")
    assert (await mail_to(listener, f"bounce+{email_id}@{DOMAIN}", dsn))[0] == 250
    record = (await user.http.get(f"/v1/emails/{email_id}")).json()
    assert record["status"] == "sent"
    assert [(e["status"], e["detail"]) for e in record["events"] if e["event"] == "bounced"] == [
        (None, "soft bounce from smtp-dsn for yan@example.net: 4.4.1 delayed: 421 4.4.1 connection timed out"),
    ]
    assert (await user.http.get("/v1/suppressions", params={"address": "yan@example.net"})).json()["total"] == 0


async def test_the_same_report_twice_is_one_event(stack: Stack, listener: BounceListener, user: Sender) -> None:
    done = await sent_email(user, "xia@example.net")
    email_id = done["id"]
    dsn = postfix_dsn(email_id, "xia@example.net", status="5.2.1", message_id="<same-report@mx.example.net>")
    for _ in range(2):
        assert (await mail_to(listener, f"bounce+{email_id}@{DOMAIN}", dsn))[0] == 250
    record = await wait_status(user.http, email_id, "bounced")
    assert len([e for e in record["events"] if e["event"] == "bounced"]) == 1


async def test_the_listener_refuses_other_addresses_and_survives_garbage(stack: Stack, listener: BounceListener, user: Sender) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=listener.port, timeout=30) as smtp:
        await smtp.mail("")
        for other in (f"postmaster@{DOMAIN}", f"bounce+{uuid.uuid4()}@{DOMAIN}", "someone@example.org", f"bounce+not-an-id@{DOMAIN}"):
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                await smtp.rcpt(other)
            assert refused.value.code == 550, other
        # Nonsense commands get SMTP's own answers; the session goes on.
        assert (await smtp.execute_command(b"GARBAGE \xff\xfe")).code >= 500
        assert (await smtp.execute_command(b"RCPT TO:<<<>>>")).code >= 500

    done = await sent_email(user, "wes@example.net", category="marketing")
    email_id = done["id"]
    # An unsubscribe address exists only for an email that offered one.
    plain = await sent_email(user, "vic@example.net")
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=listener.port, timeout=30) as smtp:
        await smtp.mail("vic@example.net")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused):
            await smtp.rcpt(f"unsubscribe+{plain['id']}@{DOMAIN}")

    bounce = f"bounce+{email_id}@{DOMAIN}"
    # Random bytes in lines SMTP can carry (a run of 1000 bytes without CR or LF is refused as a line too long).
    noise = b"\r\n".join(os.urandom(500) for _ in range(10))
    for garbage in (noise, b"\r\n.\r\n", b"Content-Type: multipart/report; boundary=\r\n\r\n--\r\n--\r\n", b"\x00" * 100):
        assert (await mail_to(listener, bounce, garbage))[0] == 250
    with pytest.raises(aiosmtplib.SMTPDataError) as too_big:
        await mail_to(listener, bounce, b"Subject: big\r\n\r\n" + b"x" * 998 + (b"\r\n" + b"y" * 998) * (stack.settings.bounce_max_bytes // 1000 + 10))
    assert too_big.value.code == 552
    record = (await user.http.get(f"/v1/emails/{email_id}")).json()
    assert record["status"] == "sent"  # garbage is at most a soft bounce read from its text
    assert all(e["detail"].startswith("soft bounce") for e in record["events"] if e["event"] == "bounced")

    # ...and the next real report still works.
    assert (await mail_to(listener, bounce, postfix_dsn(email_id, "wes@example.net")))[0] == 250
    await wait_status(user.http, email_id, "bounced")


async def test_unsubscribe_by_mail_end_to_end(stack: Stack, listener: BounceListener, user: Sender, client: Client) -> None:
    done = await sent_email(user, "Lea <lea@example.com>", category="marketing")
    email_id = done["id"]
    (caught,) = await delivered(stack.sink, email_id)
    links = LINKS.match(str(caught.message["List-Unsubscribe"]).replace("\r\n", "").replace("\n", ""))
    assert links, caught.message["List-Unsubscribe"]  # https one-click first, mailto second
    assert links[1] == f"unsubscribe+{email_id}"
    assert caught.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    address = f"{links[1]}@{DOMAIN}"

    def note(author: str) -> bytes:
        return f"From: {author}\r\nTo: {address}\r\nSubject: unsubscribe\r\nMessage-ID: <{uuid.uuid4()}@example.com>\r\n\r\nunsubscribe\r\n".encode()

    # A stranger (whatever its envelope sender) changes nothing.
    assert (await mail_to(listener, address, note("Mallory <mallory@example.com>"), sender="lea@example.com"))[0] == 250
    assert (await user.http.get("/v1/suppressions", params={"address": "lea@example.com"})).json()["total"] == 0

    for _ in range(2):  # the recipient, twice: one entry, one event
        assert (await mail_to(listener, address, note("Lea Smith <lea@EXAMPLE.com>"), sender="lea@example.com"))[0] == 250
    listed = (await user.http.get("/v1/suppressions", params={"address": "lea@example.com"})).json()
    assert [(i["address"], i["reason"], i["source"]) for i in listed["items"]] == [("lea@example.com", "unsubscribe", "unsubscribe mail")]
    record = (await user.http.get(f"/v1/emails/{email_id}")).json()
    assert record["status"] == "sent"
    assert [e["detail"] for e in record["events"] if e["event"] == "unsubscribed"] == [
        "unsubscribed from unsubscribe mail for lea@example.com",
    ]
    again = await user.http.post("/v1/emails", json=user.mail(to=["lea@example.com"], category="marketing"))
    assert again.status_code == 202 and again.json()["status"] == "suppressed"


# --- running it ---------------------------------------------------------------------------------------


def test_mailqueue_bounces_needs_a_bounce_domain(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}
    refused = run_cli("bounces", env={**env, "MAILQUEUE_DATABASE_URL": f"sqlite:///{tmp_path / 'db'}"})
    assert refused.returncode == 2 and "MAILQUEUE_BOUNCE_DOMAIN" in refused.stderr
    with pytest.raises(ValueError):
        Settings(bounce_domain="not a domain", _env_file=None)  # type: ignore[call-arg]
    assert Settings(bounce_domain="", _env_file=None).bounce_domain is None  # type: ignore[call-arg]


def test_make_dev_and_compose_run_the_listener() -> None:
    import argparse

    from devstack.supervisor import DEV_BOUNCE_DOMAIN, dev_settings

    args = argparse.Namespace(data_dir=Path("/tmp/mq-bounces"), host="127.0.0.1", api_port=1, temporal_port=2, ui_port=3,
                              smtp_port=4, mail_port=5, bounce_port=6)
    dev = dev_settings(args, Settings(_env_file=None))  # type: ignore[call-arg]
    assert (dev.bounce_domain, dev.bounce_host, dev.bounce_port) == (DEV_BOUNCE_DOMAIN, "127.0.0.1", 6)
    assert "--bounce-port" in run_cli("dev", "--help").stdout
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    bounces = services["bounces"]
    assert bounces["command"] == ["mailqueue", "bounces"]
    env = bounces["environment"]
    assert bounces["ports"] == [f"25:{env['MAILQUEUE_BOUNCE_PORT']}"] and env["MAILQUEUE_BOUNCE_HOST"] == "0.0.0.0"
    assert env == services["worker"]["environment"]  # the workers send with the same bounce domain
