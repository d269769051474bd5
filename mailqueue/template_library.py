"""Templates as the API, the worker and the dev stack use them: check a draft, prepare a render,
render a pinned version for sending, load a folder.

A folder of templates (see README, "Templates") looks like::

    templates/
      _Layout/body.html            layouts and partials: names start with "_"
      _Header/body.html
      StockIssueApproved/
        subject.txt  body.html  [body.txt]  [template.json]
        de/subject.txt  de/body.html          a locale variant (template.json optional)

`template.json` holds description, default_from, default_from_name and sample_data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from mailqueue.contracts import Content, TemplatePin, TemplateRef
from mailqueue.errors import TemplateError
from mailqueue.models import EmailTemplate
from mailqueue.template_store import (
    SourceCache,
    current_exact,
    current_templates,
    pin_of,
    pinned_source,
    resolve_dependencies,
    save_template_version,
    source_of,
)
from mailqueue.templating import (
    PARTS,
    MissingVariables,
    RenderJob,
    TemplateEngine,
    TemplateLimitError,
    TemplateSource,
    check_locale,
    is_partial,
)

__all__ = ["MissingVariables", "TemplateLimitError"]  # where the API and the worker have always found them

FILES = {"subject": "subject.txt", "html": "body.html", "text": "body.txt"}
META_FILE = "template.json"
META_FIELDS = ("description", "default_from", "default_from_name", "sample_data")


@dataclass(frozen=True)
class Problem:
    """What is wrong with a template draft, and where (`field` is subject/html/text/sample_data/...).
    `limit`: the render limit its sample data broke (see TemplateLimitError), if that is the problem."""

    field: str
    message: str
    line: int | None = None
    template: str | None = None
    limit: str | None = None

    def __str__(self) -> str:
        where = f"{self.template}: " if self.template else ""
        return f"{where}{self.field}" + (f": line {self.line}" if self.line else "") + f": {self.message}"


@dataclass
class Prepared:
    """A template pinned with its dependencies and rendered with the given data."""

    main: TemplateSource
    row: EmailTemplate
    dependencies: dict[str, TemplateSource]
    content: Content

    def ref(self, data: dict[str, Any], format_locale: str | None) -> TemplateRef:
        return TemplateRef(
            name=self.main.name,
            version=self.main.version,
            locale=self.main.locale or None,
            data=data,
            dependencies=[pin_of(d) for d in sorted(self.dependencies.values(), key=lambda s: s.name)],
            format_locale=format_locale,
        )


async def render_checked(
    engine: TemplateEngine,
    main: TemplateSource,
    data: Mapping[str, Any],
    dependencies: Mapping[str, TemplateSource],
    locale: str | None,
    finish: bool = True,
) -> Content:
    """Render (bounded: in the engine's render pool), turning a failure caused by absent data into
    MissingVariables (with every missing name); a broken limit is a TemplateLimitError.

    `finish=False` stops after Jinja (no CSS inlining, no text part): enough to prove the data fits.
    """
    return await engine.render_bounded(RenderJob(main, dict(data), dict(dependencies), locale, finish=finish))


async def prepare(
    session: AsyncSession,
    engine: TemplateEngine,
    row: EmailTemplate,
    data: Mapping[str, Any],
    locale: str | None,
    finish: bool = True,
) -> Prepared:
    """Pin `row` and the current versions of what it uses, and prove `data` renders it."""
    main = source_of(row)
    dependencies = await resolve_dependencies(session, engine, main, locale)
    content = await render_checked(engine, main, data, dependencies, locale, finish)
    return Prepared(main=main, row=row, dependencies=dependencies, content=content)


class Renderer:
    """Renders an email's pinned template version (and its pinned layouts/partials) with its data:
    what the send step does right before it hands the mail to the driver."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], engine: TemplateEngine) -> None:
        self.sessions = sessions
        self._engine = engine
        self._sources = SourceCache()  # versions are immutable: a cached one is never stale

    async def render(self, ref: TemplateRef) -> Content:
        """Raises TemplateError when the template cannot render, one of STORE_ERRORS when the database is away."""
        locale = ref.format_locale or ref.locale
        async with self.sessions() as session:
            main = await pinned_source(session, TemplatePin(ref.name, ref.version, ref.locale or ""), self._sources)
            if main is None:
                raise TemplateError(f"template {ref.name!r} version {ref.version} does not exist")
            # Emails queued before dependencies were pinned resolve them to the current versions.
            dependencies = await resolve_dependencies(session, self._engine, main, locale, ref.dependencies, self._sources)
        # In the engine's render pool: bounded in CPU, time and memory, and off the worker's event
        # loop (workflow tasks, other activities). A broken limit is a TemplateLimitError.
        return await self._engine.render_bounded(RenderJob(main, ref.data, dependencies, locale, explain=False))


async def check_draft(
    session: AsyncSession,
    engine: TemplateEngine,
    draft: TemplateSource,
    sample_data: Mapping[str, Any] | None,
    batch: Mapping[str, TemplateSource] | None = None,
) -> list[Problem]:
    """Syntax (with lines), the templates it uses (exist, no cycle, have the parts it needs), sample data renders.

    `batch` holds drafts saved together (a folder reload): they satisfy each other's references.
    """
    problems = [Problem(p.part, p.message, p.line) for p in engine.syntax_problems(draft)]
    if problems:
        return problems
    dependencies: dict[str, TemplateSource] = {}
    wanted = set(engine.references(draft))
    while wanted:
        name = wanted.pop()
        if name == draft.name:
            via = " (through another template)" if name not in engine.references(draft) else ""
            return [Problem("html" if draft.html else "text", f"template {draft.name!r} uses itself{via}")]
        if name in dependencies:
            continue
        src = (batch or {}).get(name)
        if src is None:
            row = (await current_templates(session, [name], draft.locale)).get(name)
            if row is None:
                return [Problem(_part_using(engine, draft, name), f"uses template {name!r}, which does not exist or is inactive")]
            src = source_of(row)
        dependencies[name] = src
        wanted |= set(engine.references(src)) - set(dependencies)
    for part in PARTS:
        for name in engine.part_references(draft, part):
            if dependencies[name].part(part) is None:
                problems.append(Problem(part, f"uses template {name!r}, which has no {part} part"))
    if problems:
        return problems
    if sample_data is not None and not is_partial(draft.name):
        try:
            await render_checked(engine, draft, sample_data, dependencies, draft.locale or None)
        except TemplateError as exc:
            limit = exc.limit if isinstance(exc, TemplateLimitError) else None
            problems.append(Problem("sample_data", f"the template does not render with its sample data: {exc}", limit=limit))
    return problems


def _part_using(engine: TemplateEngine, src: TemplateSource, name: str) -> str:
    return next((p for p in PARTS if name in engine.part_references(src, p)), "html")


# --- a folder of templates ----------------------------------------------------------------


@dataclass
class FileTemplate:
    """One template variant read from a folder."""

    name: str
    locale: str
    path: Path
    parts: dict[str, str | None]
    meta: dict[str, Any] = field(default_factory=dict)

    def source(self) -> TemplateSource:
        return TemplateSource(
            name=self.name,
            version=0,  # a draft: the version is assigned when it is saved
            locale=self.locale,
            subject=self.parts["subject"] or "",
            html=self.parts["html"],
            text=self.parts["text"],
        )

    def row(self, created_by: str) -> EmailTemplate:
        return EmailTemplate(
            name=self.name,
            locale=self.locale,
            subject=self.parts["subject"] or "",
            html=self.parts["html"],
            text=self.parts["text"],
            created_by=created_by,
            **{k: self.meta.get(k) for k in META_FIELDS},
        )

    def same_as(self, row: EmailTemplate) -> bool:
        return (
            row.subject == (self.parts["subject"] or "")
            and row.html == self.parts["html"]
            and row.text == self.parts["text"]
            and all(getattr(row, k) == self.meta.get(k) for k in META_FIELDS)
        )


def read_folder(directory: Path) -> tuple[list[FileTemplate], list[Problem]]:
    """Every template in `directory` (one sub-folder per name, locale variants in sub-sub-folders)."""
    templates: list[FileTemplate] = []
    problems: list[Problem] = []
    if not directory.is_dir():
        return [], [Problem("directory", f"{directory} is not a directory")]
    for folder in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
        base_meta, problem = _read_meta(folder)
        if problem:
            problems.append(problem)
            continue
        variants: list[tuple[Path, str]] = [(folder, "")]
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                variants.append((sub, check_locale(sub.name) or ""))
            except ValueError:
                problems.append(Problem("folder", f"{sub}: a sub-folder is a locale variant, like 'de' or 'pt-BR'", template=folder.name))
        for path, locale in variants:
            meta, problem = _read_meta(path) if locale else (base_meta, None)
            if problem:
                problems.append(problem)
                continue
            merged = {**base_meta, **meta} if locale else base_meta
            parts = {part: _read_text(path / filename) for part, filename in FILES.items()}
            if parts["html"] is None and parts["text"] is None:
                if locale or not any(sub.is_dir() for sub in folder.iterdir()):
                    problems.append(Problem("files", f"{path} has neither {FILES['html']} nor {FILES['text']}", template=folder.name))
                continue
            if not is_partial(folder.name) and not (parts["subject"] or "").strip():
                problems.append(Problem("subject", f"{path / FILES['subject']} is missing or empty", template=folder.name))
                continue
            if parts["subject"] is not None:
                parts["subject"] = parts["subject"].strip()
            templates.append(FileTemplate(folder.name, locale, path, parts, merged))
    return templates, problems


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _read_meta(folder: Path) -> tuple[dict[str, Any], Problem | None]:
    path = folder / META_FILE
    if not path.is_file():
        return {}, None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return {}, Problem(META_FILE, f"{path}: not valid JSON: {exc}", template=folder.name)
    unknown = set(meta) - set(META_FIELDS) if isinstance(meta, dict) else {"(not an object)"}
    if unknown:
        return {}, Problem(META_FILE, f"{path}: unknown keys {sorted(unknown)}; allowed: {list(META_FIELDS)}", template=folder.name)
    return meta, None


@dataclass
class ReloadResult:
    created: list[TemplatePin] = field(default_factory=list)
    unchanged: list[TemplatePin] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


async def reload_folder(
    session: AsyncSession, engine: TemplateEngine, directory: Path, created_by: str = "reload"
) -> ReloadResult:
    """Save a new version of every template in `directory` whose content changed; all or nothing."""
    templates, problems = read_folder(directory)
    result = ReloadResult(problems=problems)
    if problems:
        return result
    batch = {t.name: t.source() for t in templates if not t.locale}
    for t in templates:
        overlay = {**batch, **{o.name: o.source() for o in templates if o.locale == t.locale and o.locale}}
        overlay.pop(t.name, None)
        for p in await check_draft(session, engine, t.source(), t.meta.get("sample_data"), overlay):
            where = f"{t.name}" + (f"/{t.locale}" if t.locale else "")
            result.problems.append(Problem(p.field, p.message, p.line, template=where, limit=p.limit))
    if result.problems:
        return result
    for t in templates:
        current = await current_exact(session, t.name, t.locale)
        if current is not None and current.is_active and t.same_as(current):
            result.unchanged.append(TemplatePin(t.name, current.version, t.locale))
            continue
        saved = await save_template_version(session, t.row(created_by))
        result.created.append(TemplatePin(saved.name, saved.version, saved.locale))
    return result
