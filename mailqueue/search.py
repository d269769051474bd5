"""What the Temporal UI can search and show for an email: its search attributes and its summary.

Search attributes are stored by Temporal in clear (payload encryption does not reach them), so
they carry no address, subject or body: a status, the sender's id, the template's name, the
priority, the due time, the caller's tags and related entity. The summary and details are
payloads, encrypted like the rest, and read in the UI through the API's /codec.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError

from mailqueue.contracts import EmailSpec, EmailStatus, SenderType, priority_key

log = logging.getLogger("mailqueue.search")

STATUS = SearchAttributeKey.for_keyword("EmailStatus")
SENDER = SearchAttributeKey.for_keyword("EmailSender")
TEMPLATE = SearchAttributeKey.for_keyword("EmailTemplate")
PRIORITY = SearchAttributeKey.for_int("EmailPriority")  # Temporal's priority key: 1 high, 3 normal, 5 low
SEND_AT = SearchAttributeKey.for_datetime("EmailSendAt")
TAGS = SearchAttributeKey.for_keyword_list("EmailTags")
RELATED_ENTITY = SearchAttributeKey.for_keyword("EmailRelatedEntity")

ALL: tuple[SearchAttributeKey, ...] = (STATUS, SENDER, TEMPLATE, PRIORITY, SEND_AT, TAGS, RELATED_ENTITY)
# How the CLI and the server's API name each key's type.
_TYPE_NAMES = {"KEYWORD": "Keyword", "INT": "Int", "DATETIME": "Datetime", "KEYWORD_LIST": "KeywordList"}


def type_name(key: SearchAttributeKey) -> str:
    return _TYPE_NAMES[key.indexed_value_type.name]


def dev_server_args() -> list[str]:
    """`temporal server start-dev` flags that register the attributes when the server starts."""
    return [arg for key in ALL for arg in ("--search-attribute", f"{key.name}={type_name(key)}")]


def create_commands(namespace: str) -> list[str]:
    """The commands an operator runs once on a real cluster."""
    return [
        f"temporal operator search-attribute create --namespace {namespace} --name {key.name} --type {type_name(key)}"
        for key in ALL
    ]


def sender_value(spec: EmailSpec) -> str:
    return "system" if spec.sender_type is SenderType.SYSTEM else str(spec.sender_id)


def initial(spec: EmailSpec) -> TypedSearchAttributes:
    """The attributes an email's workflow starts with (`scheduled` when it is due later, else
    `queued`); the workflow updates status and due time."""
    later = spec.send_at is not None and spec.send_at > datetime.now(UTC)
    pairs: list[SearchAttributePair] = [
        SearchAttributePair(STATUS, (EmailStatus.SCHEDULED if later else EmailStatus.QUEUED).value),
        SearchAttributePair(SENDER, sender_value(spec)),
        SearchAttributePair(PRIORITY, priority_key(spec.priority)),
    ]
    if spec.template is not None:
        pairs.append(SearchAttributePair(TEMPLATE, spec.template.name))
    if spec.send_at is not None:
        pairs.append(SearchAttributePair(SEND_AT, spec.send_at))
    if spec.tags:
        pairs.append(SearchAttributePair(TAGS, list(spec.tags)))
    if spec.related_entity_type and spec.related_entity_id:
        pairs.append(SearchAttributePair(RELATED_ENTITY, f"{spec.related_entity_type}:{spec.related_entity_id}"))
    return TypedSearchAttributes(pairs)


def _due(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC") if when.utcoffset() is not None else when.isoformat()


def summary(spec: EmailSpec) -> str:
    """One line for the UI's workflow list: "OrderShipped → 1 recipient, priority high, due 2026-11-30 09:00 UTC"."""
    count = len(spec.to) + len(spec.cc) + len(spec.bcc)
    what = spec.template.name if spec.template is not None else "raw email"
    line = f"{what} → {count} recipient{'s' if count != 1 else ''}, priority {spec.priority}"
    if spec.send_at is not None:
        line += f", due {_due(spec.send_at.astimezone(UTC))}"
    return line


def details(spec: EmailSpec) -> str:
    """The UI's details pane: what the email is, never to whom or what it says."""
    lines = [f"**email** `{spec.email_id}`", f"**sender** {sender_value(spec)}"]
    if spec.template is not None:
        lines.append(f"**template** {spec.template.name} v{spec.template.version}" + (f" ({spec.template.locale})" if spec.template.locale else ""))
    if spec.tags:
        lines.append("**tags** " + ", ".join(spec.tags))
    if spec.related_entity_type and spec.related_entity_id:
        lines.append(f"**related** {spec.related_entity_type}:{spec.related_entity_id}")
    lines.append(f"**attempts** up to {spec.retry.max_attempts}")
    return "\n".join(lines)


class SearchAttributesMissing(RuntimeError):
    """The namespace lacks mailqueue's search attributes, and they could not be added."""


async def ensure_registered(client: Client, namespace: str) -> list[str]:
    """Make sure the namespace has mailqueue's search attributes; add those it lacks (allowed on a
    dev server and a self-hosted cluster with operator rights). Returns the names added. Raises
    SearchAttributesMissing, with the commands to run, when they are missing and cannot be added."""
    existing = await client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace=namespace))
    wrong = [
        f"{key.name} is {IndexedValueType.Name(existing.custom_attributes[key.name])}, not {type_name(key)}"
        for key in ALL
        if key.name in existing.custom_attributes and existing.custom_attributes[key.name] != key.indexed_value_type
    ]
    if wrong:
        raise SearchAttributesMissing("search attributes of the wrong type: " + "; ".join(wrong))
    missing = [key for key in ALL if key.name not in existing.custom_attributes]
    if not missing:
        return []
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=namespace, search_attributes={key.name: key.indexed_value_type for key in missing}
            )
        )
    except RPCError as exc:
        commands = "\n  ".join(create_commands(namespace))
        raise SearchAttributesMissing(
            f"namespace {namespace!r} lacks the search attributes {', '.join(k.name for k in missing)} and they "
            f"could not be added ({exc.message}). Add them once:\n  {commands}\n"
            "or set MAILQUEUE_SEARCH_ATTRIBUTES=false to run without them."
        ) from None
    return [key.name for key in missing]

