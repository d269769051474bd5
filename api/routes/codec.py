"""/codec: the codec server of the Temporal Web UI and CLI, with the keys the API and the workers
encrypt payloads with (mailqueue/codec.py).

`POST /codec/decode` and `/codec/encode` take and answer Temporal `Payloads` as protobuf JSON. Only
admins may call them: payloads hold every user's mail. Point the UI at `<API URL>/codec`
(`temporal server start-dev --ui-codec-endpoint`, the UI's TEMPORAL_CODEC_ENDPOINT) and the CLI too
(`temporal workflow show --codec-endpoint <API URL>/codec --codec-auth 'Bearer <admin key>'`).

A browser sends the key the way the template previews do: open `<API URL>/codec` once in the
browser that shows the UI, answer its prompt (any user name, an admin key as the password), and
turn on the UI's "include cross-origin credentials" (TEMPORAL_CODEC_INCLUDE_CREDENTIALS=true):
the browser then adds that Basic login to the UI's calls. Only the origins in
MAILQUEUE_CODEC_CORS_ORIGINS may make such calls, and only to /codec.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import require_browser_admin
from api.schemas.codec import CodecStatus, PayloadsJson
from api.services import codec
from mailqueue.accounts import Principal
from mailqueue.codec import PayloadCipher

PREFIX = "/codec"
router = APIRouter(prefix=PREFIX, tags=["codec"])
CodecAdmin = Annotated[Principal, Depends(require_browser_admin)]
ADMIN_ONLY = {403: {"description": "Not an admin key: payloads hold every user's mail"}}


def _cipher(request: Request) -> PayloadCipher:
    # The very codec the API's own Temporal client encrypts with (mailqueue.temporal.connect).
    cipher = request.app.state.temporal.data_converter.payload_codec
    assert isinstance(cipher, PayloadCipher)
    return cipher


@router.get("", response_model=CodecStatus, responses=ADMIN_ONLY, summary="Sign a browser in for the Temporal UI's codec calls (Basic)")
async def codec_status(request: Request, _: CodecAdmin) -> CodecStatus:
    return CodecStatus(status="ok", key_ids=_cipher(request).key_ids)


@router.post("/decode", response_model=PayloadsJson, responses=ADMIN_ONLY, summary="Decrypt Temporal payloads (others pass through)")
async def decode(request: Request, body: PayloadsJson, _: CodecAdmin) -> PayloadsJson:
    return codec.decode(_cipher(request), body)


@router.post("/encode", response_model=PayloadsJson, responses=ADMIN_ONLY, summary="Encrypt Temporal payloads with the newest key")
async def encode(request: Request, body: PayloadsJson, _: CodecAdmin) -> PayloadsJson:
    return codec.encode(_cipher(request), body)


class CodecCORS:
    """CORS for /codec only: the Temporal UI's origins may call it with the browser's credentials;
    no other route answers a script from another origin."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        if "*" in origins:
            # With credentials, "any origin" would let every web page an admin visits decode payloads.
            raise ValueError("MAILQUEUE_CODEC_CORS_ORIGINS must name the Temporal UI's origins; '*' is refused")
        self.app = app
        self.cors = CORSMiddleware(
            app, allow_origins=origins, allow_credentials=True, allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Namespace"], max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == PREFIX or path.startswith(PREFIX + "/"):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)
