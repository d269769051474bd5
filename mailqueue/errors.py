"""Error classes that say what happened to a delivery."""

from __future__ import annotations


class DeliveryError(Exception):
    """A send that did not go through; `reason` is safe to record (no credentials)."""

    def __init__(self, reason: str, *, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class TransientDeliveryError(DeliveryError):
    """Worth retrying: connection trouble, timeouts, SMTP 4xx."""


class ServerUnreachable(TransientDeliveryError):
    """Nothing was handed over: the server could not be reached (connection refused, timed out
    while connecting, name not resolved) or turned the session away before any mail (SMTP 421
    greeting). Waiting for the server to come back is not a delivery attempt."""


class PermanentDeliveryError(DeliveryError):
    """Retrying cannot help: SMTP 5xx, invalid recipients, authentication refused."""


class TemplateError(Exception):
    """A template that cannot be compiled or rendered with the given data."""
