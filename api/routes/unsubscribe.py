"""/u/{token}: one-click unsubscribe (RFC 8058). No API key: the signed token is the credential.

A GET only shows a page with a button, because mail scanners and link previews follow GETs; the
button's POST (or a mail client's one-click POST, body `List-Unsubscribe=One-Click`) unsubscribes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from api.deps import SessionDep
from api.services import suppressions

router = APIRouter(prefix="/u", tags=["unsubscribe"])

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<meta name="robots" content="noindex"><title>{title}</title></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 4em auto"><h1>{title}</h1>{body}</body></html>
"""
_CONFIRM = """<p>Stop receiving these emails?</p>
<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">Unsubscribe</button></form>"""
_DONE = "<p>You will not receive these emails any more.</p>"
# Errors are JSON, as everywhere in the API (`{"detail": ...}`): a browser shows the sentence.
RESPONSES = {404: {"description": "Not a valid unsubscribe link (tampered, cut short, or made with a retired key)"}}


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(title=title, body=body), headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


@router.get("/{token}", response_class=HTMLResponse, responses=RESPONSES, summary="A page asking to confirm (changes nothing)")
async def confirm_page(token: str, request: Request) -> HTMLResponse:
    suppressions.unsubscribe_target(request.app.state.settings, token)
    return _page("Unsubscribe", _CONFIRM)


@router.post(
    "/{token}", response_class=HTMLResponse, responses=RESPONSES,
    summary="Unsubscribe (RFC 8058 one-click; idempotent)",
    description="The body (`List-Unsubscribe=One-Click`, form-encoded) is accepted and not needed.",
)
async def unsubscribe(token: str, request: Request, session: SessionDep) -> HTMLResponse:
    await suppressions.unsubscribe(session, request.app.state.settings, token)
    return _page("Unsubscribed", _DONE)
