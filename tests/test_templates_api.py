"""/v1/templates over real HTTP, with a real worker: versions, layouts, locales, previews, reload."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tests.helpers import KEY, Stack, delivered, wait_status


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def html_of(caught: Any) -> str:
    return caught.message.get_body(("html",)).get_content()


def text_of(caught: Any) -> str:
    return caught.message.get_body(("plain",)).get_content()


def spaced(text: str) -> str:
    """CLDR formats use no-break spaces (U+00A0, U+202F); compare them as spaces."""
    return text.replace("\xa0", " ").replace("\u202f", " ").strip()


async def put(http: httpx.AsyncClient, name: str, **body: Any) -> dict[str, Any]:
    resp = await http.put(f"/v1/templates/{name}", json=body)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


async def send(http: httpx.AsyncClient, template: str, data: dict[str, Any], **extra: Any) -> str:
    resp = await http.post("/v1/emails", json={"to": ["ann@example.com"], "template": template, "template_data": data, **extra})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


async def layered(http: httpx.AsyncClient, marker: str = "ONE") -> tuple[str, str, str]:
    """A layout that includes a partial, and a template that extends the layout."""
    layout, partial, page = unique("_Layout"), unique("_Part"), unique("Page")
    await put(http, partial, html="<div class='p'>partial {{ who }}</div>")
    await put(http, layout, html=f"<!DOCTYPE html><html><head><style>.p {{ color: green }}</style></head>"
                                 f"<body>{{% include '{partial}' %}}<h1>LAYOUT-{marker}</h1>{{% block content %}}{{% endblock %}}</body></html>")
    await put(http, page, subject="Hello {{ who }}",
              html=f"{{% extends '{layout}' %}}{{% block content %}}<p>page for {{{{ who }}}}</p>{{% endblock %}}",
              sample_data={"who": "Sam"})
    return layout, partial, page


async def test_create_version_read_deactivate(stack: Stack) -> None:
    http, name = stack.http, unique("welcome")
    created = await http.post("/v1/templates", json={"name": name, "subject": "Hi {{ n }}", "html": "<p>{{ n }}</p>",
                                                      "default_from": "team@example.com", "default_from_name": "The Team",
                                                      "description": "greets"})
    assert created.status_code == 201 and created.headers["Location"] == f"/v1/templates/{name}"
    v1 = created.json()
    assert (v1["version"], v1["is_active"], v1["is_current"], v1["created_by"]) == (1, True, True, "admin")
    again = await http.post("/v1/templates", json={"name": name, "subject": "x", "text": "x"})
    assert again.status_code == 409 and "PUT" in again.json()["detail"]

    v2 = await put(http, name, subject="Hello {{ n }}", html="<p>{{ n }}!</p>", default_from="team@example.com",
                   default_from_name="The Team")
    assert v2["version"] == 2
    same = await put(http, name, subject="Hello {{ n }}", html="<p>{{ n }}!</p>", default_from="team@example.com",
                     default_from_name="The Team")
    assert same["version"] == 2, "unchanged content must not make a version"
    assert (await http.get(f"/v1/templates/{name}", params={"version": 1})).json()["subject"] == "Hi {{ n }}"
    versions = (await http.get(f"/v1/templates/{name}/versions")).json()
    assert [(v["version"], v["is_current"]) for v in versions] == [(2, True), (1, False)]
    assert name in {t["name"] for t in (await http.get("/v1/templates")).json()}

    email_id = await send(http, name, {"n": "Ann"})
    [caught] = await delivered(stack.sink, email_id)
    assert caught.message["From"] == "The Team <team@example.com>" and caught.message["Subject"] == "Hello Ann"

    assert (await http.delete(f"/v1/templates/{name}")).status_code == 204
    assert (await http.delete(f"/v1/templates/{name}")).status_code == 204  # idempotent
    assert name not in {t["name"] for t in (await http.get("/v1/templates")).json()}
    assert name in {t["name"] for t in (await http.get("/v1/templates", params={"include_inactive": True})).json()}
    refused = await http.post("/v1/emails", json={"to": ["ann@example.com"], "template": name, "template_data": {"n": 1}})
    assert refused.status_code == 422 and "inactive" in refused.text
    assert (await put(http, name, subject="Back {{ n }}", text="{{ n }}"))["version"] == 3  # PUT reactivates
    assert (await http.delete(f"/v1/templates/{unique('nothing')}")).status_code == 404
    assert (await http.get(f"/v1/templates/{unique('nothing')}/versions")).status_code == 404


async def test_syntax_errors_and_missing_variables_are_422_with_lines_and_names(stack: Stack) -> None:
    http, name = stack.http, unique("broken")
    resp = await http.post("/v1/templates", json={"name": name, "subject": "Hi", "html": "<p>\n\n{% for x in y %}</p>"})
    assert resp.status_code == 422
    [err] = resp.json()["detail"]
    assert err["loc"] == ["body", "html"] and err["line"] == 3 and "line 3" in err["msg"]
    resp = await http.put(f"/v1/templates/{name}", json={"subject": "{{ a", "text": "ok"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "subject"]
    resp = await http.post("/v1/templates", json={"name": name, "subject": "Hi", "html": "{% extends '_NoSuchLayout' %}"})
    assert resp.status_code == 422 and "'_NoSuchLayout', which does not exist" in resp.text
    resp = await http.post("/v1/templates", json={"name": name, "subject": "Hi", "html": "{% include who %}"})
    assert resp.status_code == 422 and "literal" in resp.text
    resp = await http.post("/v1/templates", json={"name": name, "subject": "Hi {{ a }}", "html": "<p>{{ b }}</p>", "sample_data": {"a": 1}})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "sample_data"] and "b" in resp.text
    resp = await http.post("/v1/templates", json={"name": name, "html": "<p>no subject</p>"})
    assert resp.status_code == 422 and "subject is required" in resp.text

    await put(http, name, subject="Order {{ order.id }} for {{ customer }}",
              html="<p>{{ customer }}: {% for i in items %}{{ i.sku }}{% endfor %} {% if note is defined %}{{ note }}{% endif %}</p>")
    resp = await http.post("/v1/emails", json={"to": ["ann@example.com"], "template": name, "template_data": {"customer": "Ann"}})
    assert resp.status_code == 422
    [err] = resp.json()["detail"]
    assert err["loc"] == ["body", "template_data"] and err["missing"] == ["items", "order"]
    assert "missing template variables: items, order" in err["msg"]
    big = {"blob": "x" * 1_000_001}
    resp = await http.post("/v1/emails", json={"to": ["ann@example.com"], "template": name, "template_data": big})
    assert resp.status_code == 422 and "limit is 1000000" in resp.text
    resp = await http.post("/v1/emails", json={"to": ["ann@example.com"], "template": "_Layout"})
    assert resp.status_code in (422,) and ("layout or partial" in resp.text or "unknown" in resp.text)


async def test_layout_change_reaches_the_worker_and_the_api(stack: Stack) -> None:
    http = stack.http
    layout, partial, page = await layered(http, "ONE")
    first = await send(http, page, {"who": "Ann"})
    [caught] = await delivered(stack.sink, first)
    html = html_of(caught)
    assert "LAYOUT-ONE" in html and "page for Ann" in html and "partial Ann" in html
    assert 'style="color: green;"' in html  # the layout's CSS, inlined into the partial's div

    # Change the layout and the partial: the next render (in the API and in the worker) uses them.
    await put(http, layout, html="<html><body>{% include '" + partial + "' %}<h1>LAYOUT-TWO</h1>{% block content %}{% endblock %}</body></html>")
    await put(http, partial, html="<div>new partial {{ who }}</div>")
    preview = (await http.post(f"/v1/templates/{page}/preview", json={"data": {"who": "Bo"}})).json()
    assert "LAYOUT-TWO" in preview["html"] and "new partial Bo" in preview["html"]
    assert {(d["name"], d["version"]) for d in preview["dependencies"]} == {(layout, 2), (partial, 2)}
    second = await send(http, page, {"who": "Bo"})
    [caught] = await delivered(stack.sink, second)
    assert "LAYOUT-TWO" in html_of(caught) and "new partial Bo" in html_of(caught)


async def test_edit_while_scheduled_sends_the_old_versions(stack: Stack) -> None:
    http = stack.http
    layout, partial, page = await layered(http, "OLD")
    send_at = datetime.now(UTC) + timedelta(seconds=3)
    email_id = await send(http, page, {"who": "Ann"}, send_at=send_at.isoformat())
    await wait_status(http, email_id, "scheduled")
    await put(http, page, subject="CHANGED {{ who }}", html=f"{{% extends '{layout}' %}}{{% block content %}}CHANGED{{% endblock %}}")
    await put(http, layout, html="<html><body><h1>LAYOUT-NEW</h1>{% block content %}{% endblock %}</body></html>")
    await put(http, partial, html="<div>NEW PARTIAL</div>")

    [caught] = await delivered(stack.sink, email_id, timeout=20)
    assert caught.message["Subject"] == "Hello Ann"
    html = html_of(caught)
    assert "LAYOUT-OLD" in html and "partial Ann" in html and "page for Ann" in html
    assert "NEW" not in html and "CHANGED" not in html
    got = await wait_status(http, email_id, "sent")
    assert got["template"]["version"] == 1
    assert {(d["name"], d["version"]) for d in got["template"]["dependencies"]} == {(layout, 1), (partial, 1)}


async def test_locale_picks_the_variant_with_fallback(stack: Stack) -> None:
    http, name = stack.http, unique("notice")
    await put(http, name, subject="Due {{ when | date('long') }}", text="Pay {{ amount | currency('EUR') }} by {{ when | date }}",
              sample_data={"when": "2025-01-31", "amount": 5})
    await put(http, name, locale="de", subject="Fällig am {{ when | date('long') }}", text="Zahlen Sie {{ amount | currency('EUR') }} bis {{ when | date }}")
    data = {"when": "2025-06-18", "amount": "1234.5"}

    de_at = await send(http, name, data, locale="de-AT")
    de = await send(http, name, data, locale="de")
    fr = await send(http, name, data, locale="fr")
    plain = await send(http, name, data)
    [m] = await delivered(stack.sink, de_at)
    assert m.message["Subject"] == "Fällig am 18. Juni 2025" and spaced(text_of(m)) == "Zahlen Sie € 1.234,50 bis 18.06.2025"
    [m] = await delivered(stack.sink, de)
    assert spaced(text_of(m)) == "Zahlen Sie 1.234,50 € bis 18.06.2025"
    [m] = await delivered(stack.sink, fr)  # no French variant: the default one, French formatting
    assert m.message["Subject"] == "Due 18 juin 2025" and spaced(text_of(m)) == "Pay 1 234,50 € by 18 juin 2025"
    [m] = await delivered(stack.sink, plain)
    assert m.message["Subject"] == "Due June 18, 2025" and spaced(text_of(m)) == "Pay €1,234.50 by Jun 18, 2025"
    got = (await http.get(f"/v1/emails/{de_at}")).json()["template"]
    assert (got["locale"], got["requested_locale"]) == ("de", "de-AT")
    # The German variant has no sample data of its own: its preview uses the default variant's.
    preview = (await http.post(f"/v1/templates/{name}/preview", json={"locale": "de"})).json()
    assert preview["subject"] == "Fällig am 31. Januar 2025" and preview["template"]["locale"] == "de"
    # Deactivating the German variant alone: German emails fall back to the default one.
    assert (await http.delete(f"/v1/templates/{name}", params={"locale": "de"})).status_code == 204
    [m] = await delivered(stack.sink, await send(http, name, data, locale="de"))
    assert m.message["Subject"] == "Due 18. Juni 2025"


async def test_preview_json_html_and_browser_auth(stack: Stack) -> None:
    http = stack.http
    _, _, page = await layered(http, "PREVIEW")
    sample = (await http.post(f"/v1/templates/{page}/preview")).json()
    assert sample["data_source"] == "sample_data" and sample["subject"] == "Hello Sam" and "page for Sam" in sample["text"]
    given = (await http.post(f"/v1/templates/{page}/preview", json={"data": {"who": "<i>x</i>"}})).json()
    assert given["data_source"] == "request" and "&lt;i&gt;x&lt;/i&gt;" in given["html"]
    missing = await http.post(f"/v1/templates/{page}/preview", json={"data": {}})
    assert missing.status_code == 422 and missing.json()["detail"][0]["missing"] == ["who"]
    old = (await http.post(f"/v1/templates/{page}/preview", json={"version": 1})).json()
    assert old["template"]["version"] == 1
    assert (await http.post(f"/v1/templates/{unique('none')}/preview")).status_code == 404

    async with httpx.AsyncClient(base_url=str(http.base_url)) as browser:
        challenge = await browser.get(f"/v1/templates/{page}/preview")
        assert challenge.status_code == 401 and challenge.headers["WWW-Authenticate"].startswith("Basic")
        assert (await browser.get(f"/v1/templates/{page}/preview", auth=("me", "wrong"))).status_code == 401
        page_resp = await browser.get(f"/v1/templates/{page}/preview", auth=("anyone", KEY))
        assert page_resp.status_code == 200 and page_resp.headers["content-type"].startswith("text/html")
        assert "LAYOUT-PREVIEW" in page_resp.text and "page for Sam" in page_resp.text
        assert "sandbox" in page_resp.headers["Content-Security-Policy"]  # author HTML runs no script here
        text = await browser.get(f"/v1/templates/{page}/preview", params={"part": "text"}, auth=("anyone", KEY))
        assert text.headers["content-type"].startswith("text/plain") and "page for Sam" in text.text
        # The browser login does not open the rest of the API.
        assert (await browser.get("/v1/templates", auth=("anyone", KEY))).status_code == 401


async def test_reload_then_send_a_shipped_template_in_two_locales(stack: Stack) -> None:
    http = stack.http
    resp = await http.post("/v1/templates/reload")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    loaded = {(p["name"], p["locale"]) for p in body["created"] + body["unchanged"]}
    assert {("StockIssueApproved", ""), ("StockIssueApproved", "de"), ("_Layout", ""), ("TestTemplate", "")} <= loaded
    again = (await http.post("/v1/templates/reload")).json()
    assert again["created"] == []

    sample = (await http.get("/v1/templates/StockIssueApproved")).json()["sample_data"]
    en = await send(http, "StockIssueApproved", sample, related_entity={"type": "StockIssueRequest", "id": "SIR-2025-001"})
    de = await send(http, "StockIssueApproved", sample, locale="de-DE")
    [m_en] = await delivered(stack.sink, en)
    [m_de] = await delivered(stack.sink, de)
    assert m_en.message["Subject"] == "Stock Issue Request SIR-2025-001 has been approved"
    assert m_de.message["Subject"] == "Materialanforderung SIR-2025-001 wurde genehmigt"
    assert m_en.message["From"].startswith("MES Office <")
    assert "Hydraulic oil ISO 46" in html_of(m_en) and "20.5" in html_of(m_en) and "20,5" in html_of(m_de)
    assert "automated message" in text_of(m_en) and "automatische Nachricht" in text_of(m_de)
    await asyncio.gather(wait_status(http, en, "sent"), wait_status(http, de, "sent"))
