"""Which HTTP status and OpenAI error type each failure gets. 500 is kept for our own bugs."""

from vlserve.errors import (
    ConfigError, EngineDeadError, InvalidRequestError, MediaError, MediaTooLargeError, VLServeError,
)


class AuthError(VLServeError):
    """Missing or wrong API key (HTTP 401)."""


class ModelNotFoundError(VLServeError):
    """The request names a model this server does not serve (HTTP 404)."""


class OverloadedError(VLServeError):
    """The waiting queue is full (HTTP 503 with Retry-After)."""


STATUS = (  # most specific first
    (MediaTooLargeError, 413, "invalid_request_error"),
    (MediaError, 400, "invalid_request_error"),
    (InvalidRequestError, 400, "invalid_request_error"),
    (AuthError, 401, "authentication_error"),
    (ModelNotFoundError, 404, "not_found_error"),
    (OverloadedError, 503, "service_unavailable"),
    (EngineDeadError, 503, "service_unavailable"),
    (ConfigError, 400, "invalid_request_error"),
)


def status_of(e: BaseException) -> tuple[int, str]:
    for kind, status, name in STATUS:
        if isinstance(e, kind):
            return status, name
    return 500, "internal_error"
