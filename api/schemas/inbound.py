"""Bodies of /v1/inbound/*: what a provider's signed event request holds (documented for the schema;
the routes read the raw body, since the signature covers its bytes) and what we answer."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class InboundResult(BaseModel):
    """What became of the request's events. An event about a message we do not know is counted, not
    refused: a provider would send it again and again."""

    recorded: int = Field(default=0, description="Events recorded now (suppression, event, status)")
    duplicates: int = Field(default=0, description="Events recorded before (the provider sent them again): nothing changed")
    unknown: int = Field(default=0, description="Events about a message id no email of ours has")
    ignored: int = Field(default=0, description="Events of kinds not recorded (opens, clicks, processed, ...) or without a message id")
    confirmed: bool = Field(default=False, description="SES: an SNS SubscriptionConfirmation was verified and confirmed")


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


_STR = {"type": "string"}
SNS_BODY = _object(
    {name: _STR for name in ("Type", "MessageId", "TopicArn", "Message", "Timestamp", "Subject", "SubscribeURL",
                             "UnsubscribeURL", "Token", "SignatureVersion", "Signature", "SigningCertURL")}
    | {"Type": {"type": "string", "enum": ["Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"]}},
    ["Type", "MessageId", "TopicArn", "Message", "Timestamp"],
)
SENDGRID_BODY = {
    "type": "array",
    "items": _object(
        {"event": _STR, "email": _STR, "sg_event_id": _STR, "sg_message_id": _STR, "timestamp": {"type": "integer"},
         "type": _STR, "reason": _STR, "status": _STR, "response": _STR},
        ["event"],
    ),
}
MAILGUN_BODY = _object(
    {"signature": _object({"timestamp": _STR, "token": _STR, "signature": _STR}, ["timestamp", "token", "signature"]),
     "event-data": {"type": "object"}},
    ["event-data"],
)


def request_body(schema: dict[str, Any], media_types: tuple[str, ...] = ("application/json",)) -> dict[str, Any]:
    """openapi_extra documenting a raw body the route reads itself."""
    return {"requestBody": {"required": True, "content": {media: {"schema": schema} for media in media_types}}}
