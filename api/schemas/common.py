"""What the request bodies of every resource share: storable text and JSON, addresses."""

from __future__ import annotations

import re
from email.utils import formataddr
from typing import Annotated, Any

from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, Field


def storable(value: str, what: str = "the value") -> str:
    """PostgreSQL text holds neither NUL nor lone surrogates (not UTF-8): refused here as a 422, not at the database."""
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be valid Unicode (no unpaired surrogates)") from None
    return value


def storable_json(value: Any) -> Any:
    """The same for every key and string inside a JSON value (stored as JSONB)."""
    if isinstance(value, str):
        storable(value, "a string in this object")
    elif isinstance(value, dict):
        for key, item in value.items():
            storable(key, "a key in this object")
            storable_json(item)
    elif isinstance(value, list):
        for item in value:
            storable_json(item)
    return value


Text = Annotated[str, AfterValidator(storable)]
JsonObject = Annotated[dict[str, Any], AfterValidator(storable_json)]


def no_line_breaks(value: str, what: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"{what} must not contain CR or LF characters")
    return storable(value, what)


_NAMED_ADDRESS = re.compile(r"^\s*(?P<name>[^<>]*?)\s*<(?P<addr>[^<>]*)>\s*$")


def normalize_address(value: str) -> str:
    """Validate one address ("ann@example.com" or "Ann <ann@example.com>") and normalize it."""
    no_line_breaks(value, "an address")
    named = _NAMED_ADDRESS.match(value)
    if named:
        name, addr = named["name"].strip().strip('"').strip(), named["addr"].strip()
    elif "<" in value or ">" in value:
        raise ValueError(f"{value!r} is not of the form 'Name <address>'")
    else:
        name, addr = "", value.strip()
    if "," in addr or ";" in addr:
        raise ValueError(f"{value!r} is not one email address; give each address as its own list item")
    try:
        addr = validate_email(addr, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(f"{value!r} is not a valid email address: {exc}") from None
    return formataddr((name, addr)) if name else addr


Address = Annotated[str, Field(max_length=512, examples=["Ann Smith <ann@example.com>"])]
