"""Rendering: a pinned template version (and its pinned layouts/partials) + data -> subject, html, text.

The send activity renders the mail itself, right before handing it to the driver, so the
rendered mail never enters the workflow's history (a 50-row report is ~30 KB of HTML; it
would be stored twice per email) and the CPU work runs in an activity, never inside a
workflow task. `RenderActivities` is the local activity that emails queued before that
change (workflow patch `send-renders-the-template`) still replay through.
"""

from __future__ import annotations

import asyncio

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from mailqueue.contracts import TEMPLATE_ERROR, Content, RenderRequest, TemplatePin, TemplateRef
from mailqueue.errors import TemplateError
from mailqueue.store import SourceCache, pinned_source, resolve_dependencies
from mailqueue.templating import TemplateEngine

# What a database that cannot be reached raises: the render waits for it, it does not fail.
STORE_ERRORS: tuple[type[BaseException], ...] = (SQLAlchemyError, OSError, asyncio.TimeoutError)


class Renderer:
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
        # A thread keeps the worker's event loop (workflow tasks, other activities) free while a
        # big template renders; Jinja environments are safe to share between threads.
        return await asyncio.to_thread(self._engine.render, main, ref.data, dependencies, locale)


class RenderActivities:
    def __init__(self, renderer: Renderer) -> None:
        self._renderer = renderer

    @activity.defn(name="render_email")
    async def render(self, req: RenderRequest) -> Content:
        try:
            return await self._renderer.render(req.template)
        except TemplateError as exc:
            raise ApplicationError(str(exc), type=TEMPLATE_ERROR, non_retryable=True) from None
