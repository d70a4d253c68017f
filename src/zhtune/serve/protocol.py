"""OpenAI wire format for `zhtune serve`: request models (pydantic), error shape, response builders.

Used by zhtune.serve.api; field names and defaults follow OpenAI's API so its clients work as is.
Range checks of sampling values live in GenParams.validate (one place); here only types and the
bounds that protect the server (n, number of prompts, seed width).
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from zhtune.infer.engine import MAX_TOP_LOGPROBS, TokenLogprob

MAX_CHOICES = 64       # prompts x n in one request; more is a 400 (queue it as several requests)
INT64 = 2**63 - 1
MAX_EMBED_INPUTS = 2048  # texts in one /v1/embeddings request (OpenAI's limit)


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             503: "server_overloaded", 500: "internal_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "internal_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --- errors (for the OpenAPI schema) ------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in [
        (400, "invalid JSON, field, parameter out of range, or prompt longer than the context"),
        (401, "missing or wrong API key (when the server has one)"),
        (404, "unknown model"),
        (413, "request body larger than --max-body-bytes"),
        (503, "too many requests queued (more than --max-concurrency + --max-queue generations)"),
        (500, "the server failed (never a client's mistake)"),
    ]
}


# --- requests --------------------------------------------------------------------------------
def _unicode(value: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"): Python keeps it, and every tokenizer and the UTF-8
    encoder of the reply then fail. It is not text: refuse it here, where the field has a name."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone surrogate (U+{ord(value[exc.start]):04X} at character {exc.start}), "
                         "which is not valid Unicode text") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]   # every string a client sends


class _Request(BaseModel):
    # unknown fields are ignored (OpenAI's clients send newer ones); known unsupported ones are a 400
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, list[TextPart]]   # null content (tool calls) is not supported here
    name: Optional[Text] = None


class StreamOptions(_Request):
    include_usage: bool = False


class Sampling(_Request):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: Text
    max_tokens: Optional[int] = Field(None, description="tokens to generate; default: the rest of the context")
    temperature: Optional[float] = Field(None, description="0 = greedy; default 0.7")
    top_p: Optional[float] = None
    top_k: Optional[int] = Field(None, description="0 or -1 disables")
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[Text, list[Text], None] = None
    seed: Optional[int] = Field(None, ge=-INT64 - 1, le=INT64)
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    stop_token_ids: Optional[list[int]] = Field(None, max_length=64)
    user: Optional[Text] = None
    # accepted in the schema so the answer is a clear 400, not a silent ignore
    logit_bias: Optional[dict[str, float]] = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = Field(None, description="return each generated token's log-probability")
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                        description="with logprobs: the most likely alternatives per token")
    tools: Optional[list[Any]] = None
    tool_choice: Union[Text, dict, None] = None
    functions: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None


class CompletionRequest(Sampling):
    # text, texts, token ids, or lists of token ids (what lm-evaluation-harness sends)
    prompt: Union[Text, list[Text], list[int], list[list[int]]]
    echo: bool = Field(False, description="the prompt first in each choice (with logprobs: its tokens' log-probs)")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                    description="per token: its log-prob and this many most likely alternatives")
    suffix: Optional[Text] = None
    best_of: Optional[int] = None


class EmbeddingRequest(_Request):
    model: Text
    input: Union[Text, list[Text]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[Text] = None


# --- responses -------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def embedding_item(index: int, vector: list[float], encoding: str) -> dict:
    if encoding == "base64":  # what the openai client asks for by default: little-endian float32
        data: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    else:
        data = vector
    return {"object": "embedding", "index": index, "embedding": data}


def chat_logprobs(items: list[TokenLogprob], token_bytes) -> dict:
    """OpenAI chat's choice.logprobs: {"content": [{token, logprob, bytes, top_logprobs}], "refusal"}."""
    raw = _bytes_of([i for t in items for i in (t.id, *(alt for alt, _ in t.top))], token_bytes)

    def entry(token: int, logprob: float) -> dict:
        return {"token": raw[token].decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw[token])}

    return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]} for t in items],
            "refusal": None}


def legacy_logprobs(ids: list[int], items: list[TokenLogprob | None], token_bytes, offset: int = 0) -> dict:
    """/v1/completions' choice.logprobs: tokens, token_logprobs, top_logprobs (token -> log-prob) and
    text_offset (each token's first character in the concatenation of the tokens' text, from `offset`).
    ids[i] is the token; items[i] its log-probs (None for a prompt's first token)."""
    raw = _bytes_of([*ids, *(i for t in items if t for i, _ in t.top)], token_bytes)
    tokens = [raw[i].decode("utf-8", "replace") for i in ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [t.logprob if t else None for t in items],
            "top_logprobs": [{raw[i].decode("utf-8", "replace"): v for i, v in t.top} if t else None for t in items],
            "text_offset": offsets}


def join_legacy(a: dict | None, b: dict) -> dict:
    return b if a is None else {k: a[k] + b[k] for k in b}


def _bytes_of(ids: list[int], token_bytes) -> dict[int, bytes]:
    unique = list(dict.fromkeys(ids))
    return dict(zip(unique, token_bytes(unique)))
