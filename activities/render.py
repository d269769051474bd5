"""Render activity: the local activity that emails queued before the send step rendered still replay through.

The send activity renders the mail itself, right before handing it to the driver (see
`mailqueue.template_library.Renderer`), so the rendered mail never enters the workflow's history
(a 50-row report is ~30 KB of HTML; it would be stored twice per email) and the CPU work runs in
an activity, never inside a workflow task. Emails queued before that change (workflow patch
`send-renders-the-template`) render here.
"""

from __future__ import annotations

from temporalio import activity
from temporalio.exceptions import ApplicationError

from mailqueue.contracts import TEMPLATE_ERROR, Content, RenderRequest
from mailqueue.errors import TemplateError
from mailqueue.template_library import Renderer


class RenderActivities:
    def __init__(self, renderer: Renderer) -> None:
        self._renderer = renderer

    @activity.defn(name="render_email")
    async def render(self, req: RenderRequest) -> Content:
        try:
            return await self._renderer.render(req.template)
        except TemplateError as exc:
            raise ApplicationError(str(exc), type=TEMPLATE_ERROR, non_retryable=True) from None
