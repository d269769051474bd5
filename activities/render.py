"""Render activity: a pinned template version (and its pinned layouts/partials) + data -> subject, html, text."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from mailqueue.contracts import TEMPLATE_ERROR, Content, RenderRequest, TemplatePin
from mailqueue.errors import TemplateError
from mailqueue.store import SourceCache, pinned_source, resolve_dependencies
from mailqueue.templating import TemplateEngine


class RenderActivities:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], engine: TemplateEngine) -> None:
        self._sessions = sessions
        self._engine = engine
        self._sources = SourceCache()  # versions are immutable: a cached one is never stale

    @activity.defn(name="render_email")
    async def render(self, req: RenderRequest) -> Content:
        ref = req.template
        try:
            async with self._sessions() as session:
                main = await pinned_source(session, TemplatePin(ref.name, ref.version, ref.locale or ""), self._sources)
                if main is None:
                    raise TemplateError(f"template {ref.name!r} version {ref.version} does not exist")
                # Emails queued before dependencies were pinned resolve them to the current versions.
                dependencies = await resolve_dependencies(
                    session, self._engine, main, ref.format_locale or ref.locale, ref.dependencies, self._sources
                )
            return self._engine.render(main, ref.data, dependencies, ref.format_locale or ref.locale)
        except TemplateError as exc:
            raise ApplicationError(str(exc), type=TEMPLATE_ERROR, non_retryable=True) from None
