"""Sandboxed Jinja2 rendering of email templates (template authors are not trusted).

A template version is immutable, so a render names exactly what it uses: the main
template and the pinned versions of the layouts and partials it reaches through
`{% extends %}`, `{% include %}` and `{% import %}` (its *dependencies*). Compiled
templates are cached by (name, locale, version, part); an edit is a new version and so
a new cache key, which is how a change reaches every API and worker process without
any cross-process invalidation.

A render is bounded twice. Here, in the sandbox: what one render may build (strings,
loop iterations, range() numbers, output) has a budget, checked before each operation
that could exceed it, so a breach is a clear TemplateLimitError naming the limit. And
around it, in `mailqueue.render_pool`: the API and the worker render in child processes
with CPU-time, wall-time and memory limits, for whatever the budgets do not foresee.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import operator
import re
import types
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

import css_inline
import html2text
from babel import Locale, UnknownLocaleError, dates as babel_dates, numbers as babel_numbers
from jinja2 import BaseLoader, StrictUndefined, TemplateNotFound, TemplateSyntaxError, Undefined, nodes, pass_context, pass_eval_context
from jinja2 import TemplateError as JinjaTemplateError
from jinja2 import filters as jinja_filters
from jinja2 import meta
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context as JinjaContext
from jinja2.runtime import LoopContext, Macro, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter, SecurityError, safe_range
from jinja2.utils import generate_lorem_ipsum, missing
from jinja2.visitor import NodeTransformer
from markupsafe import Markup, soft_str

from mailqueue.contracts import Content
from mailqueue.errors import TemplateError

PARTS = ("subject", "html", "text")
# What one render may do (all parts together, except the output cap, which is per part).
MAX_OUTPUT_CHARS = 5_000_000  # per part: a runaway loop fails the render instead of the worker
MAX_SEQUENCE = 100_000  # longest string/list an expression may build with * or ** (and lists with +)
MAX_RANGE_ITEMS = 1_000_000  # all range() calls of one render together
MAX_STRING_CHARS = 10_000_000  # all strings built by replace, join, ~, +, *, %, format, center, ljust, ... together
MAX_LOOP_ITERATIONS = 200_000  # all for-loop iterations and macro calls of one render together (~1-15 µs each)
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


# --- how a render fails, and what it may spend ---------------------------------------------------


class TemplateLimitError(TemplateError):
    """A render that broke one of its bounds: a budget of the sandbox (strings, loops, range(),
    output) or a limit of the render process (CPU time, wall time, memory). `limit` names it."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.limit))


class MissingVariables(TemplateError):
    def __init__(self, names: list[str]) -> None:
        super().__init__(f"missing template variables: {', '.join(names)}")
        self.names = names

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.names,))


class _Breach(SecurityError):
    """Raised inside the sandbox when a budget runs out; the render reports it as TemplateLimitError."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class _Budget:
    """What one render may still spend. Sizes are checked *before* an operation builds its
    result, so a template cannot make the process allocate gigabytes to find out."""

    __slots__ = ("chars", "iterations", "numbers")

    def __init__(self) -> None:
        self.chars = MAX_STRING_CHARS
        self.iterations = MAX_LOOP_ITERATIONS
        self.numbers = MAX_RANGE_ITEMS

    def check(self, size: int) -> None:
        """An operation is about to build a string of `size` characters."""
        if size > self.chars:
            if size > MAX_STRING_CHARS:
                raise _Breach("string", f"the template builds a string longer than {MAX_STRING_CHARS} characters")
            raise _Breach("string", f"the template builds more than {MAX_STRING_CHARS} characters of strings in all")

    def spend(self, built: Any) -> Any:
        """Charge what an operation built (escaping can make it a little longer than checked)."""
        self.chars -= len(built)
        if self.chars < 0:
            raise _Breach("string", f"the template builds more than {MAX_STRING_CHARS} characters of strings in all")
        return built

    def build(self, size: int, make: Callable[[], Any]) -> Any:
        self.check(size)
        return self.spend(make())

    def loop(self, count: int) -> None:
        self.iterations -= count
        if self.iterations < 0:
            raise _Breach("loop", f"the template loops more than {MAX_LOOP_ITERATIONS} times (for-loop iterations and macro calls together)")

    def range(self, count: int) -> None:
        self.numbers -= count
        if self.numbers < 0:
            raise _Breach("range", f"range() calls of one render may produce at most {MAX_RANGE_ITEMS} numbers together")


_budget: contextvars.ContextVar[_Budget] = contextvars.ContextVar("template_budget")


def _spending() -> _Budget:
    """The current render's budget; outside a render (a constant folded at compile time), a fresh one."""
    budget = _budget.get(None)
    return budget if budget is not None else _Budget()


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | bytearray) else len(str(value))


def _joined_size(items: list[Any], separator: Any) -> int:
    """Length of `separator.join(items)`; stops counting once it is over the budget anyway."""
    total = _size(separator) * max(len(items) - 1, 0)
    for item in items:
        total += _size(item)
        if total > MAX_STRING_CHARS:
            break
    return total


# The growth of str (and bytes) methods, from their arguments: each returns the length of the
# result (an upper bound), computed without building it. Arguments of the wrong type make the
# sizing fail; the method itself then raises its own error.
def _replaced_size(s: Any, old: Any, new: Any, count: int = -1) -> int:
    hits = len(s) + 1 if len(old) == 0 else s.count(old)
    if count >= 0:
        hits = min(hits, count)
    return len(s) + hits * (len(new) - len(old))


def _padded_size(s: Any, width: int, *fill: Any) -> int:
    return max(len(s), width)


def _expanded_size(s: Any, tabsize: int = 8) -> int:
    return len(s) + s.count("\t" if isinstance(s, str) else b"\t") * max(tabsize, 0)


def _translated_size(s: Any, table: Any) -> int:
    if not isinstance(s, str):
        return len(s)  # bytes.translate maps byte to byte
    values = table.values() if isinstance(table, Mapping) else table if isinstance(table, list | tuple) else ()
    return len(s) * max((len(v) for v in values if isinstance(v, str)), default=1)


_GROWING_METHODS: dict[str, Callable[..., int]] = {
    "replace": _replaced_size,
    "center": _padded_size,
    "ljust": _padded_size,
    "rjust": _padded_size,
    "zfill": _padded_size,
    "expandtabs": _expanded_size,
    "translate": _translated_size,
}


def _bounded_method(value: Any) -> Any:
    """A str/bytes method that can grow its string, as the template gets it: checked against the budget."""
    if not isinstance(value, types.BuiltinMethodType | types.MethodType):
        return value
    owner = getattr(value, "__self__", None)
    name = getattr(value, "__name__", "")
    if not isinstance(owner, str | bytes | bytearray) or (name != "join" and name not in _GROWING_METHODS):
        return value

    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _spending()
        if name == "join":
            items = list(args[0]) if len(args) == 1 and not kwargs else None
            if items is None:
                return value(*args, **kwargs)  # the wrong arguments: str.join says so
            return budget.build(_joined_size(items, owner), lambda: value(items))
        try:
            size = _GROWING_METHODS[name](owner, *args, **kwargs)
        except (TypeError, ValueError, AttributeError):
            return value(*args, **kwargs)  # the wrong arguments: the method says so
        return budget.build(size, lambda: value(*args, **kwargs))

    return bounded


# `fmt % values`: the width, precision and value of each conversion, from printf-style syntax.
_PERCENT = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)


def _percent_size(fmt: str, values: Any) -> int:
    """Length of `fmt % values` (an upper bound), without building it."""
    positional = values if isinstance(values, tuple) else (values,)
    size, index = len(fmt), 0

    def take() -> Any:
        nonlocal index
        index += 1
        return positional[index - 1] if index <= len(positional) else ""

    for key, width, precision, conversion in _PERCENT.findall(fmt):
        numbers = [0]
        for number in (width, precision):
            if number == "*":
                star = take()
                numbers.append(abs(star) if isinstance(star, int) else 0)
            elif number:
                numbers.append(int(number))
        if conversion == "%":
            continue
        value = (values.get(key, "") if isinstance(values, Mapping) else "") if key else take()
        shown = repr(value) if conversion in "ra" else value
        size += max(_size(shown), *numbers) + 1
    return size


def _percent(fmt: str, values: Any) -> Any:
    return _spending().build(_percent_size(fmt, values), lambda: fmt % values)


class _FieldBudget:
    """str.format: each field's width/precision is checked before it is formatted, and each field charged."""

    def format_field(self, value: Any, format_spec: str) -> Any:
        budget = _spending()
        for number in re.findall(r"\d+", format_spec):
            budget.check(int(number))
        return budget.spend(super().format_field(value, format_spec))  # type: ignore[misc]


class _BoundedFormatter(_FieldBudget, SandboxedFormatter):
    pass


class _BoundedEscapeFormatter(_FieldBudget, SandboxedEscapeFormatter):
    pass


# --- filters and globals that grow strings or lists, bounded -------------------------------


@pass_eval_context
def _filter_replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> Any:
    size = _replaced_size(str(s), str(old), str(new), -1 if count is None else count)
    return _spending().build(size, lambda: jinja_filters.do_replace(eval_ctx, s, old, new, count))


@pass_eval_context
def _filter_join(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: str | int | None = None) -> Any:
    items = list(value)
    if attribute is not None:
        items = list(map(jinja_filters.make_attrgetter(eval_ctx.environment, attribute), items))
    return _spending().build(_joined_size(items, d), lambda: jinja_filters.sync_do_join(eval_ctx, items, d))


def _filter_center(value: Any, width: int = 80) -> str:
    text = soft_str(value)  # Markup stays Markup, as in Jinja's own filter
    return _spending().build(max(len(text), width), lambda: text.center(width))


def _filter_format(value: Any, *args: Any, **kwargs: Any) -> Any:
    if args and kwargs:
        return jinja_filters.do_format(value, *args, **kwargs)  # refuses the mix, in its own words
    return _percent(soft_str(value), kwargs or args)


def _filter_indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    text = str(s)
    size = len(text) + (text.count("\n") + 1) * (width if isinstance(width, int) else len(str(width)))
    return _spending().build(size, lambda: jinja_filters.do_indent(s, width, first, blank))


@pass_eval_context
def _filter_wordwrap(eval_ctx: Any, s: str, width: int = 79, break_long_words: bool = True,
                     wrapstring: str | None = None, break_on_hyphens: bool = True) -> str:
    text = str(s)
    wrap = wrapstring if wrapstring is not None else eval_ctx.environment.newline_sequence
    size = len(text) + (len(text) + 1) * len(str(wrap))
    return _spending().build(
        size, lambda: jinja_filters.do_wordwrap(eval_ctx.environment, s, width, break_long_words, wrapstring, break_on_hyphens),
    )


def _filter_batch(value: Iterable[Any], linecount: int, fill_with: Any = None) -> Iterator[list[Any]]:
    if fill_with is not None and isinstance(linecount, int) and linecount > MAX_SEQUENCE:
        raise _Breach("sequence", f"batch() with fill_with may make lists of at most {MAX_SEQUENCE} items")
    return jinja_filters.do_batch(value, linecount, fill_with)


def _filter_slice(value: Iterable[Any], slices: int, fill_with: Any = None) -> Iterator[list[Any]]:
    if isinstance(slices, int) and slices > MAX_SEQUENCE:
        raise _Breach("sequence", f"slice() may make at most {MAX_SEQUENCE} slices")
    return jinja_filters.sync_do_slice(value, slices, fill_with)


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    return _spending().build(n * max * 16, lambda: generate_lorem_ipsum(n, html, min, max))


def _budgeted_range(*args: int) -> range:
    """`range` with the sandbox's per-call limit and a budget per render, so nested loops cannot spin for hours."""
    rng = safe_range(*args)
    _spending().range(len(rng))
    return rng


def _counted(iterable: Iterable[Any], budget: _Budget) -> Iterator[Any]:
    for item in iterable:
        budget.loop(1)
        yield item


# The loop and `~` hooks are filters with names no template can write (a filter name is an
# identifier); `pass_context` keeps the compiler from folding them into constants.
_LOOP_ITEMS = "(loop items)"
_CONCAT = "(concat)"


@pass_context
def _loop_items(context: JinjaContext, iterable: Any) -> Any:
    """What a for-loop iterates over, charged to the loop budget: whole when its length is known
    (there is no `break`, so a loop runs through), else item by item."""
    budget = _spending()
    try:
        count = len(iterable)
    except TypeError:
        return _counted(iterable, budget)
    budget.loop(count)
    return iterable


@pass_context
def _concat(context: JinjaContext, values: tuple[Any, ...]) -> str:
    """`a ~ b ~ c`, as Jinja builds it (escaping when autoescape is on), once its size is known to fit."""
    join = markup_join if context.eval_ctx.autoescape else str_join
    return _spending().build(_joined_size(list(values), ""), lambda: join(values))


class _Budgeted(NodeTransformer):
    """Routes every for-loop's iterable through the loop budget and every `~` through the string budget."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _LOOP_ITEMS, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(nodes.Tuple(node.nodes, "load", lineno=node.lineno), _CONCAT, [], [], None, None, lineno=node.lineno)


class _BudgetedCode(CodeGenerator):
    """Jinja's code generator, after `_Budgeted` has rewritten the template's tree."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        _Budgeted().visit(node)
        node.set_environment(self.environment)
        super().visit_Template(node, frame)


# --- the sandbox ---------------------------------------------------------------------------


class _Sandbox(ImmutableSandboxedEnvironment):
    """No attribute tricks, no mutation of the data, no giant strings, no endless loops, no file system."""

    code_generator_class = _BudgetedCode
    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        if operator_ == "**":
            if isinstance(right, int | float) and abs(right) > 100:
                raise _Breach("number", "exponent too large")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() * right > 100_000:
                raise _Breach("number", "the result of ** would be too large")
            return left**right
        if operator_ == "%":
            return _percent(left, right) if isinstance(left, str) else operator.mod(left, right)
        if operator_ == "+":
            if isinstance(left, str | bytes) and isinstance(right, str | bytes):
                return _spending().build(len(left) + len(right), lambda: left + right)
            if isinstance(left, list | tuple) and isinstance(right, list | tuple) and len(left) + len(right) > MAX_SEQUENCE:
                raise _Breach("sequence", f"the result of + would be longer than {MAX_SEQUENCE}")
            return operator.add(left, right)
        for sequence, times in ((left, right), (right, left)):
            if isinstance(sequence, str | bytes | list | tuple) and isinstance(times, int):
                if len(sequence) * times > MAX_SEQUENCE:
                    raise _Breach("sequence", f"the result of * would be longer than {MAX_SEQUENCE}")
                if isinstance(sequence, str | bytes):
                    return _spending().build(len(sequence) * max(times, 0), lambda: operator.mul(left, right))
        return operator.mul(left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        return _bounded_method(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        return _bounded_method(super().getitem(obj, argument))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """Jinja's sandboxed str.format / format_map, with each field's size checked (see _FieldBudget)."""
        if not isinstance(value, types.MethodType | types.BuiltinMethodType) or value.__name__ not in ("format", "format_map"):
            return None
        owner = value.__self__
        if not isinstance(owner, str):
            return None
        formatter: SandboxedFormatter
        if isinstance(owner, Markup):
            formatter = _BoundedEscapeFormatter(self, escape=owner.escape)
        else:
            formatter = _BoundedFormatter(self)
        is_format_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs, args = args[0], ()
            return type(owner)(formatter.vformat(owner, args, kwargs))

        return wrapper

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's signature
        if isinstance(__obj, Macro):
            _spending().loop(1)  # a macro calling itself twice is a loop of 2**depth iterations
        elif isinstance(__obj, LoopContext) and args:  # `loop(children)` in a recursive for-loop
            _spending().loop(1)
            args = (_loop_items(__context, args[0]), *args[1:])
        return super().call(__context, __obj, *args, **kwargs)

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
    env.filters.update({
        "replace": _filter_replace, "join": _filter_join, "center": _filter_center, "format": _filter_format,
        "indent": _filter_indent, "wordwrap": _filter_wordwrap, "batch": _filter_batch, "slice": _filter_slice,
        _LOOP_ITEMS: _loop_items, _CONCAT: _concat,
    })
    env.globals.update(range=_budgeted_range, lipsum=_lipsum)
    return env


@dataclass(frozen=True)
class RenderJob:
    """One render, as plain data: what the API and the worker hand to a render pool's process.

    `finish=False` stops after Jinja (no CSS inlining, no text part): enough to prove the data
    fits. `explain` turns a failure caused by absent data into MissingVariables (every name)."""

    main: TemplateSource
    data: Mapping[str, Any]
    dependencies: Mapping[str, TemplateSource] = field(default_factory=dict)
    locale: str | None = None
    finish: bool = True
    explain: bool = True


class RenderRunner(Protocol):
    """Runs render jobs elsewhere, bounded: `mailqueue.render_pool.RenderPool` (child processes)."""

    async def render(self, job: RenderJob) -> Content: ...


@dataclass(frozen=True)
class SyntaxProblem:
    part: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.part}: line {self.line}: {self.message}" if self.line else f"{self.part}: {self.message}"


class TemplateEngine:
    """Compiles pinned template versions once and renders them into mail-ready content.

    `pool`: where awaited renders (`render_bounded`) run. The API and the worker give it a
    RenderPool (child processes with CPU-time, wall-time and memory limits); without one
    (tests, the command line) they run in a thread of this process, bounded by the sandbox's
    budgets alone.
    """

    def __init__(self, default_locale: str = "en", pool: RenderRunner | None = None) -> None:
        self.pool = pool
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
        out: list[str] = []
        size = 0
        for chunk in template.generate(data):
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise _Breach("output", f"output is longer than {MAX_OUTPUT_CHARS} characters")
            out.append(chunk)
        return "".join(out)

    async def render_bounded(self, job: RenderJob) -> Content:
        """`job`, in the render pool when the engine has one, else in a thread (see the class)."""
        if self.pool is not None:
            return await self.pool.render(job)
        return await asyncio.to_thread(self.run, job)

    def run(self, job: RenderJob) -> Content:
        """The render `job` describes, here and now (what a render pool's process does)."""
        try:
            if job.finish:
                return self.render(job.main, job.data, job.dependencies, job.locale)
            parts = self.render_parts(job.main, job.data, job.dependencies, job.locale)
            return Content(subject=" ".join((parts["subject"] or "").split()), html=parts["html"], text=parts["text"])
        except TemplateLimitError:
            raise  # absent data is not the cause: rendering again to explain would repeat the breach
        except TemplateError:
            if not job.explain:
                raise
            missing = self.missing_variables(job.main, job.data, job.dependencies, job.locale)
            if missing:
                raise MissingVariables(missing) from None
            raise

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
        budget_token = _budget.set(_Budget())
        try:
            for part in PARTS:
                if src.part(part) is None:
                    parts[part] = None
                    continue
                try:
                    parts[part] = self._render_part(self._envs, src, part, data)
                except _Breach as exc:
                    raise TemplateLimitError(f"{_where(exc, src, part)}: not allowed: {exc}", exc.limit) from None
                except SecurityError as exc:
                    raise TemplateError(f"{part} of {src.name!r} is not allowed: {exc}") from None
                except TemplateNotFound as exc:
                    raise TemplateError(f"{part} of {src.name!r}: {exc.message or exc.name}") from None
                except JinjaTemplateError as exc:
                    raise TemplateError(f"{_where(exc, src, part)}: {exc.message or exc}") from None
                except MemoryError:
                    raise  # the render process's limit (render_pool reports it), not the template's error
                except Exception as exc:  # a filter or operation failing on the given data
                    raise TemplateError(f"{_where(exc, src, part)}: {type(exc).__name__}: {exc}") from None
        finally:
            _budget.reset(budget_token)
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
            _budget.set(_Budget()),
        )
        try:
            for part in PARTS:
                if src.part(part) is not None:
                    try:
                        self._render_part(self._recording, src, part, data)
                    except MemoryError:
                        raise
                    except Exception:  # noqa: BLE001 - only the names matter here
                        continue
        finally:
            _budget.reset(tokens[3])
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
