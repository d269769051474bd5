"""The template engine and library: sandbox, layouts, locales, mail-client output, the shipped templates."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import html5lib
import pytest

from mailqueue.errors import TemplateError
from mailqueue.template_library import MissingVariables, check_draft, read_folder, reload_folder
from mailqueue.templating import MAX_OUTPUT_CHARS, TemplateEngine, TemplateSource

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
SHIPPED = {
    "StockIssueApproved", "StockIssueRejected", "WarehousePickNotification", "WeeklyInventoryReport",
    "LowStockAlert", "PasswordReset", "TestTemplate",
}
_versions = itertools.count(1)


def src(html: str | None = None, *, subject: str = "Hi", text: str | None = None, name: str = "t", locale: str = "") -> TemplateSource:
    # A fresh version per call: versions are immutable, and the engine caches by version.
    return TemplateSource(name=name, version=next(_versions), subject=subject, html=html, text=text, locale=locale)


@pytest.fixture(scope="module")
def engine() -> TemplateEngine:
    return TemplateEngine()


# --- the sandbox ---------------------------------------------------------------------------

ATTACKS = [
    ("{{ x.__class__ }}", {"x": 1}),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", {}),
    ("{{ cycler.__init__.__globals__.os.system('touch {marker}') }}", {}),
    ("{{ lipsum.__globals__['os'].system('touch {marker}') }}", {}),
    ("{{ joiner.__init__.__globals__ }}", {}),
    ("{{ namespace.__init__.__globals__ }}", {}),
    ("{{ self._TemplateReference__context }}", {}),
    ("{{ x | attr('__class__') }}", {"x": 1}),
    ("{{ x['__class__'] }}", {"x": 1}),
    ("{{ '{0.__class__.__init__.__globals__}'.format(x) }}", {"x": 1}),
    ("{{ x.format(y) }}", {"x": "{0.__class__}", "y": 1}),
    ("{{ ('{0.__class__.__init__.__globals__}' | attr('format'))(x) }}", {"x": 1}),  # CVE-2025-27516
    ("{% set f = '{0.__class__}'.format %}{{ f(x) }}", {"x": 1}),  # CVE-2024-56326
    ("{{ m.__globals__ }}{% macro m() %}{% endmacro %}", {}),
    ("{{ items.append(1) }}", {"items": []}),
    ("{{ d.update({'a': 1}) }}", {"d": {}}),
    ("{{ d.pop('a') }}", {"d": {"a": 1}}),
    ("{{ 'a' * 100000000 }}", {}),
    ("{{ 9 ** 9999999 }}", {}),
    ("{{ ((9 ** 100) ** 100) ** 100 }}", {}),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", {}),
    ("{% for i in range(99999) %}{% for j in range(99) %}{{ 'xxxxxxxxxx' }}{% endfor %}{% endfor %}", {}),
]


@pytest.mark.parametrize(("html", "data"), ATTACKS, ids=[a[0][:40] for a in ATTACKS])
def test_sandbox_refuses_and_says_so(engine: TemplateEngine, tmp_path: Path, html: str, data: dict[str, Any]) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(TemplateError) as caught:
        engine.render(src(html.replace("{marker}", str(marker))), data)
    message = str(caught.value)
    assert "html of 't'" in message
    assert any(word in message for word in ("not allowed", "unsafe", "undefined", "has no attribute")), message
    assert not marker.exists(), "a template ran code"


def test_output_cap_is_enforced(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateError, match=str(MAX_OUTPUT_CHARS)):
        engine.render(src("{% for i in range(99999) %}{% for j in range(9) %}{{ 'x' * 9999 }}{% endfor %}{% endfor %}"), {})


def test_autoescape_stops_injected_html_but_not_in_text_or_subject(engine: TemplateEngine) -> None:
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    out = engine.render(src("<p>{{ x }}</p>", subject="Re: {{ x }}", text="{{ x }}"), {"x": evil})
    assert "<script>" not in out.html and "<img" not in out.html
    assert "&lt;script&gt;" in out.html
    assert out.text == evil  # plain text is not HTML: no entities in it
    assert out.subject == f"Re: {evil}"


def test_a_template_cannot_read_files(engine: TemplateEngine) -> None:
    secret = Path("/etc/passwd").read_text()[:4]
    for html in ("{% include '/etc/passwd' %}", "{% include '../../../../etc/passwd' %}", "{% extends 'file:///etc/passwd' %}",
                 "{% import '/etc/passwd' as p %}"):
        with pytest.raises(TemplateError, match="does not exist"):
            engine.render(src(html), {})
    # A stylesheet link is neither fetched nor read from disk by the CSS inliner.
    out = engine.render(src('<link rel="stylesheet" href="file:///etc/passwd"><link rel="stylesheet" href="/etc/passwd"><p>x</p>'), {})
    assert secret not in out.html and "passwd" not in out.html


def test_non_literal_template_names_are_refused_at_save(engine: TemplateEngine) -> None:
    [problem] = engine.syntax_problems(src("<p>\n{% include name %}</p>"))
    assert problem.part == "html" and problem.line == 2 and "literal" in problem.message


# --- rendering features --------------------------------------------------------------------


def test_syntax_errors_have_part_and_line(engine: TemplateEngine) -> None:
    problems = engine.syntax_problems(src("<p>\n\n{% if x %}never closed</p>", subject="{{ oops", text="fine"))
    assert {(p.part, p.line) for p in problems} == {("subject", 1), ("html", 3)}


def test_missing_variables_are_named_not_guessed(engine: TemplateEngine) -> None:
    t = src("<p>{{ a }} {% if opt is defined %}{{ opt }}{% endif %} {{ b.c }}</p>{% for i in items %}{{ i.x }}{% endfor %}",
            subject="{{ s }}")
    assert engine.missing_variables(t, {"b": {"c": 1}}) == ["a", "items", "s"]
    with pytest.raises(TemplateError, match=r"subject of 't' v[0-9]+, line 1: 's' is undefined"):
        engine.render(t, {"b": {"c": 1}})


def test_missing_variables_given_to_filters_are_named(engine: TemplateEngine) -> None:
    t = src("<p>{{ at | date('long') }} {{ total | currency(cur) }} {{ n | number }}</p>")
    assert engine.missing_variables(t, {"n": 1}) == ["at", "cur", "total"]
    with pytest.raises(TemplateError, match="'at' is undefined"):
        engine.render(t, {"n": 1})


def test_loops_conditionals_and_builtin_filters(engine: TemplateEngine) -> None:
    t = src("{% for i in items if i.qty > 0 %}{{ loop.index }}:{{ i.name | upper }};{% else %}none{% endfor %}"
            "{{ items | map(attribute='qty') | sum }}", text="x")
    assert engine.render(t, {"items": [{"name": "a", "qty": 2}, {"name": "b", "qty": 0}]}).html.endswith("<body>1:A;2</body></html>")


@pytest.mark.parametrize(
    ("locale", "expected"),
    [
        ("en", "Jun 18, 2025|18 June 2025 12:30|1,234.5|€1,234.50|12%"),
        ("de", "18.06.2025|18 Juni 2025 12:30|1.234,5|1.234,50\xa0€|12\xa0%"),
        ("de-AT", "18.06.2025|18 Juni 2025 12:30|1.234,5|€\xa01.234,50|12\xa0%"),  # no de-AT variant needed to format like Austria
        ("en-GB", "18 Jun 2025|18 June 2025 12:30|1,234.5|€1,234.50|12%"),
        ("pt-BR", "18 de jun. de 2025|18 junho 2025 12:30|1.234,5|€\xa01.234,50|12%"),
        ("xx", "Jun 18, 2025|18 June 2025 12:30|1,234.5|€1,234.50|12%"),  # unknown: the default locale
    ],
)
def test_dates_numbers_and_money_follow_the_locale(engine: TemplateEngine, locale: str, expected: str) -> None:
    t = src(None, text="{{ d | date }}|{{ d | datetime('d MMMM y HH:mm', 'Europe/Berlin') }}|"
                       "{{ n | number }}|{{ n | currency('EUR') }}|{{ p | percent }}")
    assert engine.render(t, {"d": "2025-06-18T10:30:00Z", "n": "1234.5", "p": 0.12}, locale=locale).text == expected


def test_filters_explain_bad_values(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateError, match="'soon' is not a date"):
        engine.render(src("<p>\n{{ d | date }}</p>"), {"d": "soon"})
    with pytest.raises(TemplateError, match="'lots' is not a number"):
        engine.render(src("{{ n | currency('EUR') }}"), {"n": "lots"})


def test_mail_client_output(engine: TemplateEngine) -> None:
    out = engine.render(
        src("<html><head><style>p { color: red } .big { font-size: 20px }</style></head>"
            "<body><p class='big'>Hello <a href='https://x.example/a'>link</a></p></body></html>",
            subject="Line one\n  line two\r\n{{ x }}"),
        {"x": "three"},
    )
    assert out.subject == "Line one line two three"
    assert "<style" not in out.html and 'style="color: red;font-size: 20px;"' in out.html
    assert out.text is not None and "Hello" in out.text and "https://x.example/a" in out.text
    kept = engine.render(src("<p>h</p>", text="own {{ x }}"), {"x": 1})
    assert kept.text == "own 1"


def test_layouts_and_partials_resolve_through_pins(engine: TemplateEngine) -> None:
    layout = src("<html><body>{% include '_P' %}[{% block content %}{% endblock %}]</body></html>", name="_L", subject="")
    partial = src("<b>{{ who }}</b>", name="_P", subject="")
    page = src("{% extends '_L' %}{% block content %}{{ who }}{% endblock %}")
    out = engine.render(page, {"who": "<Ann>"}, {"_L": layout, "_P": partial})
    assert "<b>&lt;Ann&gt;</b>[&lt;Ann&gt;]" in out.html
    # A new version of the partial is a new cache key: the next render uses it.
    partial2 = src("<i>{{ who }}</i>", name="_P", subject="")
    assert "<i>&lt;Ann&gt;</i>" in engine.render(page, {"who": "<Ann>"}, {"_L": layout, "_P": partial2}).html
    with pytest.raises(TemplateError, match="'_P' does not exist"):
        engine.render(page, {"who": "x"}, {"_L": layout})


# --- the library (database) ----------------------------------------------------------------


async def test_check_draft_reports_lines_references_and_sample_data(sessions, engine: TemplateEngine) -> None:
    async with sessions() as session:
        bad = await check_draft(session, engine, src("<p>\n{% for x in y %}</p>"), None)
        assert [(p.field, p.line) for p in bad] == [("html", 2)]
        missing_layout = f"_missing_{uuid.uuid4().hex[:6]}"
        [p] = await check_draft(session, engine, src(f"{{% extends '{missing_layout}' %}}"), None)
        assert missing_layout in p.message and "does not exist" in p.message
        [p] = await check_draft(session, engine, src("{% include 't' %}", name="t"), None)
        assert "uses itself" in p.message
        [p] = await check_draft(session, engine, src("<p>{{ a }}{{ b }}</p>"), {"a": 1})
        assert p.field == "sample_data" and "missing template variables: b" in p.message
        assert await check_draft(session, engine, src("<p>{{ a }}</p>"), {"a": 1}) == []


def _copy_with_suffix(dst: Path, suffix: str) -> dict[str, str]:
    """The shipped folder under unique names (so tests sharing a database do not meet)."""
    names = {p.name: f"{p.name}{suffix}" for p in TEMPLATES.iterdir() if p.is_dir()}
    for old, new in names.items():
        shutil.copytree(TEMPLATES / old, dst / new)
    for path in dst.rglob("*"):
        if path.is_file() and path.suffix in {".html", ".txt"}:
            text = path.read_text()
            for old, new in names.items():
                if old.startswith("_"):
                    text = text.replace(f'"{old}"', f'"{new}"')
            path.write_text(text)
    return names


async def test_reload_saves_changed_templates_only(sessions, engine: TemplateEngine, tmp_path: Path) -> None:
    names = _copy_with_suffix(tmp_path, f"_{uuid.uuid4().hex[:6]}")
    async with sessions() as session:
        first = await reload_folder(session, engine, tmp_path)
        assert first.problems == [] and len(first.created) == 13 and first.unchanged == []
        again = await reload_folder(session, engine, tmp_path)
        assert again.created == [] and len(again.unchanged) == 13
        footer = tmp_path / names["_Footer"] / "body.html"
        footer.write_text(footer.read_text().replace("automated message", "automatic message"))
        third = await reload_folder(session, engine, tmp_path)
        assert [(p.name, p.locale, p.version) for p in third.created] == [(names["_Footer"], "", 2)]


async def test_reload_is_all_or_nothing_and_names_the_file(sessions, engine: TemplateEngine, tmp_path: Path) -> None:
    names = _copy_with_suffix(tmp_path, f"_{uuid.uuid4().hex[:6]}")
    broken = tmp_path / names["LowStockAlert"] / "body.html"
    broken.write_text(broken.read_text().replace("{% endfor %}", "", 1))
    (tmp_path / names["TestTemplate"] / "template.json").write_text("{not json")
    (tmp_path / names["PasswordReset"] / "Deutsch!").mkdir()
    async with sessions() as session:
        result = await reload_folder(session, engine, tmp_path)
        assert result.created == []
        text = "\n".join(str(p) for p in result.problems)
        assert "template.json" in text and "not valid JSON" in text
        assert "Deutsch!" in text and "locale variant" in text
        # The JSON problem is reported first (files are read before templates are checked).
        assert not await _exists(session, names["StockIssueApproved"])
        (tmp_path / names["TestTemplate"] / "template.json").write_text(json.dumps({"sample_data": {"Name": "x"}}))
        (tmp_path / names["PasswordReset"] / "Deutsch!").rmdir()
        result = await reload_folder(session, engine, tmp_path)
        [problem] = result.problems
        assert problem.template == names["LowStockAlert"] and problem.field == "html" and problem.line is not None
        assert not await _exists(session, names["StockIssueApproved"])


async def _exists(session, name: str) -> bool:  # type: ignore[no-untyped-def]
    from mailqueue.template_store import current_template

    return await current_template(session, name) is not None


def test_shipped_folder_has_the_seed_templates_with_sample_data() -> None:
    templates, problems = read_folder(TEMPLATES)
    assert problems == []
    by_name = {(t.name, t.locale): t for t in templates}
    assert SHIPPED | {"_Layout", "_Header", "_Footer"} == {name for name, _ in by_name}
    for name in SHIPPED:
        assert by_name[(name, "")].meta.get("sample_data"), f"{name} has no sample data"


async def test_every_shipped_template_renders_to_good_mail(sessions, engine: TemplateEngine) -> None:
    from mailqueue.template_store import current_template
    from mailqueue.template_library import prepare

    async with sessions() as session:
        loaded = await reload_folder(session, engine, TEMPLATES)
        assert loaded.problems == []
        variants = [(t.name, t.locale) for t in read_folder(TEMPLATES)[0] if t.name in SHIPPED]
        assert len(variants) >= 9  # 7 templates, 2 of them also in German
        for name, locale in variants:
            row = await current_template(session, name, locale or None)
            assert row is not None and row.locale == locale
            prepared = await prepare(session, engine, row, row.sample_data or {}, locale or None)
            content = prepared.content
            assert {"_Layout", "_Header", "_Footer"} <= set(prepared.dependencies), name
            assert content.subject and "\n" not in content.subject and "{{" not in content.subject
            html5lib.HTMLParser(strict=True).parse(content.html)  # well-formed: raises on any parse error
            assert "<style" not in content.html and "<link" not in content.html, f"{name}: CSS not inlined"
            assert 'style="' in content.html and "font-family: Arial" in content.html
            assert content.text and len(content.text) > 80 and "<" not in content.text.replace("<http", "")
            assert "{{" not in content.html and "{%" not in content.html
            if locale == "de":
                assert "automatische Nachricht" in content.html, "German footer variant not used"
            with pytest.raises(MissingVariables) as missing:
                await prepare(session, engine, row, {}, locale or None)
            assert set(missing.value.names) <= set(row.sample_data or {})


async def test_concurrent_saves_make_distinct_versions_and_one_current(sessions) -> None:
    from sqlmodel import select

    from mailqueue.models import EmailTemplate
    from mailqueue.template_store import save_template_version

    name = f"race_{uuid.uuid4().hex[:8]}"

    async def save(i: int) -> int:
        async with sessions() as session:
            row = await save_template_version(session, EmailTemplate(name=name, subject=f"v{i}", text=f"body {i}"))
            return row.version

    versions = await asyncio.gather(*(save(i) for i in range(8)))
    assert sorted(versions) == list(range(1, 9))
    async with sessions() as session:
        rows = (await session.exec(select(EmailTemplate).where(EmailTemplate.name == name))).all()
    assert len(rows) == 8 and [r.version for r in rows if r.is_current] == [8]


def test_the_templates_command_loads_a_folder_and_reports_problems(tmp_path: Path) -> None:
    from mailqueue.config import Settings, settings_env
    from mailqueue.db import migrate
    from tests.helpers import run_cli

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    migrate(url)
    env = settings_env(Settings(database_url=url, _env_file=None))  # type: ignore[call-arg]
    first = run_cli("templates", "--dir", str(TEMPLATES), env=env)
    assert first.returncode == 0 and "13 loaded: 13 new version(s)" in first.stdout, first.stdout + first.stderr
    again = run_cli("templates", "--dir", str(TEMPLATES), env=env)
    assert again.returncode == 0 and "13 loaded: 0 new version(s)" in again.stdout
    broken = tmp_path / "broken" / "Oops"
    broken.mkdir(parents=True)
    (broken / "subject.txt").write_text("Hi")
    (broken / "body.html").write_text("<p>\n{% if %}</p>")
    bad = run_cli("templates", "--dir", str(broken.parent), env=env)
    assert bad.returncode == 1 and "Oops: html: line 2" in bad.stderr and "nothing was saved" in bad.stderr
