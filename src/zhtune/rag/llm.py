"""The LLM behind `zhtune rag`: the zhtune engine in-process as a LangChain chat model, or any
OpenAI-compatible server (zhtune serve, vLLM) through langchain-openai; plus the context budget.

    llm, budget = open_llm(args)        # args from add_llm_args(parser)
    text = (prompt | llm | StrOutputParser()).invoke({...})
    budget.count(messages)              # prompt tokens: engine.count_tokens exactly, or an estimate over HTTP
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict

from zhtune.errors import ZhtuneError

ROLES = {"system": "system", "human": "user", "ai": "assistant"}
DEFAULT_API_CONTEXT = 4096
MIN_CONTEXT_ROOM = 16  # fewer free tokens than this for retrieved text is refused, not truncated to nothing


def to_dicts(messages: list[BaseMessage]) -> list[dict]:
    """LangChain messages -> the {"role", "content"} conversation the template registry renders."""
    out = []
    for m in messages:
        if m.type not in ROLES:
            raise ZhtuneError(f"message type {m.type!r} is not supported", expected="system / human / ai")
        out.append({"role": ROLES[m.type], "content": m.content if isinstance(m.content, str) else str(m.content)})
    return out


class EngineChat(BaseChatModel):
    """A LangChain chat model over a zhtune Engine (engine.stream does the work; prompts come from
    the template registry through the engine)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    engine: Any
    params: Any  # zhtune.infer.engine.GenParams

    @property
    def _llm_type(self) -> str:
        return "zhtune-engine"

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        params = replace(self.params, stop=[*self.params.stop, *(stop or [])]).validate()
        for delta in self.engine.stream(to_dicts(messages), params):
            meta = {"finish_reason": delta.finish_reason} if delta.finish_reason else {}
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta.text, response_metadata=meta))
            if run_manager and delta.text:
                run_manager.on_llm_new_token(delta.text, chunk=chunk)
            yield chunk

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        parts, finish = [], None
        for chunk in self._stream(messages, stop, run_manager, **kwargs):
            parts.append(chunk.text)
            finish = chunk.message.response_metadata.get("finish_reason", finish)
        message = AIMessage(content="".join(parts), response_metadata={"finish_reason": finish})
        return ChatResult(generations=[ChatGeneration(message=message)])


@dataclass
class Budget:
    """How many prompt tokens fit: context - max_new_tokens; `count` measures a conversation."""

    context: int
    max_new_tokens: int
    count_dicts: Callable[[list[dict]], int]
    exact: bool  # False over HTTP without usage figures: an estimate of 1 token per character
    note: str = ""

    @property
    def room(self) -> int:
        return self.context - self.max_new_tokens

    def count(self, messages: list[BaseMessage]) -> int:
        return self.count_dicts(to_dicts(messages))

    def describe(self) -> str:
        how = self.note if self.exact else " (estimated: 1 token per character / 按每字 1 token 估算)"
        return (f"context {self.context} tokens = {self.room} for the prompt + {self.max_new_tokens} "
                f"for the answer (--max-new-tokens){how}")


def add_llm_args(parser: argparse.ArgumentParser) -> None:
    """--model (+ the shared model flags of zhtune.infer.options) or --api-base, and the sampling flags."""
    from zhtune.infer.options import add_gen_args, add_model_args

    group = parser.add_argument_group("model / 模型 (one of --model or --api-base)")
    which = group.add_mutually_exclusive_group(required=True)
    add_model_args(group, model_group=which,
                   context_help="model context in tokens (default: the engine's; over HTTP: the server's "
                                f"max_model_len if it says, else {DEFAULT_API_CONTEXT})")
    which.add_argument("--api-base", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    group.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"),
                       help="API key for --api-base (default: $OPENAI_API_KEY)")
    group.add_argument("--model-name", default=None, help="model name on the server (default: its first model)")
    add_gen_args(group, "rag")


def _check_budget(budget: Budget) -> Budget:
    if budget.max_new_tokens < 1:
        raise ZhtuneError(f"--max-new-tokens {budget.max_new_tokens} must be >= 1", where="--max-new-tokens")
    if budget.room < MIN_CONTEXT_ROOM * 4:
        raise ZhtuneError(f"--max-new-tokens {budget.max_new_tokens} leaves only {budget.room} of the model's "
                          f"{budget.context} context tokens for the prompt", where="--max-new-tokens",
                          expected=f"at most {budget.context - MIN_CONTEXT_ROOM * 4}")
    return budget


def open_engine_llm(args: argparse.Namespace) -> tuple[EngineChat, Budget]:
    from zhtune.infer.options import engine_from_args, params_from_args  # the same flags as `zhtune chat`

    params = params_from_args(args, "rag")
    engine = engine_from_args(args)   # --context-length reaches the engine: it can only shorten the context
    context = engine.max_model_len
    if not context:
        engine.close()
        raise ZhtuneError("the model does not say its context length", where=args.model,
                          hint="pass --context-length N")
    budget = Budget(context, args.max_new_tokens, lambda msgs: engine.count_tokens(engine.format(msgs)), True)
    try:
        return EngineChat(engine=engine, params=params), _check_budget(budget)
    except ZhtuneError:
        engine.close()
        raise


def _server_model(args: argparse.Namespace) -> tuple[str, int | None]:
    """(model name, max_model_len if the server reports it) from GET {api_base}/models."""
    import openai

    client = openai.OpenAI(base_url=args.api_base, api_key=args.api_key, timeout=15, max_retries=0)
    try:
        models = list(client.models.list())
    except openai.AuthenticationError:
        raise ZhtuneError("the server refused the API key", where=f"--api-base {args.api_base}",
                          hint="pass --api-key (or set OPENAI_API_KEY)") from None
    except openai.APIError as exc:
        raise ZhtuneError(f"cannot reach the server: {exc}", where=f"--api-base {args.api_base}",
                          expected="a running OpenAI-compatible server (its URL usually ends in /v1)",
                          hint="start one with `zhtune serve --model PATH`") from None
    chosen = next((m for m in models if m.id == args.model_name), None) if args.model_name else \
        (models[0] if models else None)
    if chosen is None:
        if args.model_name:  # the server may still route an unlisted name; let it decide
            return args.model_name, None
        raise ZhtuneError("the server lists no models", where=f"{args.api_base}/models", hint="pass --model-name")
    extra = getattr(chosen, "model_extra", None) or {}
    length = extra.get("max_model_len") or extra.get("context_length")
    return chosen.id, int(length) if isinstance(length, (int, float)) and length > 0 else None


def _calibrate(args: argparse.Namespace, name: str, sample: str) -> tuple[float, float] | None:
    """(tokens of a one-character conversation, tokens per character) measured on `sample` (the
    prompt and document text) by two 1-token requests: the server's usage.prompt_tokens is exact.
    None when the server reports no usage."""
    import openai

    client = openai.OpenAI(base_url=args.api_base, api_key=args.api_key, timeout=60, max_retries=0)

    def prompt_tokens(text: str) -> int | None:
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": text}],
                                               max_tokens=1, temperature=0)
        return reply.usage.prompt_tokens if reply.usage else None

    try:
        base = prompt_tokens("你")
        for size in (400, 100, 25):  # a shorter probe if the server's context is small
            text = sample[:size]
            try:
                total = prompt_tokens("你" + text)
            except openai.BadRequestError:
                continue
            if base is None or total is None or not text:
                return None
            return float(base), max((total - base) / len(text), 0.05)
    except openai.APIError as exc:
        raise ZhtuneError(f"the server failed a 1-token request: {exc}", where=f"--api-base {args.api_base}") from None
    return None


def open_api_llm(args: argparse.Namespace, sample: str = "") -> tuple[BaseChatModel, Budget]:
    from langchain_openai import ChatOpenAI

    from zhtune.infer.options import params_from_args

    params_from_args(args, "rag")   # the same range checks as in-process, before any request
    name, server_context = _server_model(args)
    llm = ChatOpenAI(model=name, base_url=args.api_base, api_key=args.api_key, temperature=args.temperature,
                     top_p=args.top_p, max_tokens=args.max_new_tokens, seed=args.seed, timeout=600, max_retries=1)
    context = args.context_length or server_context or DEFAULT_API_CONTEXT
    rate = _calibrate(args, name, sample) if sample else None
    if rate is None:  # no usage reported: 1 token per character suits an expanded Chinese vocabulary
        base, per_char, exact = 8.0, 1.0, False
    else:
        base, per_char, exact = rate[0], rate[1], True

    def count(msgs: list[dict]) -> int:
        # measured rate, + per-message template overhead, + 10% because text differs from the sample
        chars = sum(len(m["content"]) for m in msgs)
        return math.ceil((base + per_char * chars + 8 * (len(msgs) - 1)) * 1.1)

    budget = Budget(context, args.max_new_tokens, count, exact)
    budget.note = f" (measured {per_char:.2f} tokens/char on your text, +10%)" if exact else ""
    return llm, _check_budget(budget)


def open_llm(args: argparse.Namespace, sample: str = "") -> tuple[BaseChatModel, Budget]:
    """The chat model and its budget; `sample` (prompt + document text) calibrates counts over HTTP."""
    llm, budget = open_engine_llm(args) if args.model else open_api_llm(args, sample)
    print(f"模型 model: {args.model or args.api_base} · {budget.describe()}", file=sys.stderr)
    return llm, budget


def close_llm(llm: BaseChatModel) -> None:
    if isinstance(llm, EngineChat):
        llm.engine.close()


def call_llm(runnable, inputs: dict, stream_to=None) -> str:
    """Run `prompt | llm | parser` once; echo tokens to `stream_to` as they come. Server errors -> ZhtuneError."""
    try:
        if stream_to is None:
            return runnable.invoke(inputs)
        parts = []
        for text in runnable.stream(inputs):
            parts.append(text)
            stream_to.write(text)
            stream_to.flush()
        return "".join(parts)
    except Exception as exc:
        if type(exc).__module__.startswith("openai"):
            raise ZhtuneError(f"the server failed: {exc}", where="--api-base") from None
        raise


# --- fitting text into the budget -----------------------------------------------------------------

def fit_text(budget: Budget, build: Callable[[str], list[BaseMessage]], text: str) -> str:
    """The longest prefix of `text` whose prompt build(prefix) fits the budget (binary search on chars)."""
    if budget.count(build(text)) <= budget.room:
        return text
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if budget.count(build(text[:mid])) <= budget.room:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def check_fixed_part(budget: Budget, messages: list[BaseMessage], what: str, where: str) -> int:
    """Refuse (with the numbers) when the prompt without any document text already leaves no room."""
    used = budget.count(messages)
    if used + MIN_CONTEXT_ROOM > budget.room:
        raise ZhtuneError(
            f"the {what} is too long for the model: the prompt takes {used} tokens before any document text, "
            f"the model's context holds {budget.context} and {budget.max_new_tokens} are kept for the answer "
            f"(room {budget.room}, at least {MIN_CONTEXT_ROOM} needed for the documents)",
            where=where, expected=f"a prompt of at most {budget.room - MIN_CONTEXT_ROOM} tokens (now {used})",
            hint="shorten it, lower --max-new-tokens, or use a model with a longer context")
    return used
