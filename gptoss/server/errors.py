"""OpenAI-style errors: every failure leaves the server as {"error": {message, type, param, code}}.

Handlers turn malformed JSON, pydantic validation errors, bad sampling values, prompts the
engine cannot hold, unknown routes and unexpected exceptions into that body with the matching
status. Nothing a client sends is meant to reach the 500 handler.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("gptoss.server")


class APIError(Exception):
    """An error answered to the client: HTTP status plus the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


RETRY_AFTER_SECONDS = 1  # a queue slot frees when any request finishes; clients back off from here


def overloaded(limit: int) -> APIError:
    return APIError(429, f"The server is at capacity ({limit} requests running or queued); retry later.",
                    type="rate_limit_error", code="rate_limit_exceeded",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server accepts ({limit // 1024} KiB).",
                    code="request_too_large")


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down and takes no new requests; retry on another instance.",
                    type="server_error", code="server_shutting_down", headers={"Retry-After": "5"})


def invalid_api_key() -> APIError:
    return APIError(401, "Incorrect API key provided.", code="invalid_api_key")


def from_value_error(exc: ValueError, param: str | None = None) -> APIError:
    """SamplingParams, ChatFormatError and RequestError all say what is wrong in their message."""
    if param is None:
        text = str(exc)
        # SamplingParams messages start with "name=value is invalid".
        head = text.split("=", 1)[0]
        if head.isidentifier() and "=" in text:
            param = head
    return bad_request(str(exc), param)


# -- request bodies ----------------------------------------------------------------------------

def parse_body(raw: bytes, model: type[BaseModel], *, strict_fields: bool = True) -> Any:
    """Parse and validate a JSON body strictly (no string-to-number coercion); APIError if bad.

    With strict_fields=False, unknown top-level fields (clients send session_id, request_id, ...)
    are dropped with one logged warning instead of refused, as the reference server and vLLM do."""
    try:
        return model.model_validate_json(raw or b"", strict=True)
    except ValidationError as exc:
        if not strict_fields:
            unknown = [e["loc"][0] for e in exc.errors() if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
            if unknown:
                data = json.loads(raw)  # validated as an object with these keys already
                for name in unknown:
                    data.pop(name, None)
                log.warning("ignored unknown request fields %s (serve --strict-params refuses them)",
                            ", ".join(map(str, unknown)))
                return parse_body(json.dumps(data).encode(), model)  # the other problems, if any, raise here
        raise validation_error(exc, raw) from None


def validation_error(exc: ValidationError, raw: bytes) -> APIError:
    errors = exc.errors(include_url=False)
    if any(err["type"] == "json_invalid" for err in errors):
        detail = next(err["msg"] for err in errors if err["type"] == "json_invalid")
        return APIError(400, f"We could not parse the JSON body of your request ({detail}). "
                             "The body must be a JSON object.", code="invalid_json")
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    err, param = _most_specific(errors, data)
    kind = err["type"]
    if kind == "model_type" and not param:
        return APIError(400, "The request body must be a JSON object.", code="invalid_json")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if kind == "literal_error" and re.fullmatch(r"tools\[\d+\]\.type", param):
        return bad_request(f"Tool type {err.get('input')!r} is not supported: gptoss runs function tools "
                           f"(type 'function') that the client executes; built-in tools such as web_search, "
                           f"code_interpreter, file_search or mcp are not available.", param, "unsupported_tool_type")
    if kind.endswith("_type") or kind in ("literal_error", "union_tag_invalid", "enum"):
        return bad_request(f"Invalid value for '{param}': {err['msg']}.", param, "invalid_type"
                           if kind.endswith("_type") else "invalid_value")
    return bad_request(f"Invalid value for '{param}': {err['msg']}.", param)


def _most_specific(errors: list[dict], data: Any) -> tuple[dict, str]:
    """The error to report: an unknown field first, else the one that reaches deepest into the
    value (of a union's alternatives, the one the value nearly matched), else pydantic's first."""
    first_loc = errors[0]["loc"][:1]
    ranked = []
    for order, err in enumerate(e for e in errors if e["loc"][:1] == first_loc):
        param = _param(err["loc"], data, err["type"])
        depth = param.count(".") + param.count("[")
        ranked.append(((err["type"] != "extra_forbidden", -depth, order), err, param))
    _, err, param = min(ranked, key=lambda item: item[0])
    return err, param


def _param(loc: tuple, data: Any, kind: str) -> str:
    """'messages[0].role' from a pydantic location, dropping the union-member tags pydantic adds."""
    parts: list[str] = []
    for i, key in enumerate(loc):
        if isinstance(data, dict) and isinstance(key, str) and key in data:
            data = data[key]
        elif isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data):
            data = data[key]
        elif not (i == len(loc) - 1 and kind == "missing" and isinstance(data, dict)):
            continue
        parts.append(f"[{key}]" if isinstance(key, int) else (f".{key}" if parts else key))
    return "".join(parts)


# -- handlers ------------------------------------------------------------------------------------

def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return APIError(404, f"Unknown path {request.method} {request.url.path}.", code="not_found").response()
        if exc.status_code == 405:
            return APIError(405, f"Method {request.method} is not allowed on {request.url.path}.",
                            code="method_not_allowed").response()
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error while serving %s %s", request.method, request.url.path)
        return APIError(500, f"The server had an error while processing your request ({type(exc).__name__}).",
                        type="server_error", code="internal_error").response()
