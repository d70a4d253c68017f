"""HTTP plumbing of `zhtune serve` (zhtune.serve.api): the API-key and body-size guard that runs before
anything parses a body, and the handlers that answer every client mistake with OpenAI's error JSON (4xx)."""

from __future__ import annotations

import hmac
import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import PromptTooLong
from zhtune.serve.protocol import APIError

# GenParams field -> the request field a client sent (for error "param")
_PARAM_NAMES = {"max_new_tokens": "max_tokens"}


# --- request guard: API key and body size, before anything parses the body ------------------
class Guard:
    """ASGI middleware: 401 without the right Bearer key on /v1/*, 413 past max_body_bytes.

    The body is read here (bounded) and replayed to the app, so an oversized or endless body is
    refused without being parsed or held whole in memory.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"].startswith("/v1"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                missing = "authorization" not in headers
                return await _error_response(APIError(
                    401, "missing API key: send the header 'Authorization: Bearer KEY'" if missing
                    else "incorrect API key", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"}))(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _too_large(int(length), self.max_body_bytes)(scope, receive, send)
        body, more, size = [], True, 0
        while more:
            message = await receive()
            if message["type"] != "http.request":  # disconnected while sending the body
                return
            body.append(message.get("body", b""))
            size += len(body[-1])
            if size > self.max_body_bytes:
                return await _too_large(size, self.max_body_bytes)(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()  # afterwards: http.disconnect, watched while streaming

        return await self.app(scope, replay, send)


def _too_large(size: int, limit: int) -> JSONResponse:
    return _error_response(APIError(413, f"request body is {size}+ bytes; this server accepts at most {limit} "
                                         "(--max-body-bytes)", code="request_too_large"))


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# --- error handlers: everything a client can get wrong is a 4xx in OpenAI's shape ------------------
def _field_path(loc) -> str:
    """pydantic's loc as a dotted field path, without "body" and the union-member tags it inserts
    ("messages.0.content.str" -> "messages.0.content")."""
    parts = []
    for p in loc:
        if p == "body":
            continue
        if isinstance(p, str) and (p in ("str", "int", "float", "bool") or "[" in p):
            break
        parts.append(str(p))
    return ".".join(parts)


def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = _field_path(first.get("loc", ())) or None
    if first.get("type") == "json_invalid":
        param = None  # its loc is a character offset, not a field
        message = f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    else:
        message = "; ".join(f"{_field_path(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errors[:5])
    return _error_response(APIError(400, message or "invalid request", param=param, code="invalid_request"))


def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


def as_api_error(exc: BaseException) -> APIError:
    """Our errors and the engine's ZhtuneErrors as APIErrors; anything else is the server's fault."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PromptTooLong):
        return APIError(400, f"This model's maximum context length is {exc.max_model_len} tokens; "
                             f"your prompt has {exc.prompt_tokens} tokens. Shorten the messages or the prompt.",
                        param="messages", code="context_length_exceeded")
    if isinstance(exc, ZhtuneError):
        # "messages[1]" (the template's spelling) -> "messages.1" (pydantic's, used elsewhere)
        param = re.sub(r"\[(\d+)\]", r".\1", _PARAM_NAMES.get(exc.where or "", exc.where or "")) or None
        return APIError(400, str(exc), param=param, code="invalid_value")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


def any_error(_request: Request, exc: Exception) -> JSONResponse:
    return _error_response(as_api_error(exc))
