"""Adapter errors carry the HTTP status a client should see and a message a person can act on."""

from __future__ import annotations


class AdapterError(Exception):
    status = 422
    kind = "invalid_adapter"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field  # the request or adapter_config.json field at fault, when one is

    def __reduce__(self):
        # It crosses from the engine's process to the HTTP one (engine_client.py) pickled;
        # the default would rebuild it from the message alone and lose the field.
        return (type(self), (self.message, self.field))


class InvalidAdapter(AdapterError):
    """The adapter's files are malformed or hold values no adapter can have (422)."""

    status = 422
    kind = "invalid_adapter"


class InvalidName(AdapterError):
    status = 400
    kind = "invalid_name"


class AdapterNotFound(AdapterError):
    status = 404
    kind = "not_found"


class SourceNotFound(AdapterError):
    status = 404
    kind = "source_not_found"


class SourceUnreachable(AdapterError):
    status = 502
    kind = "source_unreachable"


class InvalidSource(AdapterError):
    status = 400
    kind = "invalid_source"


class Incompatible(AdapterError):
    status = 422
    kind = "incompatible"


class ChecksumMismatch(AdapterError):
    status = 422
    kind = "checksum_mismatch"


class Conflict(AdapterError):
    status = 409
    kind = "conflict"


class SourceTooLarge(AdapterError):
    status = 422
    kind = "source_too_large"


class SourceTimeout(AdapterError):
    status = 504
    kind = "source_timeout"


class TooManyFetches(AdapterError):
    status = 429
    kind = "too_many_fetches"


class InsufficientStorage(AdapterError):
    status = 507
    kind = "insufficient_storage"


class RuntimeClosing(AdapterError):
    """A PUT that came after SIGTERM (503)."""

    status = 503
    kind = "shutting_down"
