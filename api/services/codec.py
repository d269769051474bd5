"""The codec endpoint's work: Temporal payloads in protobuf JSON, through the payload codec."""

from __future__ import annotations

from google.protobuf import json_format
from temporalio.api.common.v1 import Payload

from api.schemas.codec import PayloadJson, PayloadsJson
from api.services.errors import invalid
from mailqueue.codec import PayloadCipher, PayloadKeyError


def _parsed(items: list[PayloadJson]) -> list[Payload]:
    payloads = []
    for i, item in enumerate(items):
        try:
            payloads.append(json_format.ParseDict(item.model_dump(), Payload()))
        except json_format.ParseError as exc:
            raise invalid(
                ("body", "payloads", i), f"not a Temporal Payload in protobuf JSON (metadata values and data in base64): {exc}"
            ) from None
    return payloads


def _json(payloads: list[Payload]) -> PayloadsJson:
    return PayloadsJson.model_validate({"payloads": [json_format.MessageToDict(p) for p in payloads]})


def decode(cipher: PayloadCipher, body: PayloadsJson) -> PayloadsJson:
    """Encrypted payloads opened; any other payload returned as it came."""
    out = []
    for i, payload in enumerate(_parsed(body.payloads)):
        try:
            out.append(cipher.decrypt(payload))
        except PayloadKeyError as exc:  # names the key id, never a key
            raise invalid(("body", "payloads", i), str(exc)) from None
    return _json(out)


def encode(cipher: PayloadCipher, body: PayloadsJson) -> PayloadsJson:
    """Payloads encrypted with the newest key, as the API and the workers would write them."""
    return _json([cipher.encrypt(p) for p in _parsed(body.payloads)])
