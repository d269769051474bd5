"""What a service says when it cannot do what was asked. Front doors map these (REST: app.py)."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request the service refuses; `detail` says why, in words for the caller."""

    def __init__(self, detail: Any) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    """No such thing, or not the caller's (someone else's is as unknown as one that does not exist)."""


class Conflict(ServiceError):
    """Not possible in the thing's current state (or an Idempotency-Key reused for another request)."""


class LimitReached(ServiceError):
    """Over a volume limit for now (recipients per hour): `retry_after` says in how many seconds it frees up."""

    def __init__(self, detail: Any, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class FeatureOff(ServiceError):
    """A feature an operator has turned off for now (a feature flag, mailqueue/flags.py): nothing was queued."""


class Invalid(ServiceError):
    """The input is wrong: `detail` is a list of field errors (`loc`, `msg`, `type`, ...), or a
    summary with `items` (a batch refused as a whole)."""

    def errors(self) -> Any:
        return self.detail


class TooLarge(Invalid):
    """A file, or an email's files together, over a size limit (REST: 413); `detail` as Invalid's, naming the file."""


def field_error(loc: tuple[str | int, ...], msg: str, *, value: Any = None, type: str = "value_error", **extra: Any) -> dict[str, Any]:
    """One field error, shaped as pydantic's: `loc` starts with where the field came from ("body", "query")."""
    return {"type": type, "loc": loc, "msg": msg, **extra, "input": value}


def invalid(loc: tuple[str | int, ...], msg: str, *, value: Any = None, type: str = "value_error", **extra: Any) -> Invalid:
    """The input is wrong in one field."""
    return Invalid([field_error(loc, msg, value=value, type=type, **extra)])


# How long a caller waits before trying again when Temporal or the database is down (REST's Retry-After).
RETRY_AFTER_SECONDS = 5


def unavailable_detail(what: str) -> str:
    return f"{what} is unavailable; nothing was changed, try again"


# Each refusal in both front doors' terms, one to one: REST's status code and GraphQL's extensions.code.
# (Auth and outages are refused before or outside a service: 401 UNAUTHENTICATED, 403 FORBIDDEN, 503 UNAVAILABLE.)
REFUSALS: dict[type[ServiceError], tuple[int, str]] = {
    NotFound: (404, "NOT_FOUND"),
    Conflict: (409, "CONFLICT"),
    TooLarge: (413, "PAYLOAD_TOO_LARGE"),
    Invalid: (422, "BAD_USER_INPUT"),
    LimitReached: (429, "TOO_MANY_REQUESTS"),
    FeatureOff: (503, "UNAVAILABLE"),
}
OUTSIDE = {401: "UNAUTHENTICATED", 403: "FORBIDDEN", 429: "TOO_MANY_REQUESTS", 503: "UNAVAILABLE"}


def refusal_of(exc: ServiceError) -> tuple[int, str]:
    return next((pair for kind, pair in REFUSALS.items() if isinstance(exc, kind)), (400, "BAD_REQUEST"))
