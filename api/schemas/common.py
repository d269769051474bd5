"""What the request bodies of every resource share: storable text and JSON, addresses."""

from __future__ import annotations

import re
from email.utils import formataddr
from typing import Annotated, Any

from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, Field

from mailqueue.message import header_text_problem


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


def header_text(value: str, what: str) -> str:
    """Text that goes into a mail header (subject, header values, display names): no line breaks of
    any kind, no control characters but TAB, no bidirectional overrides, not even inside an RFC 2047
    encoded word (see mailqueue/message.py)."""
    problem = header_text_problem(value)
    if problem is not None:
        raise ValueError(f"{what} must not contain {problem}")
    return storable(value, what)


no_line_breaks = header_text  # its older name


_NAMED_ADDRESS = re.compile(r"^\s*(?P<name>[^<>]*?)\s*<(?P<addr>[^<>]*)>\s*$")


def named_address(name: str, addr: str) -> str:
    """"Name <addr>", the name quoted or encoded as RFC 5322 needs (formataddr, which refuses a
    non-ASCII address: an internationalized mailbox keeps its name this way)."""
    if addr.isascii():
        return formataddr((name, addr))
    return formataddr((name, "")).removesuffix(" <>") + f" <{addr}>"


def normalize_address(value: str) -> str:
    """Validate one address ("ann@example.com" or "Ann <ann@example.com>") and normalize it.

    The domain is kept in its ASCII form (bücher.de and xn--bcher-kva.de both become
    xn--bcher-kva.de), so relays without SMTPUTF8 take it; only a non-ASCII mailbox (before the @)
    stays Unicode, and needs SMTPUTF8 on every relay."""
    header_text(value, "an address")
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
        valid = validate_email(addr, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"{value!r} is not a valid email address: {exc}") from None
    addr = valid.ascii_email or f"{valid.local_part}@{valid.ascii_domain}"
    if name:
        header_text(name, f"the display name of {addr!r}")
    return named_address(name, addr) if name else addr


Address = Annotated[str, Field(max_length=512, examples=["Ann Smith <ann@example.com>"])]
