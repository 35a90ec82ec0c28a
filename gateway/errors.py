"""The few exceptions that carry what a client must be told; one middleware turns them into responses.

Bodies follow the upstream's error shape: `{"detail": ..., "code": ...}`, plus `errors` on 422.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status = 500
    code = "INTERNAL_ERROR"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail, "code": self.code}


class BadRequest(GatewayError):
    status = 400
    code = "INVALID_REQUEST"


class ValidationFailed(GatewayError):
    status = 422
    code = "VALIDATION_ERROR"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def body(self) -> dict[str, Any]:
        return {**super().body(), "errors": [{"field": self.field, "message": self.message}]}


class Unauthorized(GatewayError):
    status = 401
    code = "AUTH_INVALID_API_KEY"


class Forbidden(GatewayError):
    status = 403
    code = "FORBIDDEN"


class NotFound(GatewayError):
    status = 404
    code = "NOT_FOUND"


class RequestTimeout(GatewayError):
    """The client did not finish sending its request in time."""

    status = 408
    code = "REQUEST_TIMEOUT"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"


class QuotaExceeded(GatewayError):
    """A team policy refuses the request now; `retry_after` is whole seconds until it would be admitted."""

    status = 429

    def __init__(self, policy: str, retry_after: int, detail: str, *, code: str) -> None:
        super().__init__(detail, code=code, headers={"Retry-After": str(retry_after)})
        self.policy = policy
        self.retry_after = retry_after


class Overloaded(GatewayError):
    status = 503
    code = "OVERLOADED"

    def __init__(self, detail: str, retry_after: int = 1, *, code: str | None = None) -> None:
        super().__init__(detail, code=code, headers={"Retry-After": str(retry_after)})


class StateUnavailable(GatewayError):
    """The state store (quotas, usage, jobs) cannot answer now."""

    status = 503
    code = "STATE_UNAVAILABLE"

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        # Like every 503 the gateway sends: clients and their retry libraries read when to come back.
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class UpstreamRejected(GatewayError):
    """The upstream refused the request (4xx other than 429): its status and body are passed through."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        detail = str(body.get("detail") or body.get("error") or f"upstream answered {status}")
        super().__init__(detail, status=status, code=str(body.get("code") or "UPSTREAM_REJECTED"))
        self.upstream_body = body
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return self.upstream_body


class UpstreamFailed(GatewayError):
    """The upstream failed (5xx, connection error, bad answer) after every retry the deadline allowed."""

    status = 502
    code = "UPSTREAM_ERROR"


class UpstreamTimeout(GatewayError):
    status = 504
    code = "UPSTREAM_TIMEOUT"


class UpstreamRateLimited(GatewayError):
    """The upstream kept answering 429 past the caller's deadline."""

    status = 429
    code = "UPSTREAM_RATE_LIMITED"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after))})
