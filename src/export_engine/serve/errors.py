"""The service's errors: each an :class:`ExportError` (with its CLI exit code) and an HTTP status.

Everything the service raises on purpose is answered as ``{"error": <class name>, "detail": <message>}``
with the status below; a stage error from the library without its own status is a 422 (its input was wrong).
"""

from __future__ import annotations

from export_engine.errors import ExportError, ModelInputError, UsageError

STATUS_OF_STAGE = {ModelInputError: 422, UsageError: 400}


class SessionNotFoundError(UsageError):
    """No session has this id (never created, deleted, expired or evicted)."""

    status = 404


class PayloadTooLargeError(ModelInputError):
    """A request body or a volume over the server's limits."""

    status = 413


class PathNotAllowedError(UsageError):
    """A server-side path outside the allow-listed root (or no root configured)."""

    status = 403


class NoSuchArtifactError(UsageError):
    """A request names an artifact the server does not hold, or one of the wrong model."""

    status = 404


def http_status(err: ExportError) -> int:
    status = getattr(err, "status", None)
    if isinstance(status, int):
        return status
    for kind, code in STATUS_OF_STAGE.items():
        if isinstance(err, kind):
            return code
    return 500
