"""Render activity: a pinned template version + data -> subject, html, text."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from mailqueue.contracts import TEMPLATE_ERROR, Content, RenderRequest
from mailqueue.errors import TemplateError
from mailqueue.store import template_version
from mailqueue.templating import TemplateEngine, TemplateSource


class RenderActivities:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], engine: TemplateEngine) -> None:
        self._sessions = sessions
        self._engine = engine

    @activity.defn(name="render_email")
    async def render(self, req: RenderRequest) -> Content:
        ref = req.template
        async with self._sessions() as session:
            row = await template_version(session, ref.name, ref.locale, ref.version)
        if row is None:
            raise ApplicationError(
                f"template {ref.name!r} version {ref.version} does not exist", type=TEMPLATE_ERROR, non_retryable=True
            )
        source = TemplateSource(
            name=row.name, version=row.version, locale=row.locale, subject=row.subject, html=row.html, text=row.text
        )
        try:
            return self._engine.render(source, ref.data)
        except TemplateError as exc:
            raise ApplicationError(str(exc), type=TEMPLATE_ERROR, non_retryable=True) from None
