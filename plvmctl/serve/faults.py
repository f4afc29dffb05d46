"""OpenAI-style error objects: `{"error": {"message", "type", "param", "code"}}` with a status.

Every refusal the server makes is an ApiError with one readable message; anything else that
escapes a route is logged with its traceback on the server and answered with a plain 500
(the client never sees a traceback).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def __post_init__(self):
        super().__init__(self.message)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def too_large(message: str, param: str | None = None) -> ApiError:
    return ApiError(413, message, param=param, code="too_large")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, type="authentication_error", code="invalid_api_key")


def not_found(message: str, code: str = "not_found") -> ApiError:
    return ApiError(404, message, code=code)


def conflict(message: str, code: str = "conflict") -> ApiError:
    return ApiError(409, message, code=code)


def internal(message: str = "the server failed on this request; see its log") -> ApiError:
    return ApiError(500, message, type="server_error", code="internal_error")
