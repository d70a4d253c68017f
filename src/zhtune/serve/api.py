"""`zhtune serve`: an OpenAI-compatible API (FastAPI + uvicorn, SSE streaming) over the one engine.

    zhtune serve --model out/merged --port 8000 --api-key sk-local
    curl http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer sk-local" \
         -d '{"model": "merged", "messages": [{"role": "user", "content": "你好"}]}'

Tests and the demo build the app directly: `create_app(engine, api_key=..., max_concurrency=...)`.
Every client mistake is answered 4xx with OpenAI's error JSON; generation runs in worker threads
(zhtune.serve.runner) so the event loop never blocks; a client that leaves cancels its generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import re
from dataclasses import dataclass, replace

from zhtune import __version__
from zhtune.errors import ZhtuneError

try:
    import anyio
    from fastapi import APIRouter, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from sse_starlette.sse import EventSourceResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # the serve extra is optional
    raise ZhtuneError(f"zhtune serve needs the serve extra ({exc.name} is missing)",
                      hint="pip install 'zhtune[serve]'") from None
from zhtune.infer.engine import Delta, Engine, GenParams, PromptTooLong, is_token_ids
from zhtune.infer.options import gen_defaults
from zhtune.serve.protocol import (ERROR_RESPONSES, MAX_CHOICES, MAX_EMBED_INPUTS, APIError, ChatRequest,
                                   CompletionRequest, EmbeddingRequest, chat_logprobs, embedding_item, join_legacy,
                                   legacy_logprobs, new_id, now, usage)
from zhtune.serve.runner import Runner

DEFAULT_MAX_BODY = 2 * 1024 * 1024
# GenParams field -> the request field a client sent (for error "param")
_PARAM_NAMES = {"max_new_tokens": "max_tokens"}


# 200 is JSON, or an SSE stream of JSON chunks ending with `data: [DONE]` when "stream": true
STREAM_RESPONSES = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                          "description": "a completion, or with stream=true an SSE stream"}, **ERROR_RESPONSES}


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


def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = _field_path(first.get("loc", ())) or None
    if first.get("type") == "json_invalid":
        param = None  # its loc is a character offset, not a field
        message = f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    else:
        message = "; ".join(f"{_field_path(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errors[:5])
    return _error_response(APIError(400, message or "invalid request", param=param, code="invalid_request"))


def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
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


def _any_error(_request: Request, exc: Exception) -> JSONResponse:
    return _error_response(as_api_error(exc))


# --- turning a request into engine jobs ------------------------------------------------------
def _check_model(name: str, served: str) -> None:
    if name != served:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{served}' (GET /v1/models)",
                       param="model", code="model_not_found")


def _refuse(param: str, feature: str) -> None:
    raise APIError(400, f"{param}: {feature} is not supported by this server", param=param, code="unsupported")


def _check_unsupported(req) -> None:
    if req.logit_bias:
        _refuse("logit_bias", "logit bias")
    if isinstance(req, ChatRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        if req.tools or req.functions or req.tool_choice not in (None, "none", "auto"):
            _refuse("tools", "tool / function calling")
        if req.response_format and req.response_format.get("type", "text") != "text":
            _refuse("response_format", "a response_format other than text")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            _refuse("suffix", "suffix (fill-in-the-middle)")
        if req.best_of not in (None, 1):
            _refuse("best_of", "best_of > 1")


def to_messages(messages) -> list[dict]:
    """OpenAI messages -> the template's {role, content} list (text parts joined, leading systems merged)."""
    out: list[dict] = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        content = m.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        if content is None:
            raise APIError(400, f"messages[{i}] has no content", param=f"messages.{i}.content",
                           code="invalid_value")
        if role == "system" and out and out[-1]["role"] == "system" and len(out) == 1:
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + content}
            continue
        if role == "system" and out:
            raise APIError(400, f"messages[{i}]: a system message may only come first", param=f"messages.{i}.role",
                           code="invalid_value")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in out):
        raise APIError(400, "messages hold no user message: nothing to answer", param="messages",
                       code="invalid_value")
    return out


def gen_params(req, max_tokens: int) -> GenParams:
    """The request's sampling fields over serve's generation defaults; out of range -> 400 naming the field."""
    params = gen_defaults("serve")
    params.max_new_tokens = max_tokens
    for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "seed"):
        value = getattr(req, name)
        if value is not None:
            setattr(params, name, value)
    if req.top_k is not None:
        params.top_k = 0 if req.top_k == -1 else req.top_k  # vLLM spells "disabled" -1
    if req.stop is not None:
        params.stop = [s for s in ([req.stop] if isinstance(req.stop, str) else req.stop) if s]
    if req.stop_token_ids:
        params.stop_token_ids = list(req.stop_token_ids)
    if isinstance(req, ChatRequest) and req.logprobs:
        params.logprobs = req.top_logprobs or 0
    elif isinstance(req, CompletionRequest) and req.logprobs is not None:
        params.logprobs = req.logprobs
    try:
        return params.validate()
    except ZhtuneError as exc:
        raise as_api_error(exc) from None


def budget(prompt_tokens: int, requested: int | None, context: int, prompt_param: str) -> int:
    """max_new_tokens for a prompt: the request's, checked against the context, or the rest of it."""
    if not context:
        return requested if requested is not None else gen_defaults("serve").max_new_tokens
    if prompt_tokens >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens; your prompt has "
                            f"{prompt_tokens} tokens. Shorten it.", param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return context - prompt_tokens
    if requested >= 1 and prompt_tokens + requested > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for the "
                            "completion). Reduce the prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")
    return requested


def seeded(params: GenParams, i: int) -> GenParams:
    """Choice i of n: a different seed per choice, so n samples differ yet repeat with the same seed."""
    return params if params.seed is None or i == 0 else replace(params, seed=(params.seed + i) % 2**63)


# --- the app ---------------------------------------------------------------------------------
class Server:
    """What the routes share: the engine, the runner (threads + limits), names and context length."""

    def __init__(self, engine: Engine, served_model_name: str, max_concurrency: int, max_queue: int,
                 max_model_len: int | None):
        self.engine = engine
        self.served = served_model_name
        self.runner = Runner(engine, max_concurrency, max_queue)
        # --max-model-len can only shorten the engine's context, not stretch it
        self.context = min([n for n in (max_model_len, getattr(engine, "max_model_len", 0)) if n] or [0])
        # formatting + counting a long prompt takes a while: off the loop, one at a time
        self.prep_limiter = anyio.CapacityLimiter(1)
        self.created = now()

    async def count_tokens(self, prompts: list) -> list[int]:
        """Tokens of each prompt as the template renders it (a 400 if the template refuses it)."""
        def count() -> list[int]:
            return [len(p) if is_token_ids(p) else self.engine.count_tokens(self.engine.format(p)) for p in prompts]

        try:
            return await anyio.to_thread.run_sync(count, limiter=self.prep_limiter)
        except ZhtuneError as exc:
            raise as_api_error(exc) from None


router = APIRouter()


def _server(request: Request) -> Server:
    return request.app.state.server


@router.get("/health")
async def health(request: Request) -> dict:
    srv = _server(request)
    return {"status": "ok", "model": srv.served, "backend": getattr(srv.engine, "backend", ""),
            **srv.runner.stats()}


@router.get("/v1/models", responses=ERROR_RESPONSES)
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(_server(request))]}


@router.get("/v1/models/{model}", responses=ERROR_RESPONSES)
async def get_model(model: str, request: Request) -> dict:
    srv = _server(request)
    _check_model(model, srv.served)
    return _model_card(srv)


def _model_card(srv: Server) -> dict:
    return {"id": srv.served, "object": "model", "created": srv.created, "owned_by": "zhtune",
            "max_model_len": srv.context or None}


@router.post("/v1/chat/completions", responses=STREAM_RESPONSES)
async def chat_completions(req: ChatRequest, request: Request):
    srv = _server(request)
    _check_model(req.model, srv.served)
    _check_unsupported(req)
    messages = to_messages(req.messages)
    try:
        [prompt_tokens] = await srv.count_tokens([messages])
    except APIError as err:  # the template numbers turns after the system message(s)
        shift = next((i for i, m in enumerate(req.messages) if m.role not in ("system", "developer")), 0)
        hit = re.fullmatch(r"messages\.(\d+)", err.param or "")
        if hit and shift:
            err.param = f"messages.{int(hit.group(1)) + shift}"
        raise
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = gen_params(req, budget(prompt_tokens, requested, srv.context, "messages"))
    reply = Reply(chat=True, head={"id": new_id("chatcmpl"), "created": now(), "model": req.model},
                  jobs=[(messages, seeded(params, i)) for i in range(req.n)], prompt_tokens=[prompt_tokens],
                  token_bytes=srv.engine.token_bytes)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await _streaming(srv, request, reply, include_usage)
    return await _complete(srv, request, reply)


@router.post("/v1/completions", responses=STREAM_RESPONSES)
async def completions(req: CompletionRequest, request: Request):
    srv = _server(request)
    _check_model(req.model, srv.served)
    _check_unsupported(req)
    single = isinstance(req.prompt, str) or is_token_ids(req.prompt)
    prompts = [req.prompt] if single else list(req.prompt)
    if not prompts:
        raise APIError(400, "prompt is an empty list", param="prompt", code="invalid_value")
    if len(prompts) * req.n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={req.n} is more than {MAX_CHOICES} completions in one "
                            "request", param="n", code="invalid_value")
    _check_token_prompts(srv.engine, prompts, single)
    counts = await srv.count_tokens(prompts)
    if req.echo and req.max_tokens == 0:   # OpenAI's way to only score a prompt: nothing is generated
        if req.stream or req.logprobs is None:
            raise APIError(400, "max_tokens 0 scores the prompt: it needs echo, logprobs and no stream",
                           param="max_tokens", code="invalid_value")
        return await _score_only(srv, req, prompts, counts)
    jobs = []
    for p, (prompt, count) in enumerate(zip(prompts, counts)):
        param = "prompt" if single else f"prompt.{p}"
        params = gen_params(req, budget(count, req.max_tokens, srv.context, param))
        jobs += [(prompt, seeded(params, i)) for i in range(req.n)]
    echo = [_echo_text(srv.engine, p) for p in prompts for _ in range(req.n)] if req.echo else None
    reply = Reply(chat=False, head={"id": new_id("cmpl"), "created": now(), "model": req.model}, jobs=jobs,
                  prompt_tokens=counts, echo=echo, token_bytes=srv.engine.token_bytes)
    if req.echo and req.logprobs is not None and req.max_tokens == 1 and not req.stream:
        done = await _score_and_complete(srv, reply, req.logprobs)
        if done is not None:
            return done
    if req.echo and req.logprobs is not None:
        scored = await _prompt_logprobs(srv, prompts, req.logprobs)
        reply.prompt_logprobs = [s for s in scored for _ in range(req.n)]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await _streaming(srv, request, reply, include_usage)
    return await _complete(srv, request, reply)


def _check_token_prompts(engine: Engine, prompts: list, single: bool) -> None:
    """Token-id prompts: non-empty, every id in the vocabulary (a 400 naming prompt.N)."""
    for p, prompt in enumerate(prompts):
        param = "prompt" if single else f"prompt.{p}"
        if isinstance(prompt, list) and not prompt:
            raise APIError(400, f"{param} is an empty list of token ids", param=param, code="invalid_value")
        if is_token_ids(prompt):
            try:
                engine.check_ids(prompt)
            except ZhtuneError as exc:
                raise APIError(400, f"{param}: {exc.what}", param=param, code="invalid_value") from None


def _echo_text(engine: Engine, prompt) -> str:
    """What echo puts first in a choice: the prompt's text (token ids: their text, joined)."""
    if not is_token_ids(prompt):
        return prompt
    return b"".join(engine.token_bytes(prompt)).decode("utf-8", "replace")


def _prompt_ids(engine: Engine, prompt) -> list[int]:
    return list(prompt) if is_token_ids(prompt) else engine.encode(prompt, bos=True)


async def _prompt_logprobs(srv: Server, prompts: list, top_k: int) -> list[dict]:
    """Each prompt's tokens with their log-probs (the first has none), in the legacy format."""
    engine = srv.engine
    ids = [_prompt_ids(engine, p) for p in prompts]
    scored = await srv.runner.call(lambda: engine.score(ids, prompt=True, top_k=top_k))
    return [legacy_logprobs(i, s.tokens, engine.token_bytes) for i, s in zip(ids, scored)]


async def _score_and_complete(srv: Server, reply: "Reply", top_k: int) -> dict | None:
    """echo + logprobs + max_tokens 1 (lm-evaluation-harness's log-likelihood request): the prompt's log-probs
    and its one generated token from the same forward, where the engine can (Engine.score_and_complete), instead
    of a scoring pass and then a generation. None: the engine cannot; score, then generate."""
    engine = srv.engine
    jobs = [(_prompt_ids(engine, prompt), params) for prompt, params in reply.jobs]
    done = await srv.runner.call(engine.score_and_complete, jobs, top_k)
    if done is None:
        return None
    reply.prompt_logprobs = [legacy_logprobs(ids, scored.tokens, engine.token_bytes)
                             for (ids, _), (scored, _) in zip(jobs, done)]
    return _answer(reply, [deltas for _, deltas in done])


async def _score_only(srv: Server, req: CompletionRequest, prompts: list, counts: list[int]) -> dict:
    for p, count in enumerate(counts):
        if srv.context and count > srv.context:
            raise APIError(400, f"This model's maximum context length is {srv.context} tokens; prompt {p} has "
                                f"{count}.", param="prompt", code="context_length_exceeded")
    scored = await _prompt_logprobs(srv, prompts, req.logprobs)
    choices = [{"index": i, "text": _echo_text(srv.engine, prompts[i // req.n]), "logprobs": scored[i // req.n],
                "finish_reason": "length"} for i in range(len(prompts) * req.n)]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": req.model,
            "choices": choices, "usage": usage(sum(counts) * req.n, 0)}


@router.post("/v1/embeddings", responses=ERROR_RESPONSES)
async def embeddings(req: EmbeddingRequest, request: Request) -> dict:
    srv = _server(request)
    _check_model(req.model, srv.served)
    if req.dimensions is not None:
        _refuse("dimensions", "choosing the embedding size")
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    if not texts or len(texts) > MAX_EMBED_INPUTS:
        raise APIError(400, f"input has {len(texts)} texts", param="input", code="invalid_value")
    for i, text in enumerate(texts):
        if not text:
            raise APIError(400, f"input[{i}] is empty", param="input" if len(texts) == 1 else f"input.{i}",
                           code="invalid_value")
    counts = await srv.count_tokens(texts)
    for i, count in enumerate(counts):
        if srv.context and count > srv.context:
            raise APIError(400, f"This model's maximum context length is {srv.context} tokens; input[{i}] has "
                                f"{count} tokens. Shorten it.", param="input", code="context_length_exceeded")
    vectors = await srv.runner.call(srv.engine.embed, texts)
    return {"object": "list", "model": req.model,
            "data": [embedding_item(i, v, req.encoding_format) for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}}


# --- answers -----------------------------------------------------------------------------------
@dataclass
class Reply:
    """One request's generations: job i is choice i; prompt_tokens per distinct prompt."""

    chat: bool
    head: dict
    jobs: list
    prompt_tokens: list[int]
    echo: list[str] | None = None
    token_bytes: object = None                 # Engine.token_bytes, for log-prob tokens' text
    prompt_logprobs: list[dict] | None = None  # per job: the echoed prompt's tokens (legacy format)

    def choice(self, i: int, text: str, finish: str | None, whole: bool, logprobs: list | None = None,
               offset: int = 0, with_prompt: bool = False) -> dict:
        """Choice i; `logprobs`: the TokenLogprobs of its text (None: the request asked for none);
        `offset`: where that text starts in the choice's text; with_prompt: the echoed prompt's first."""
        if self.chat:
            body = {"message": {"role": "assistant", "content": text}} if whole else \
                {"delta": {"content": text} if text else {}}
            lp = chat_logprobs(logprobs, self.token_bytes) if logprobs is not None else None
            return {"index": i, **body, "logprobs": lp, "finish_reason": finish}
        lp = None
        if logprobs is not None:
            lp = legacy_logprobs([t.id for t in logprobs], logprobs, self.token_bytes, offset)
        if with_prompt and self.prompt_logprobs:
            lp = join_legacy(self.prompt_logprobs[i], lp or legacy_logprobs([], [], self.token_bytes))
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}

    def wants_logprobs(self, i: int) -> bool:
        return self.jobs[i][1].logprobs is not None

    def usage(self, finals: dict) -> dict:
        # the engine's own counts where it gave them (its last delta), ours otherwise
        per_prompt = len(self.jobs) // len(self.prompt_tokens)
        prompt = sum(finals[i * per_prompt].prompt_tokens if i * per_prompt in finals
                     and finals[i * per_prompt].prompt_tokens else n for i, n in enumerate(self.prompt_tokens))
        return usage(prompt, sum(d.completion_tokens for d in finals.values()))


async def _complete(srv: Server, request: Request, reply: Reply) -> dict:
    deltas: list[list[Delta]] = [[] for _ in reply.jobs]

    async def consume() -> None:
        async for i, delta in srv.runner.stream(reply.jobs):
            deltas[i].append(delta)

    await _unless_disconnected(request, consume())
    return _answer(reply, deltas)


def _answer(reply: Reply, deltas: list[list[Delta]]) -> dict:
    """The whole (non-streamed) answer from each job's deltas."""
    texts = list(reply.echo) if reply.echo else [""] * len(reply.jobs)
    finals: dict[int, Delta] = {}
    logprobs: list[list] = [[] for _ in reply.jobs]
    for i, job in enumerate(deltas):
        for delta in job:
            texts[i] += delta.text
            logprobs[i] += delta.logprobs
            if delta.finish_reason:
                finals[i] = delta
    start = [len(e) for e in reply.echo] if reply.echo else [0] * len(reply.jobs)
    choices = [reply.choice(i, texts[i], finals[i].finish_reason if i in finals else "stop", whole=True,
                            logprobs=logprobs[i] if reply.wants_logprobs(i) else None, offset=start[i],
                            with_prompt=True)
               for i in range(len(reply.jobs))]
    kind = "chat.completion" if reply.chat else "text_completion"
    return {**reply.head, "object": kind, "choices": choices, "usage": reply.usage(finals)}


async def _unless_disconnected(request: Request, work):
    """Await `work`; if the client disconnects first, cancel it (which cancels its generations)."""
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise APIError(499, "client disconnected", code="client_disconnected")
    return task.result()  # or re-raise what the generation raised


async def _streaming(srv: Server, request: Request, reply: Reply, include_usage: bool) -> EventSourceResponse:
    events = srv.runner.stream(reply.jobs)

    async def first_delta():
        try:
            return await events.__anext__()
        except StopAsyncIteration:
            return None

    # wait for the first delta before answering 200, so a refused request (503, prompt too long,
    # a bad parameter the engine found) still gets its proper status and error JSON; a client that
    # leaves while queued cancels here
    first = await _unless_disconnected(request, first_delta())
    return EventSourceResponse(_sse(reply, events, first, include_usage), sep="\n", ping=15)


async def _sse(reply: Reply, events, first, include_usage: bool):
    kind = "chat.completion.chunk" if reply.chat else "text_completion"

    def chunk(choices: list, use: dict | None = None) -> dict:
        body = {**reply.head, "object": kind, "choices": choices}
        if include_usage:
            body["usage"] = use
        return {"data": json.dumps(body, ensure_ascii=False)}

    finals: dict[int, Delta] = {}
    try:
        for i in range(len(reply.jobs)):  # OpenAI's first chunk: the role (chat) or the echoed prompt
            if reply.chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            elif reply.echo:
                yield chunk([reply.choice(i, reply.echo[i], None, whole=False, with_prompt=True)])
        pending = [first] if first else []
        offsets = [len(e) for e in reply.echo] if reply.echo else [0] * len(reply.jobs)
        while True:
            if pending:
                i, delta = pending.pop()
            else:
                try:
                    i, delta = await events.__anext__()
                except StopAsyncIteration:
                    break
            if delta.finish_reason:
                finals[i] = delta
            if delta.text or delta.finish_reason or delta.logprobs:
                lp = delta.logprobs if reply.wants_logprobs(i) else None
                c = reply.choice(i, delta.text, delta.finish_reason, whole=False, logprobs=lp, offset=offsets[i])
                if lp and not reply.chat:   # the next chunk's tokens start where these end
                    offsets[i] += sum(len(t) for t in c["logprobs"]["tokens"])
                yield chunk([c])
        if include_usage:
            yield chunk([], reply.usage(finals))
    except Exception as exc:  # noqa: BLE001 - the engine failed after the 200: say so in-band, then end the stream
        yield {"data": json.dumps(as_api_error(exc).body(), ensure_ascii=False)}
    finally:
        await events.aclose()
    yield {"data": "[DONE]"}


# --- the app ---------------------------------------------------------------------------------
def create_app(engine: Engine, api_key: str | None = None, served_model_name: str | None = None,
               max_concurrency: int = 16, max_body_bytes: int = DEFAULT_MAX_BODY, max_queue: int = 256,
               max_model_len: int | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine` (the caller owns the engine and closes it).

    max_concurrency generations run at once (one worker thread each); up to max_queue more wait;
    past that a request is answered 503 with Retry-After.
    """
    served = served_model_name or getattr(engine, "model_name", "") or "zhtune"
    server = Server(engine, served, max_concurrency, max_queue, max_model_len)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        server.runner.close()

    app = FastAPI(title="zhtune OpenAI-compatible API", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat, completions and embeddings over a zhtune engine.")
    app.state.server = server
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for kind in (APIError, ZhtuneError, Exception):
        app.add_exception_handler(kind, _any_error)
    app.include_router(router)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, plus what only this server knows: the one model id it accepts."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        served = app.state.server.served
        for name in ("ChatRequest", "CompletionRequest", "EmbeddingRequest"):
            model = schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {}).get("model")
            if model is not None:
                model.update({"enum": [served], "description": "the id from GET /v1/models"})
        app.openapi_schema = schema
    return app.openapi_schema


# --- the command -----------------------------------------------------------------------------
_EXAMPLES = """
zhtune serve --model out/merged                                  # http://127.0.0.1:8000/v1
zhtune serve --model out/sft --api-key sk-local --port 8001      # an adapter folder; its base from run.yaml
zhtune serve --model out/model-q4_k_m.gguf --max-concurrency 4   # llama.cpp backend
zhtune serve --model out/merged --print-vllm-command             # vLLM's own OpenAI server, our template
OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=sk-local python your_openai_app.py
"""


def build_parser():
    from zhtune.args import bounded_int, make_parser, parse_size
    from zhtune.infer.options import add_model_args

    p = make_parser("serve", "OpenAI 兼容的 API 服务 (聊天、补全、向量)。\n"
                             "OpenAI-compatible API server: /v1/chat/completions, /v1/completions, "
                             "/v1/embeddings, /v1/models, /health.", _EXAMPLES)
    add_model_args(p, context_help="context cap in tokens (default: the model's; llamacpp: the context of "
                                   "each of the --max-concurrency sequences)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=bounded_int("--port", 1, 65535), default=8000)
    p.add_argument("--api-key", default=os.environ.get("ZHTUNE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $ZHTUNE_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: folder name)")
    p.add_argument("--max-concurrency", type=bounded_int("--max-concurrency", 1, 1 << 30), default=None,
                   help="generations running at once (default: 16; vllm: 256)")
    p.add_argument("--max-queue", type=bounded_int("--max-queue", 0, 1 << 30), default=256,
                   help="generations waiting; past it: 503")
    p.add_argument("--max-body-bytes", type=parse_size, default=DEFAULT_MAX_BODY, help="request size cap (413)")
    p.add_argument("--print-vllm-command", action="store_true",
                   help="write our chat template to a file and print the command for vLLM's own server")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.max_concurrency is None:
        args.max_concurrency = 256 if args.backend == "vllm" else 16
    if args.print_vllm_command:
        from zhtune.serve.vllm_launch import vllm_command

        print(vllm_command(args))
        return 0
    try:
        import uvicorn
    except ImportError:
        raise ZhtuneError("uvicorn is not installed", hint="pip install 'zhtune[serve]'") from None
    from zhtune.infer.options import engine_from_args
    from zhtune.serve.runner import bind_port

    sock = bind_port(args.host, args.port)  # a busy port is named before the model loads, not after
    try:
        engine = engine_from_args(args, concurrency=args.max_concurrency)
    except BaseException:
        sock.close()
        raise
    try:
        app = create_app(engine, api_key=args.api_key, served_model_name=args.served_model_name,
                         max_concurrency=args.max_concurrency, max_body_bytes=args.max_body_bytes,
                         max_queue=args.max_queue, max_model_len=args.context_length)
        served = app.state.server.served
        print(f"zhtune serve: {served} ({engine.backend}) on http://{args.host}:{args.port}/v1 "
              f"— 模型服务已启动 / serving; Ctrl-C 停止 / to stop")
        if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
            print("警告 warning: listening beyond this machine without --api-key; anyone who can reach "
                  f"{args.host}:{args.port} can use the model")
        uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)).run(
            sockets=[sock])
    finally:
        sock.close()
        engine.close()
    return 0
