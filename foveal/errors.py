"""One error hierarchy, mapped once to HTTP status + OpenAI error JSON and to gRPC codes.

Everything the request path raises on purpose is a ``FovealError``; the edges turn it into
the wire error with :func:`http_error_body` / ``grpc_code`` and never invent their own.
"""

from __future__ import annotations

from typing import Any, ClassVar

import grpc

__all__ = [
    "Conflict",
    "FovealError",
    "InvalidRequest",
    "NoEligiblePool",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "PoolError",
    "PoolTimeout",
    "RateLimited",
    "Unauthenticated",
    "http_error_body",
]


class FovealError(Exception):
    """Base of every error Foveal reports to a client."""

    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    error_type: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class InvalidRequest(FovealError):
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    http_status = 413


class Unauthenticated(FovealError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    error_type = "authentication_error"


class PermissionDenied(FovealError):
    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    error_type = "permission_error"


class NotFound(FovealError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    error_type = "not_found_error"


class Conflict(FovealError):
    http_status = 409
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    error_type = "conflict_error"


class RateLimited(FovealError):
    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "rate_limit_error"


class PoolError(FovealError):
    """A pool answered with something unusable (bad gateway)."""

    http_status = 502
    grpc_code = grpc.StatusCode.UNAVAILABLE
    error_type = "pool_error"


class NoEligiblePool(FovealError):
    """No endpoint of any eligible tier could take the request."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    error_type = "service_unavailable"


class PoolTimeout(FovealError):
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    error_type = "timeout_error"


def http_error_body(err: FovealError) -> dict[str, Any]:
    """The OpenAI error JSON for ``err``."""
    return {
        "error": {
            "message": err.message,
            "type": err.error_type,
            "param": err.param,
            "code": err.code,
        }
    }
