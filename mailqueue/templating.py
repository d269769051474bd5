"""Sandboxed Jinja2 rendering of email templates (template authors are not trusted).

A template version is immutable, so a render names exactly what it uses: the main
template and the pinned versions of the layouts and partials it reaches through
`{% extends %}`, `{% include %}` and `{% import %}` (its *dependencies*). Compiled
templates are cached by (name, locale, version, part); an edit is a new version and so
a new cache key, which is how a change reaches every API and worker process without
any cross-process invalidation.
"""

from __future__ import annotations

import contextvars
import hashlib
import operator
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any

import css_inline
import html2text
from babel import Locale, UnknownLocaleError, dates as babel_dates, numbers as babel_numbers
from jinja2 import BaseLoader, StrictUndefined, TemplateNotFound, TemplateSyntaxError, Undefined, nodes
from jinja2 import TemplateError as JinjaTemplateError
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError, safe_range
from jinja2.utils import missing

from mailqueue.contracts import Content
from mailqueue.errors import TemplateError

PARTS = ("subject", "html", "text")
MAX_OUTPUT_CHARS = 5_000_000  # per part: a runaway loop fails the render instead of the worker
MAX_SEQUENCE = 100_000  # longest string/list an expression may build with * or **
MAX_RANGE_ITEMS = 1_000_000  # all range() calls of one render together
_SEP = "\x1f"


@dataclass(frozen=True)
class TemplateSource:
    """The parts of one template version."""

    name: str
    version: int
    subject: str
    html: str | None
    text: str | None
    locale: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.name, self.locale, self.cache_id)

    @property
    def cache_id(self) -> str:
        """The version for a saved template; for an unsaved draft (version 0), a hash of its content."""
        if self.version > 0:
            return str(self.version)
        digest = hashlib.sha256("\0".join(p or "" for p in (self.subject, self.html, self.text)).encode()).hexdigest()
        return f"draft-{digest[:24]}"

    def part(self, part: str) -> str | None:
        return getattr(self, part)


_LOCALE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")


def check_locale(value: str | None) -> str | None:
    """'pt_BR' and 'pt-BR' are the same locale; stored as 'pt-BR'. Raises ValueError for anything else."""
    if not value:
        return value
    if not _LOCALE.match(value):
        raise ValueError("locale must look like 'en' or 'pt-BR'")
    return value.replace("_", "-")


def is_partial(name: str) -> bool:
    """Layouts and partials (`_Layout`, `_Header`) are named with a leading underscore; they are not sent alone."""
    return name.startswith("_")


# --- the render's context: which versions its names resolve to, and its locale -------------

_pins: contextvars.ContextVar[Mapping[str, TemplateSource]] = contextvars.ContextVar("template_pins")
_locale: contextvars.ContextVar[Locale] = contextvars.ContextVar("template_locale")
_range_budget: contextvars.ContextVar[list[int]] = contextvars.ContextVar("template_range_budget")


def _load_name(src: TemplateSource, part: str) -> str:
    return _SEP.join((src.name, src.locale, src.cache_id, part))


def _label(load_name: str) -> str:
    name, locale, version, part = load_name.split(_SEP)
    return f"{part} of {name!r}" + (f" [{locale}]" if locale else "") + (f" v{version}" if version.isdigit() else "")


class _PinnedLoader(BaseLoader):
    """Serves the versions pinned for the current render; never the file system."""

    def get_source(self, environment: Any, template: str) -> tuple[str, str, Callable[[], bool]]:
        try:
            name, _locale_, version, part = template.split(_SEP)
            src = _pins.get()[name]
        except (ValueError, KeyError, LookupError):
            raise TemplateNotFound(template) from None
        if src.cache_id != version or src.locale != _locale_:
            raise TemplateNotFound(template)
        source = src.part(part)
        if source is None:
            raise TemplateNotFound(f"{name} (it has no {part} part)")
        return source, template, lambda: True  # versions never change


def parse_locale(value: str | None, default: str = "en") -> Locale:
    for candidate in (value, (value or "").split("-")[0], default, "en"):
        if candidate:
            try:
                return Locale.parse(candidate, sep="-")
            except (UnknownLocaleError, ValueError, TypeError):
                continue
    return Locale("en")


# --- filters for dates, numbers and money, in the render's locale ----------------------------


def _undefined(*values: Any) -> bool:
    """A missing variable given to a filter: the strict render says which one; the recording one notes it."""
    missing = False
    for value in values:
        if isinstance(value, Undefined):
            value._fail_with_undefined_error()  # raises UndefinedError, except while recording
            missing = True
    return missing


def _as_datetime(value: Any) -> datetime | date:
    if isinstance(value, datetime | date):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        text = value.strip().replace("Z", "+00:00")
        try:
            return date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text)
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not a date (use ISO 8601, e.g. 2025-06-18T10:30:00Z)")


def _as_number(value: Any) -> Decimal | int | float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, int | float | Decimal):
        return value
    if isinstance(value, str):
        try:
            return Decimal(value.strip())
        except InvalidOperation:
            pass
    raise ValueError(f"{value!r} is not a number")


def _tz(tz: str | None) -> Any:
    return babel_dates.get_timezone(tz) if tz else UTC


def filter_date(value: Any, format: str = "medium") -> str:
    """`{{ d | date }}`, `{{ d | date("long") }}`, `{{ d | date("yyyy-MM-dd") }}` (Babel/CLDR patterns)."""
    if _undefined(value, format):
        return ""
    return babel_dates.format_date(_as_datetime(value), format=format, locale=_locale.get())


def filter_datetime(value: Any, format: str = "medium", tz: str | None = None) -> str:
    """`{{ d | datetime("yyyy-MM-dd HH:mm", "Europe/Berlin") }}`; naive values are UTC."""
    if _undefined(value, format, tz):
        return ""
    parsed = _as_datetime(value)
    if not isinstance(parsed, datetime):
        parsed = datetime.combine(parsed, time(), UTC)
    elif parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return babel_dates.format_datetime(parsed, format=format, tzinfo=_tz(tz), locale=_locale.get())


def filter_time(value: Any, format: str = "short", tz: str | None = None) -> str:
    if _undefined(value, format, tz):
        return ""
    parsed = _as_datetime(value)
    if not isinstance(parsed, datetime):
        raise ValueError(f"{value!r} has no time of day")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return babel_dates.format_time(parsed, format=format, tzinfo=_tz(tz), locale=_locale.get())


def filter_number(value: Any, format: str | None = None) -> str:
    """`{{ n | number }}` → 1,234.5 (en) / 1.234,5 (de)."""
    if _undefined(value, format):
        return ""
    return babel_numbers.format_decimal(_as_number(value), format=format, locale=_locale.get())


def filter_percent(value: Any, format: str | None = None) -> str:
    if _undefined(value, format):
        return ""
    return babel_numbers.format_percent(_as_number(value), format=format, locale=_locale.get())


def filter_currency(value: Any, currency: str = "USD", format: str | None = None) -> str:
    """`{{ amount | currency("EUR") }}` → €1,234.50 (en) / 1.234,50 € (de)."""
    if _undefined(value, currency, format):
        return ""
    return babel_numbers.format_currency(_as_number(value), currency, format=format, locale=_locale.get())


FILTERS: dict[str, Callable[..., str]] = {
    "date": filter_date,
    "datetime": filter_datetime,
    "time": filter_time,
    "number": filter_number,
    "percent": filter_percent,
    "currency": filter_currency,
}


# --- the sandbox ---------------------------------------------------------------------------


class _Sandbox(ImmutableSandboxedEnvironment):
    """No attribute tricks, no mutation of the data, no giant strings, no file system."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        if operator_ == "**":
            if isinstance(right, int | float) and abs(right) > 100:
                raise SecurityError("exponent too large")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() * right > 100_000:
                raise SecurityError("the result of ** would be too large")
            return left**right
        if isinstance(left, str | list | tuple) and isinstance(right, int) and len(left) * right > MAX_SEQUENCE:
            raise SecurityError(f"the result of * would be longer than {MAX_SEQUENCE}")
        if isinstance(right, str | list | tuple) and isinstance(left, int) and len(right) * left > MAX_SEQUENCE:
            raise SecurityError(f"the result of * would be longer than {MAX_SEQUENCE}")
        return operator.mul(left, right)

    def join_path(self, template: str, parent: str) -> str:
        """`{% extends "_Layout" %}` inside the html part → the pinned `_Layout`'s html part."""
        part = parent.rsplit(_SEP, 1)[-1]
        src = _pins.get({}).get(template)
        if src is None:
            raise TemplateNotFound(template, f"template {template!r} does not exist or is inactive")
        return _load_name(src, part)


class _Recorder(StrictUndefined):
    """Used only to explain a failed render: remembers every missing name, fails nothing."""

    missing: contextvars.ContextVar[set[str]] = contextvars.ContextVar("missing_names")

    def _fail_with_undefined_error(self, *args: Any, **kwargs: Any) -> Any:
        return self._record()

    def _record(self) -> Any:
        if self._undefined_obj is missing and self._undefined_name:
            self.missing.get().add(self._undefined_name)
        return ""

    def __str__(self) -> str:
        self._record()
        return ""

    def __iter__(self) -> Iterator[Any]:
        self._record()
        return iter(())

    def __bool__(self) -> bool:
        self._record()
        return False

    def __len__(self) -> int:
        self._record()
        return 0

    def __getattr__(self, name: str) -> Any:
        if name[:2] == "__":
            raise AttributeError(name)
        self._record()
        return self

    __getitem__ = __getattr__  # type: ignore[assignment]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._record()
        return self

    def __eq__(self, other: object) -> bool:
        self._record()
        return False

    def __hash__(self) -> int:
        return id(self)


def _budgeted_range(*args: int) -> range:
    """`range` with the sandbox's per-call limit and a budget per render, so nested loops cannot spin for hours."""
    rng = safe_range(*args)
    budget = _range_budget.get([MAX_RANGE_ITEMS])
    budget[0] -= len(rng)
    if budget[0] < 0:
        raise SecurityError(f"range() calls of one render may produce at most {MAX_RANGE_ITEMS} numbers together")
    return rng


def _environment(*, autoescape: bool, undefined: type[StrictUndefined]) -> _Sandbox:
    env = _Sandbox(
        loader=_PinnedLoader(),
        autoescape=autoescape,
        undefined=undefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        cache_size=2000,
        auto_reload=False,
    )
    env.filters.update(FILTERS)
    env.globals["range"] = _budgeted_range
    return env


@dataclass(frozen=True)
class SyntaxProblem:
    part: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.part}: line {self.line}: {self.message}" if self.line else f"{self.part}: {self.message}"


class TemplateEngine:
    """Compiles pinned template versions once and renders them into mail-ready content."""

    def __init__(self, default_locale: str = "en") -> None:
        self._envs = {
            "html": _environment(autoescape=True, undefined=StrictUndefined),
            "plain": _environment(autoescape=False, undefined=StrictUndefined),
        }
        self._recording = {
            "html": _environment(autoescape=True, undefined=_Recorder),
            "plain": _environment(autoescape=False, undefined=_Recorder),
        }
        self._references: OrderedDict[tuple[str, str, str], frozenset[str]] = OrderedDict()
        self._inliner = css_inline.CSSInliner(load_remote_stylesheets=False)
        self.default_locale = default_locale

    # --- checking sources ---------------------------------------------------------------

    def syntax_problems(self, src: TemplateSource) -> list[SyntaxProblem]:
        """Syntax errors and non-literal template names, with their lines; empty when the template is sound."""
        problems: list[SyntaxProblem] = []
        for part in PARTS:
            source = src.part(part)
            if not source:
                continue
            try:
                tree = self._envs["plain"].parse(source)
            except TemplateSyntaxError as exc:
                problems.append(SyntaxProblem(part, exc.lineno, exc.message or str(exc)))
                continue
            for node in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
                target = node.template
                literal = isinstance(target, nodes.Const) and isinstance(target.value, str)
                literal = literal or (
                    isinstance(target, nodes.Tuple | nodes.List)
                    and all(isinstance(i, nodes.Const) and isinstance(i.value, str) for i in target.items)
                )
                if not literal:
                    problems.append(SyntaxProblem(part, node.lineno, "extends/include/import need a literal template name"))
        return problems

    def references(self, src: TemplateSource) -> frozenset[str]:
        """Names of the templates this version extends, includes or imports (any part)."""
        refs = self._references.get(src.key)
        if refs is None:
            names: set[str] = set()
            for part in PARTS:
                source = src.part(part)
                if source:
                    try:
                        names.update(n for n in meta.find_referenced_templates(self._envs["plain"].parse(source)) if n)
                    except TemplateSyntaxError:
                        continue
            refs = frozenset(names)
            self._references[src.key] = refs
            if len(self._references) > 4096:
                self._references.popitem(last=False)
        return refs

    def part_references(self, src: TemplateSource, part: str) -> frozenset[str]:
        source = src.part(part)
        if not source:
            return frozenset()
        try:
            return frozenset(n for n in meta.find_referenced_templates(self._envs["plain"].parse(source)) if n)
        except TemplateSyntaxError:
            return frozenset()

    # --- rendering ----------------------------------------------------------------------

    def _render_part(self, envs: Mapping[str, _Sandbox], src: TemplateSource, part: str, data: Mapping[str, Any]) -> str:
        env = envs["html" if part == "html" else "plain"]
        template = env.get_template(_load_name(src, part))
        _range_budget.set([MAX_RANGE_ITEMS])
        out: list[str] = []
        size = 0
        for chunk in template.generate(data):
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise SecurityError(f"output is longer than {MAX_OUTPUT_CHARS} characters")
            out.append(chunk)
        return "".join(out)

    def render(
        self,
        src: TemplateSource,
        data: Mapping[str, Any],
        dependencies: Mapping[str, TemplateSource] | None = None,
        locale: str | None = None,
    ) -> Content:
        """Subject, HTML (CSS inlined) and text (generated from the HTML when the template has none)."""
        parts = self.render_parts(src, data, dependencies, locale)
        return self.finish(parts["subject"] or "", parts["html"], parts["text"])

    def render_parts(
        self,
        src: TemplateSource,
        data: Mapping[str, Any],
        dependencies: Mapping[str, TemplateSource] | None = None,
        locale: str | None = None,
    ) -> dict[str, str | None]:
        """The Jinja step alone: each part as the template wrote it."""
        pins = {**(dependencies or {}), src.name: src}
        parts: dict[str, str | None] = {}
        pin_token = _pins.set(pins)
        locale_token = _locale.set(parse_locale(locale or src.locale, self.default_locale))
        try:
            for part in PARTS:
                if src.part(part) is None:
                    parts[part] = None
                    continue
                try:
                    parts[part] = self._render_part(self._envs, src, part, data)
                except SecurityError as exc:
                    raise TemplateError(f"{part} of {src.name!r} is not allowed: {exc}") from None
                except TemplateNotFound as exc:
                    raise TemplateError(f"{part} of {src.name!r}: {exc.message or exc.name}") from None
                except JinjaTemplateError as exc:
                    raise TemplateError(f"{_where(exc, src, part)}: {exc.message or exc}") from None
                except Exception as exc:  # a filter or operation failing on the given data
                    raise TemplateError(f"{_where(exc, src, part)}: {type(exc).__name__}: {exc}") from None
        finally:
            _locale.reset(locale_token)
            _pins.reset(pin_token)
        return parts

    def finish(self, subject: str, html: str | None, text: str | None) -> Content:
        """Mail-client output: one-line subject, inlined CSS, a text part for every HTML part."""
        if html is not None:
            if text is None:
                text = html_to_text(html)  # before inlining: the same text from a third of the markup
            try:
                html = self._inliner.inline(html)
            except ValueError as exc:
                raise TemplateError(f"html: CSS could not be inlined: {exc}") from None
        return Content(subject=" ".join(subject.split()), html=html, text=text)

    def missing_variables(
        self,
        src: TemplateSource,
        data: Mapping[str, Any],
        dependencies: Mapping[str, TemplateSource] | None = None,
        locale: str | None = None,
    ) -> list[str]:
        """Top-level names the render looked up and `data` does not supply (in every reached branch)."""
        found: set[str] = set()
        tokens = (
            _pins.set({**(dependencies or {}), src.name: src}),
            _locale.set(parse_locale(locale or src.locale, self.default_locale)),
            _Recorder.missing.set(found),
        )
        try:
            for part in PARTS:
                if src.part(part) is not None:
                    try:
                        self._render_part(self._recording, src, part, data)
                    except Exception:  # noqa: BLE001 - only the names matter here
                        continue
        finally:
            _Recorder.missing.reset(tokens[2])
            _locale.reset(tokens[1])
            _pins.reset(tokens[0])
        return sorted(found - set(data))


def _where(exc: BaseException, src: TemplateSource, part: str) -> str:
    """'html of 'X' v3, line 12' from the template frames Jinja puts in the traceback."""
    line, label = None, f"{part} of {src.name!r}"
    if isinstance(exc, TemplateSyntaxError) and exc.name and _SEP in exc.name:
        return f"{_label(exc.name)}, line {exc.lineno}"
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if _SEP in filename:
            line, label = tb.tb_lineno, _label(filename)
        tb = tb.tb_next
    return f"{label}, line {line}" if line else label


def html_to_text(html: str) -> str:
    converter = html2text.HTML2Text()
    converter.body_width = 0
    converter.ignore_images = True
    converter.ignore_emphasis = True
    converter.unicode_snob = True
    converter.single_line_break = False
    return converter.handle(html).strip() + "\n"
