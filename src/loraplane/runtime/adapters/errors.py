"""Adapter errors carry the HTTP status a client should see and a message a person can act on."""

from __future__ import annotations


class AdapterError(Exception):
    status = 422
    kind = "invalid_adapter"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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
