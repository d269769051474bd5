"""What may go into an email's headers: the header allow-list, and text that would break, inject
or disguise a header (controls, line separators, encoded words, bidi overrides), refused at the
door with a 422 that names the field; addresses stay ASCII where they can."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from mailqueue.contracts import Content
from mailqueue.errors import PermanentDeliveryError
from mailqueue.message import build_message, decoded_header
from tests.helpers import Stack, delivered, email, make_spec, total_emails


def encoded(text: str) -> str:
    return "=?utf-8?b?" + base64.b64encode(text.encode()).decode() + "?="


REFUSED_HEADERS = {
    "Authentication-Results": "authentication or filtering result",
    "DKIM-Signature": "authentication or filtering result",
    "ARC-Seal": "authentication or filtering result",
    "X-Google-DKIM-Signature": "authentication or filtering result",
    "Received-SPF": "authentication or filtering result",
    "X-MS-Exchange-Organization-SCL": "authentication or filtering result",
    "Received": "trace header",
    "Return-Path": "trace header",
    "X-Original-To": "trace header",
    "Delivered-To": "trace header",
    "X-Originating-IP": "trace header",
    "Resent-From": "Resent-*",
    "resent-message-id": "Resent-*",
    "X-SMTPAPI": "relay provider",
    "X-SES-SOURCE-ARN": "relay provider",
    "Message-ID": "set by mailqueue",
    "Sender": "set by mailqueue and cannot be given; use the `from` field",
    "Content-Type": "set by mailqueue",
    "Organization": "is not allowed: give X-* headers, or one of List-Unsubscribe",
}


@pytest.mark.parametrize("name", list(REFUSED_HEADERS))
async def test_forged_and_unlisted_headers_are_refused_by_name(stack: Stack, name: str) -> None:
    before = await total_emails(stack.http)
    refused = await stack.http.post("/v1/emails", json=email(headers={"X-Fine": "1", name: "forged"}))
    assert refused.status_code == 422, refused.text
    [err] = refused.json()["detail"]
    assert err["loc"] == ["body", "headers"] and repr(name) in err["msg"] and REFUSED_HEADERS[name] in err["msg"], err
    assert await total_emails(stack.http) == before


async def test_allowed_headers_go_out_as_given(stack: Stack) -> None:
    headers = {
        "X-Campaign": "spring", "List-Unsubscribe": "<https://example.net/u/1>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "In-Reply-To": "<a@example.net>", "References": "<a@example.net>", "Auto-Submitted": "auto-generated", "Precedence": "bulk",
    }
    sent = await stack.http.post("/v1/emails", json=email(headers=headers))
    assert sent.status_code == 202, sent.text
    [caught] = await delivered(stack.sink, sent.json()["id"])
    assert {name: caught.message[name] for name in headers} == headers


async def test_the_header_rules_are_documented_in_the_openapi_schema(stack: Stack) -> None:
    schema = (await stack.http.get("/openapi.json")).json()
    description = schema["components"]["schemas"]["EmailRequest"]["properties"]["headers"]["description"]
    for named in ("X-*", "List-Unsubscribe", "Authentication-Results", "DKIM-Signature", "Received", "Resent-*", "X-Original-*"):
        assert named in description, named


RLO, LRI = "\u202e", "\u2066"
DOOR_CASES = {
    # header values: every control character but TAB, and the Unicode line separators
    "U+2028 in a header": (email(headers={"X-Note": "a\u2028Bcc: x@example.net"}), ["body", "headers"], "U+2028"),
    "U+2029 in a header": (email(headers={"X-Note": "a\u2029b"}), ["body", "headers"], "U+2029"),
    "VT in a header": (email(headers={"X-Note": "a\x0bb"}), ["body", "headers"], "U+000B"),
    "FF in a header": (email(headers={"X-Note": "a\x0cb"}), ["body", "headers"], "U+000C"),
    "FS in a header": (email(headers={"X-Note": "a\x1cb"}), ["body", "headers"], "U+001C"),
    "GS in a header": (email(headers={"X-Note": "a\x1db"}), ["body", "headers"], "U+001D"),
    "RS in a header": (email(headers={"X-Note": "a\x1eb"}), ["body", "headers"], "U+001E"),
    "US in a header": (email(headers={"X-Note": "a\x1fb"}), ["body", "headers"], "U+001F"),
    "NEL in a header": (email(headers={"X-Note": "a\x85b"}), ["body", "headers"], "U+0085"),
    "SOH in a header": (email(headers={"X-Note": "a\x01b"}), ["body", "headers"], "U+0001"),
    "DEL in a header": (email(headers={"X-Note": "a\x7fb"}), ["body", "headers"], "U+007F"),
    "U+2028 in the subject": (email(subject="Hi\u2028Bcc: x@example.net"), ["body", "subject"], "U+2028"),
    "VT in the subject": (email(subject="Hi\x0bthere"), ["body", "subject"], "U+000B"),
    "FS in a display name": (email(to=["Ann\x1c <ann@example.net>"]), ["body", "to"], "U+001C"),
    # encoded words that decode to a line break or a control
    "encoded CRLF in a display name": (email(to=[f"{encoded('Ann' + chr(13) + chr(10) + 'Bcc: x@example.net')} <ann@example.net>"]),
                                       ["body", "to"], "CR or LF characters inside an encoded word"),
    "encoded CRLF in the From's name": (email(**{"from": f"{encoded('Ops' + chr(10) + 'Bcc: x@example.net')} <ops@example.net>"}),
                                        ["body", "from"], "inside an encoded word"),
    "encoded CRLF in the subject": (email(subject="=?utf-8?q?Hi=0D=0ABcc:_x@example.net?="), ["body", "subject"], "CR or LF characters inside an encoded word"),
    "encoded CRLF in a header": (email(headers={"X-Note": "x =?utf-8?q?=0D=0ABcc:_x@example.net?="}), ["body", "headers"], "inside an encoded word"),
    "encoded VT in a display name": (email(cc=[f"{encoded('A' + chr(11))} <a@example.net>"]), ["body", "cc"], "U+000B"),
    # bidirectional overrides and isolates
    "RLO in the subject": (email(subject=f"Invoice {RLO}fdp.exe"), ["body", "subject"], "U+202E RIGHT-TO-LEFT OVERRIDE"),
    "LRI in the subject": (email(subject=f"a{LRI}b"), ["body", "subject"], "U+2066"),
    "RLO in a display name": (email(to=[f"{RLO}moc.lapyap <ann@example.net>"]), ["body", "to"], "U+202E"),
    "RLO in the From's name": (email(**{"from": f"PayPal{RLO} <ops@example.net>"}), ["body", "from"], "U+202E"),
    "RLO in a header": (email(headers={"X-Note": f"a{RLO}b"}), ["body", "headers"], "U+202E"),
    "RLO in an encoded word": (email(reply_to=f"{encoded(RLO + 'abc')} <r@example.net>"), ["body", "reply_to"], "U+202E"),
}


@pytest.mark.parametrize("case", list(DOOR_CASES), ids=list(DOOR_CASES))
async def test_unsafe_header_text_is_refused_at_the_door(stack: Stack, case: str) -> None:
    body, loc, message = DOOR_CASES[case]
    before = await total_emails(stack.http)
    refused = await stack.http.post("/v1/emails", json=body)
    assert refused.status_code == 422, refused.text
    errors = refused.json()["detail"]
    assert any(e["loc"][: len(loc)] == loc and message in e["msg"] for e in errors), errors
    assert await total_emails(stack.http) == before


async def test_template_data_cannot_put_unsafe_text_into_the_subject(stack: Stack) -> None:
    name = f"subject-{uuid.uuid4().hex[:8]}"
    assert (await stack.http.post("/v1/templates", json={"name": name, "subject": "Order {{ ref }}", "text": "x"})).status_code == 201
    for ref, why in ((f"{RLO}fdp.exe", "U+202E"), ("=?utf-8?q?1=0D=0ABcc:_x@example.net?=", "CR or LF"), ("1\x01", "U+0001")):
        refused = await stack.http.post("/v1/emails", json={"to": ["a@example.net"], "template": name, "template_data": {"ref": ref}})
        assert refused.status_code == 422, refused.text
        [err] = refused.json()["detail"]
        assert err["loc"] == ["body", "template_data"] and "the rendered subject" in err["msg"] and why in err["msg"], err
    # Line breaks in the data are folded into the one-line subject, as the worker does: fine.
    sent = await stack.http.post("/v1/emails", json={"to": ["a@example.net"], "template": name, "template_data": {"ref": "1\n2"}})
    assert sent.status_code == 202, sent.text


async def test_bidi_marks_that_rtl_text_needs_are_accepted(stack: Stack) -> None:
    subject = "\u05d4\u05d6\u05de\u05e0\u05d4 \u200f#1042\u200f"  # Hebrew "order" with right-to-left marks
    sent = await stack.http.post("/v1/emails", json=email(subject=subject, to=["\u05d3\u05e0\u05d4 <dana@example.net>"]))
    assert sent.status_code == 202, sent.text
    [caught] = await delivered(stack.sink, sent.json()["id"])
    assert caught.message["Subject"] == subject


async def test_idn_addresses_reach_the_relay_in_ascii_form(stack: Stack) -> None:
    sent = await stack.http.post("/v1/emails", json=email(
        to=["Ann <ann@xn--bcher-kva.de>"], cc=["bob@bücher.de"], **{"from": "Shop <shop@xn--mller-kva.de>"},
    ))
    assert sent.status_code == 202, sent.text
    [caught] = await delivered(stack.sink, sent.json()["id"])
    assert sorted(caught.rcpt_tos) == ["ann@xn--bcher-kva.de", "bob@xn--bcher-kva.de"]
    assert caught.mail_from == "shop@xn--mller-kva.de"
    assert caught.data.isascii()  # no SMTPUTF8 needed: every header went out in ASCII
    assert caught.message["To"] == "Ann <ann@xn--bcher-kva.de>" and caught.message["Cc"] == "bob@xn--bcher-kva.de"
    got = (await stack.http.get(f"/v1/emails/{sent.json()['id']}")).json()
    assert got["to"] == ["Ann <ann@xn--bcher-kva.de>"] and got["cc"] == ["bob@xn--bcher-kva.de"]
    found = (await stack.http.get("/v1/emails", params={"recipient": "bob@bücher.de"})).json()  # either spelling finds it
    assert sent.json()["id"] in {e["id"] for e in found["items"]}


async def test_a_non_ascii_mailbox_with_a_display_name_is_no_codec_error(stack: Stack) -> None:
    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()  # only what the door makes of it matters here
    sent = await stack.http.post("/v1/emails", json=email(to=["Jörg Müller <jörg@bücher.de>"], send_at=later))
    assert sent.status_code == 202, sent.text
    got = (await stack.http.get(f"/v1/emails/{sent.json()['id']}")).json()
    [to] = got["to"]
    name, _, mailbox = to.rpartition(" ")
    assert decoded_header(name) == "Jörg Müller" and mailbox == "<jörg@xn--bcher-kva.de>"  # only the mailbox stays Unicode
    assert (await stack.http.post(f"/v1/emails/{sent.json()['id']}/cancel")).status_code == 200


@pytest.mark.parametrize(
    "subject", ["=?utf-8?q?Hi=0D=0ABcc:_victim@example.net?=", "Hi =?utf-8?b?" + base64.b64encode(b"\r\nX-Evil: 1").decode() + "?="],
)
def test_the_worker_never_writes_an_encoded_line_break_into_a_header(subject: str) -> None:
    """What got past the door before these checks (or a rendered subject) fails for good, never injects."""
    with pytest.raises(PermanentDeliveryError, match="Subject"):
        build_message(make_spec(), Content(subject=subject, text="x"))
    with pytest.raises(PermanentDeliveryError, match="X-Note"):
        build_message(make_spec(headers={"X-Note": subject}), Content(subject="fine", text="x"))
