"""Bodies of the codec endpoint: Temporal `Payloads` as protobuf JSON, the shape the Temporal Web UI
and CLI send to a codec server (https://github.com/temporalio/samples-go/tree/main/codec-server)."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# One request carries the payloads of one event (the UI) or of one command (the CLI): a few, never thousands.
MAX_PAYLOADS = 1000


def _base64(value: str) -> str:
    """Base64 as protobuf JSON writes it (standard or url-safe, padded or not); the protobuf parser
    itself skips stray characters, which would turn garbage into other bytes."""
    try:
        base64.b64decode(value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64") from None
    return value


Base64 = Annotated[str, AfterValidator(_base64)]


class PayloadJson(BaseModel):
    """One Payload: metadata values and data in base64."""

    model_config = ConfigDict(extra="allow")  # fields of newer Temporal APIs pass through to the protobuf parser

    metadata: dict[str, Base64] = Field(default_factory=dict, description='e.g. {"encoding": "YmluYXJ5L2VuY3J5cHRlZA=="}')
    data: Base64 = Field(default="", description="base64")


class PayloadsJson(BaseModel):
    payloads: list[PayloadJson] = Field(default_factory=list, max_length=MAX_PAYLOADS)


class CodecStatus(BaseModel):
    status: str = Field(description="'ok': this browser (or client) may decode and encode")
    key_ids: list[str] = Field(description="The ids of the payload keys the API holds, newest (the one that encrypts) first")
