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
import os
import re

from zhtune import __version__
from zhtune.errors import ZhtuneError

try:
    import anyio
    from fastapi import APIRouter, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from sse_starlette.sse import EventSourceResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # the serve extra is optional
    raise ZhtuneError(f"zhtune serve needs the serve extra ({exc.name} is missing)",
                      hint="pip install 'zhtune[serve]'") from None
from zhtune.infer.engine import Delta, Engine, is_token_ids
from zhtune.serve.http import Guard, any_error, as_api_error, http_error, validation_error
from zhtune.serve.jobs import (budget, check_model, check_token_prompts, check_unsupported, echo_text, gen_params,
                               refuse, seeded, to_messages, token_ids)
from zhtune.serve.protocol import (ERROR_RESPONSES, MAX_CHOICES, MAX_EMBED_INPUTS, APIError, ChatRequest,
                                   CompletionRequest, EmbeddingRequest, embedding_item, legacy_logprobs, new_id, now,
                                   usage)
from zhtune.serve.reply import Reply, answer, sse
from zhtune.serve.runner import Runner

DEFAULT_MAX_BODY = 2 * 1024 * 1024

# 200 is JSON, or an SSE stream of JSON chunks ending with `data: [DONE]` when "stream": true
STREAM_RESPONSES = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                          "description": "a completion, or with stream=true an SSE stream"}, **ERROR_RESPONSES}


# --- the routes ------------------------------------------------------------------------------
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
    check_model(model, srv.served)
    return _model_card(srv)


def _model_card(srv: Server) -> dict:
    return {"id": srv.served, "object": "model", "created": srv.created, "owned_by": "zhtune",
            "max_model_len": srv.context or None}


@router.post("/v1/chat/completions", responses=STREAM_RESPONSES)
async def chat_completions(req: ChatRequest, request: Request):
    srv = _server(request)
    check_model(req.model, srv.served)
    check_unsupported(req)
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
    check_model(req.model, srv.served)
    check_unsupported(req)
    single = isinstance(req.prompt, str) or is_token_ids(req.prompt)
    prompts = [req.prompt] if single else list(req.prompt)
    if not prompts:
        raise APIError(400, "prompt is an empty list", param="prompt", code="invalid_value")
    if len(prompts) * req.n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={req.n} is more than {MAX_CHOICES} completions in one "
                            "request", param="n", code="invalid_value")
    check_token_prompts(srv.engine, prompts, single)
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
    echo = [echo_text(srv.engine, p) for p in prompts for _ in range(req.n)] if req.echo else None
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


async def _prompt_logprobs(srv: Server, prompts: list, top_k: int) -> list[dict]:
    """Each prompt's tokens with their log-probs (the first has none), in the legacy format."""
    engine = srv.engine
    ids = [token_ids(engine, p) for p in prompts]
    scored = await srv.runner.call(lambda: engine.score(ids, prompt=True, top_k=top_k))
    return [legacy_logprobs(i, s.tokens, engine.token_bytes) for i, s in zip(ids, scored)]


async def _score_and_complete(srv: Server, reply: Reply, top_k: int) -> dict | None:
    """echo + logprobs + max_tokens 1 (lm-evaluation-harness's log-likelihood request): the prompt's log-probs
    and its one generated token from the same forward, where the engine can (Engine.score_and_complete), instead
    of a scoring pass and then a generation. None: the engine cannot; score, then generate."""
    engine = srv.engine
    jobs = [(token_ids(engine, prompt), params) for prompt, params in reply.jobs]
    done = await srv.runner.call(engine.score_and_complete, jobs, top_k)
    if done is None:
        return None
    reply.prompt_logprobs = [legacy_logprobs(ids, scored.tokens, engine.token_bytes)
                             for (ids, _), (scored, _) in zip(jobs, done)]
    return answer(reply, [deltas for _, deltas in done])


async def _score_only(srv: Server, req: CompletionRequest, prompts: list, counts: list[int]) -> dict:
    for p, count in enumerate(counts):
        if srv.context and count > srv.context:
            raise APIError(400, f"This model's maximum context length is {srv.context} tokens; prompt {p} has "
                                f"{count}.", param="prompt", code="context_length_exceeded")
    scored = await _prompt_logprobs(srv, prompts, req.logprobs)
    choices = [{"index": i, "text": echo_text(srv.engine, prompts[i // req.n]), "logprobs": scored[i // req.n],
                "finish_reason": "length"} for i in range(len(prompts) * req.n)]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": req.model,
            "choices": choices, "usage": usage(sum(counts) * req.n, 0)}


@router.post("/v1/embeddings", responses=ERROR_RESPONSES)
async def embeddings(req: EmbeddingRequest, request: Request) -> dict:
    srv = _server(request)
    check_model(req.model, srv.served)
    if req.dimensions is not None:
        refuse("dimensions", "choosing the embedding size")
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


# --- answering: whole or streamed, cancelled if the client leaves ---------------------------------
async def _complete(srv: Server, request: Request, reply: Reply) -> dict:
    deltas: list[list[Delta]] = [[] for _ in reply.jobs]

    async def consume() -> None:
        async for i, delta in srv.runner.stream(reply.jobs):
            deltas[i].append(delta)

    await _unless_disconnected(request, consume())
    return answer(reply, deltas)


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
    return EventSourceResponse(sse(reply, events, first, include_usage), sep="\n", ping=15)


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
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for kind in (APIError, ZhtuneError, Exception):
        app.add_exception_handler(kind, any_error)
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
