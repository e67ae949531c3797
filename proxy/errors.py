"""The one exception tree of thrifty, and its mapping to OpenAI's error JSON.

Every stage of the pipeline raises a subclass of :class:`ThriftyError`; the error
middleware (``proxy.api.middleware``) is the only place that turns one into an HTTP
response, always in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
Configuration problems raise :class:`ConfigError`, which never reaches HTTP: the CLI
prints it as one line and exits with code 2.

    ThriftyError
    ├── BadRequest              400 invalid_request_error
    │   └── UnsupportedRequest  400 (the target cannot do what was asked)
    ├── AuthenticationFailed    401 invalid_api_key
    ├── PermissionDenied        403 (a key without the role an endpoint needs)
    ├── NotFound                404 (no such route)
    │   └── ModelNotFound       404 model_not_found
    ├── MethodNotAllowed        405
    ├── PayloadTooLarge         413 request_too_large
    ├── BudgetExceeded          429 budget_exceeded (a hard budget would be crossed)
    ├── RateLimited             429 rate_limit_exceeded (type requests or tokens; Retry-After)
    ├── UpstreamError           the upstream's own status and message, passed on
    ├── UpstreamUnavailable     502 (connection refused, reset, bad reply)
    ├── UpstreamTimeout         504
    └── NotReady                503 (a store the proxy needs cannot be reached)
    ConfigError                 (start-up only: names the key and the line)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class ThriftyError(Exception):
    """A failure that a client sees; subclasses fix the status, type, code and extra headers."""

    status = 500
    type = "server_error"
    code: str | None = None
    headers: ClassVar[Mapping[str, str]] = {}

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def add_headers(self, extra: Mapping[str, str]) -> None:
        """Headers for this response only (the class's stay as they are): a refusal's Retry-After, or
        the rate-limit headers every response of a limited caller carries."""
        vars(self)["headers"] = {**self.headers, **extra}


class BadRequest(ThriftyError):
    status = 400
    type = "invalid_request_error"


class UnsupportedRequest(BadRequest):
    code = "unsupported_request"


class AuthenticationFailed(ThriftyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(ThriftyError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(ThriftyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ThriftyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(ThriftyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class BudgetExceeded(ThriftyError):
    """A hard budget of the caller's key, team or app would be crossed: no upstream call was made."""

    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"
    # The OpenAI SDKs retry a 429 unless told not to: a spent budget does not come back in seconds.
    headers: ClassVar[Mapping[str, str]] = {"x-should-retry": "false"}


class RateLimited(ThriftyError):
    """A rate limit (requests or tokens a minute) of the caller's key, team or app is reached: no upstream
    call was made. OpenAI's shape: type ``requests`` or ``tokens``, with Retry-After and x-ratelimit-*."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, kind: str, headers: Mapping[str, str]):
        super().__init__(message)
        self.type = kind
        self.add_headers(headers)


class UpstreamError(ThriftyError):
    """An error the upstream returned: its status, message, type and code are kept."""

    type = "upstream_error"

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message, param=param, code=code)
        self.status = status
        if type:
            self.type = type


class UpstreamUnavailable(ThriftyError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamTimeout(ThriftyError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class NotReady(ThriftyError):
    status = 503
    type = "server_error"
    code = "not_ready"


class ConfigError(Exception):
    """A bad configuration: the message names the key, and the file and line when known."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None):
        where = ""
        if source and line:
            where = f"{source}:{line}: "
        elif source:
            where = f"{source}: "
        super().__init__(where + message)
        self.source = source
        self.line = line
