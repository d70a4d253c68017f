"""An OpenAI request as engine jobs, for `zhtune serve` (zhtune.serve.api): the model it names, the fields
this server refuses, chat messages for the template, prompts as token ids, sampling parameters over serve's
defaults, the token budget within the context, and one seed per choice."""

from __future__ import annotations

from dataclasses import replace

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import Engine, GenParams, is_token_ids
from zhtune.infer.options import gen_defaults
from zhtune.serve.http import as_api_error
from zhtune.serve.protocol import APIError, ChatRequest, CompletionRequest


def check_model(name: str, served: str) -> None:
    if name != served:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{served}' (GET /v1/models)",
                       param="model", code="model_not_found")


def refuse(param: str, feature: str) -> None:
    raise APIError(400, f"{param}: {feature} is not supported by this server", param=param, code="unsupported")


def check_unsupported(req) -> None:
    if req.logit_bias:
        refuse("logit_bias", "logit bias")
    if isinstance(req, ChatRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        if req.tools or req.functions or req.tool_choice not in (None, "none", "auto"):
            refuse("tools", "tool / function calling")
        if req.response_format and req.response_format.get("type", "text") != "text":
            refuse("response_format", "a response_format other than text")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            refuse("suffix", "suffix (fill-in-the-middle)")
        if req.best_of not in (None, 1):
            refuse("best_of", "best_of > 1")


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


def check_token_prompts(engine: Engine, prompts: list, single: bool) -> None:
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


def echo_text(engine: Engine, prompt) -> str:
    """What echo puts first in a choice: the prompt's text (token ids: their text, joined)."""
    if not is_token_ids(prompt):
        return prompt
    return b"".join(engine.token_bytes(prompt)).decode("utf-8", "replace")


def token_ids(engine: Engine, prompt) -> list[int]:
    return list(prompt) if is_token_ids(prompt) else engine.encode(prompt, bos=True)

