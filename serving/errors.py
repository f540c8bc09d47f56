"""Typed errors of the serving path; each maps to exactly one HTTP status.

Bad input never becomes a 500: validation raises one of these with the field, the
value and the rule, and the ingress turns it into a JSON body `{"error": ..., "field": ...}`.
"""

from __future__ import annotations

from typing import Any


class CourierError(Exception):
    """Base class: a message for the user, and optionally the field and rule it concerns."""

    status = 500

    def __init__(self, message: str, field: str | None = None, rule: str | None = None, value: Any = None):
        super().__init__(message)
        self.message, self.field, self.rule, self.value = message, field, rule, value

    def body(self) -> dict[str, Any]:
        """The JSON error body (Open Inference Protocol style: an `error` string, plus details)."""
        body: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.rule is not None:
            body["rule"] = self.rule
        return body


class MalformedRequest(CourierError):
    """400: the body is not JSON at all."""

    status = 400


class NotFound(CourierError):
    """404: unknown route, model or restaurant."""

    status = 404


class MethodNotAllowed(CourierError):
    """405: the route exists but not for this HTTP method."""

    status = 405


class PayloadTooLarge(CourierError):
    """413: the body is larger than the configured limit."""

    status = 413


class InvalidInput(CourierError):
    """422: well-formed JSON whose content breaks a rule (type, range, shape, datatype...)."""

    status = 422


class NotReady(CourierError):
    """503: the model is not loaded yet; retry with backoff."""

    status = 503
