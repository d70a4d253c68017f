"""Answers of `zhtune serve` (zhtune.serve.api) from the engine's deltas, in OpenAI's shapes: one JSON
completion, or the chunks of an SSE stream; choices, echoed prompts, log-probs (chat and legacy) and usage."""

from __future__ import annotations

import json
from dataclasses import dataclass

from zhtune.infer.engine import Delta
from zhtune.serve.http import as_api_error
from zhtune.serve.protocol import chat_logprobs, join_legacy, legacy_logprobs, usage


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


def answer(reply: Reply, deltas: list[list[Delta]]) -> dict:
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


async def sse(reply: Reply, events, first, include_usage: bool):
    """The SSE events of a streamed answer: OpenAI's first chunk per choice, one chunk per delta (`first`,
    then `events`: (job, Delta) pairs), usage if asked, an engine failure in-band, then [DONE]."""
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
