"""Sandboxed Jinja2 rendering of email templates (template authors are not trusted)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateError as JinjaTemplateError, meta
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from mailqueue.contracts import Content
from mailqueue.errors import TemplateError


@dataclass(frozen=True)
class TemplateSource:
    """The parts of one template version."""

    name: str
    version: int
    subject: str
    html: str | None
    text: str | None
    locale: str = ""


def _environment(autoescape: bool) -> SandboxedEnvironment:
    return SandboxedEnvironment(autoescape=autoescape, undefined=StrictUndefined, keep_trailing_newline=True)


class TemplateEngine:
    """Compiles template versions once (versions are immutable) and renders them."""

    def __init__(self, cache_size: int = 512) -> None:
        self._html = _environment(autoescape=True)
        self._plain = _environment(autoescape=False)
        self._cache: OrderedDict[tuple[str, str, int, str], Any] = OrderedDict()
        self._cache_size = cache_size

    def _compiled(self, src: TemplateSource, part: str, source: str) -> Any:
        key = (src.name, src.locale, src.version, part)
        tpl = self._cache.get(key)
        if tpl is None:
            env = self._html if part == "html" else self._plain
            try:
                tpl = env.from_string(source)
            except JinjaTemplateError as exc:
                raise TemplateError(f"{part} template of {src.name!r}: {exc}") from None
            self._cache[key] = tpl
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return tpl

    def render(self, src: TemplateSource, data: dict[str, Any]) -> Content:
        parts: dict[str, str | None] = {}
        for part in ("subject", "html", "text"):
            source = getattr(src, part)
            if source is None:
                parts[part] = None
                continue
            try:
                parts[part] = self._compiled(src, part, source).render(data)
            except SecurityError as exc:
                raise TemplateError(f"{part} template of {src.name!r} is not allowed to do that: {exc}") from None
            except JinjaTemplateError as exc:
                raise TemplateError(f"{part} template of {src.name!r}: {exc}") from None
            except Exception as exc:  # a filter or operation failing on the given data
                raise TemplateError(f"{part} template of {src.name!r} failed: {type(exc).__name__}: {exc}") from None
        subject = " ".join((parts["subject"] or "").split())
        return Content(subject=subject, html=parts["html"], text=parts["text"])

    def variables(self, src: TemplateSource) -> set[str]:
        """Top-level names the template refers to (whether or not every branch needs them)."""
        names: set[str] = set()
        for part in ("subject", "html", "text"):
            source = getattr(src, part)
            if source:
                try:
                    names |= meta.find_undeclared_variables(self._plain.parse(source))
                except JinjaTemplateError as exc:
                    raise TemplateError(f"{part} template of {src.name!r}: {exc}") from None
        return names

    def check_syntax(self, source: str, part: str) -> None:
        try:
            self._plain.parse(source)
        except JinjaTemplateError as exc:
            line = getattr(exc, "lineno", None)
            raise TemplateError(f"{part}: line {line}: {exc}" if line else f"{part}: {exc}") from None
