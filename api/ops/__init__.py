"""The ops console at /ops: server-rendered pages over the same services as /v1, for a browser logged in with an API key."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from api.ops.pages import PAGE_HEADERS, STATIC_DIR, STATIC_PATH, render
from api.ops.routes import router
from api.ops.session import AdminsOnly, CsrfRefused, NotLoggedIn

__all__ = ["install", "router"]


def install(app: FastAPI) -> None:
    """The pages, their static files (vendored: nothing loads from elsewhere), and what a request
    without a login (to the login page) or without its CSRF token (403) gets."""
    app.include_router(router)
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="ops-static")

    @app.exception_handler(NotLoggedIn)
    async def _log_in_first(request: Request, exc: NotLoggedIn) -> RedirectResponse:
        return RedirectResponse("/ops/login", status_code=303)

    def refused(request: Request, why: str) -> HTMLResponse:
        body = render("refused.html", request, principal=None, csrf="", kill_switch=None, error=why)
        return HTMLResponse(body, status_code=403, headers=PAGE_HEADERS)

    @app.exception_handler(CsrfRefused)
    async def _forged(request: Request, exc: CsrfRefused) -> HTMLResponse:
        return refused(request, "This form was not sent from an ops page of this session (its CSRF token is missing or wrong).")

    @app.exception_handler(AdminsOnly)
    async def _admins_only(request: Request, exc: AdminsOnly) -> HTMLResponse:
        return refused(request, "This page needs an admin key.")
