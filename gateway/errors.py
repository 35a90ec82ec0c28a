"""The few exceptions that carry what a client must be told; one middleware turns them into responses.

Every error body is `error_body`'s: Jina's `{"detail", "code"}` (plus `errors` on 422) and OpenAI's
`{"error": {"message", "type", "code", "param"}}` side by side, so each client library finds its reason.
"""

from __future__ import annotations

from typing import Any

# OpenAI's error `type` for each status (what its SDKs and LiteLLM read); 5xx are "server_error".
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(status: int, detail: str, code: str, *, param: str | None = None) -> dict[str, Any]:
    """The one error body shape: Jina's fields and OpenAI's `error` object, with the same reason."""
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"detail": detail, "code": code, "error": {"message": detail, "type": kind, "code": code, "param": param}}


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
        return error_body(self.status, self.detail, self.code)


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
        body = error_body(self.status, self.detail, self.code, param=self.field)
        body["errors"] = [{"field": self.field, "message": self.message}]
        return body


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
    """The upstream refused the request (4xx other than 429): its status and body are passed through, with the
    fields of `error_body` that it lacks (OpenAI's `error` for a Jina upstream, `detail`/`code` for an OpenAI one)."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        error = body.get("error")
        reason = error.get("message") if isinstance(error, dict) else error
        detail = str(body.get("detail") or reason or f"upstream answered {status}")
        super().__init__(detail, status=status, code=str(body.get("code") or "UPSTREAM_REJECTED"))
        self.upstream_body = body
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        body = {**error_body(self.status, self.detail, self.code), **self.upstream_body}
        if not isinstance(body["error"], dict):  # an upstream's own `error` that is not OpenAI's object
            body["error"] = error_body(self.status, self.detail, self.code)["error"]
        return body


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
