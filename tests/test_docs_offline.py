"""/docs and /redoc on a machine without internet: every script, style, icon and schema the pages
load is served by the API itself, whether the docs are public or for admins only."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from api.app import create_app
from devstack.devserver import TemporalDevServer
from devstack.net import free_port
from tests.helpers import KEY, fast_settings

ORIGIN = "http://mailqueue.test"
# What a browser needs to be told for each kind of file it loads from the pages.
CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}
# Absolute and protocol-relative URLs anywhere in a page: each must be this origin.
ABSOLUTE_URL = re.compile(r"""(?:\b[a-z][a-z0-9+.-]*:)?//[^\s"'<>()]+""", re.IGNORECASE)
SCRIPT_URLS = re.compile(r"""\burl\s*:\s*["']([^"']+)["']|\bimport\b[^"';]*["']([^"']+)["']""")
CSS_URLS = re.compile(r"""url\(\s*["']?([^"')]+)["']?\s*\)|@import\s+["']([^"']+)["']""")


class References(HTMLParser):
    """Every URL a page makes the browser load: src/href/…url attributes, and url:/import in inline
    scripts, url()/@import in inline styles."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in = tag if tag in ("script", "style") else None
        self.urls += [value for name, value in attrs if value and (name in ("src", "href") or name.endswith("url"))]

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        pattern = {"script": SCRIPT_URLS, "style": CSS_URLS}.get(self._in or "")
        if pattern is not None:
            self.urls += [next(g for g in match.groups() if g) for match in pattern.finditer(data)]


def same_origin(url: str) -> bool:
    return urlsplit(url)[:2] == urlsplit(ORIGIN)[:2]


@pytest.fixture(params=[True, False], ids=["public-docs", "admin-only-docs"])
async def docs(request: pytest.FixtureRequest, database_url: str, temporal_server: TemporalDevServer) -> AsyncIterator[httpx.AsyncClient]:
    """The API in this process (lifespan included), seen by a browser that holds the admin key."""
    settings = fast_settings(database_url, temporal_server.address, free_port(), f"docs-{uuid.uuid4()}", public_docs=request.param)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=ORIGIN, auth=("browser", KEY)) as client:
            yield client


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_load_everything_from_the_api_itself(docs: httpx.AsyncClient, page: str) -> None:
    answer = await docs.get(page)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html"), answer.text
    foreign = [url for url in ABSOLUTE_URL.findall(answer.text) if not same_origin(urljoin(ORIGIN, url))]
    assert not foreign, f"{page} loads from other hosts: {foreign}"
    parser = References()
    parser.feed(answer.text)
    loaded = {urljoin(ORIGIN + page, url) for url in parser.urls}
    assert {urlsplit(url).path.rsplit(".", 1)[-1] for url in loaded} >= {"js", "png", "json"}, loaded
    assert all(same_origin(url) for url in loaded), loaded

    served: dict[str, str] = {}  # the text of the scripts, styles and schema, by suffix
    for url in sorted(loaded):
        asset = await docs.get(url)
        suffix = "." + urlsplit(url).path.rsplit(".", 1)[-1]
        assert asset.status_code == 200, url
        assert CONTENT_TYPES[suffix] in asset.headers["content-type"], (url, asset.headers["content-type"])
        if suffix != ".png":
            served[suffix] = served.get(suffix, "") + asset.text
    assert "/v1/emails" in served[".json"]  # the page shows this API's schema

    # The stylesheets pull in nothing from elsewhere either (their images are data: URLs).
    for match in CSS_URLS.finditer(served.get(".css", "")):
        url = next(g for g in match.groups() if g)
        assert url.startswith("data:") or same_origin(urljoin(ORIGIN, url)), url
    # The script defines what the page calls: SwaggerUIBundle(...), or ReDoc's <redoc spec-url>.
    if page == "/docs":
        assert "swagger-ui.css" in " ".join(loaded)
        assert "SwaggerUIBundle(" in answer.text and "SwaggerUIBundle=" in served[".js"]
    else:
        assert "spec-url" in served[".js"] and '"redoc"' in served[".js"]


async def test_docs_assets_are_public_when_the_docs_are_not(database_url: str, temporal_server: TemporalDevServer) -> None:
    """A browser asks for scripts without the key; they hold nothing of the API's, so they need none."""
    settings = fast_settings(database_url, temporal_server.address, free_port(), f"docs-{uuid.uuid4()}", public_docs=False)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ORIGIN) as anon:
            assert (await anon.get("/docs")).status_code == 401
            script = await anon.get("/docs-assets/swagger-ui-bundle.js")
            assert script.status_code == 200 and "javascript" in script.headers["content-type"]


async def test_the_schemas_send_at_examples_are_times_the_api_accepts(docs: httpx.AsyncClient) -> None:
    """"Try it out" with the docs' own example must not answer 422 because its date went stale."""
    schema = (await docs.get("/openapi.json")).json()
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("send_at"), str):
                found.append(node["send_at"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    assert len(found) >= 2, found  # the email's example and the reschedule's
    now = datetime.now(UTC)
    for value in found:
        assert now < datetime.fromisoformat(value) < now + timedelta(days=366), value
