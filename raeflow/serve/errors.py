"""The one error type of the serving rules: a 4xx status and a message that says what was wrong and what is
accepted (the HTTP layer answers it as ``{"error": message}``)."""
from __future__ import annotations


class ServiceError(Exception):
    """A client error: ``status`` (4xx) and a message naming what was wrong and what is accepted."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def bad(message: str, status: int = 422) -> ServiceError:
    return ServiceError(status, message)
