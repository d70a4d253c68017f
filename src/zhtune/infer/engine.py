"""One inference interface for every front end (chat, webui, serve, rag): messages or a prompt in,
a stream of text deltas out. Backends: hf (transformers + adapters), llamacpp (GGUF), vllm (GPU).

    engine = load_engine("out/merged")                       # backend picked from what the path is
    for delta in engine.stream([{"role": "user", "content": "你好"}], GenParams(max_new_tokens=64)):
        print(delta.text, end="", flush=True)

Contract every backend keeps (front ends rely on it):
- prompts are built only by the training template registry (zhtune.data.templates), never here;
- `stream` may be called from several threads at once; the engine queues or batches internally;
- closing the iterator `stream` returned (generator.close(), or dropping it) cancels that generation;
- the last Delta of a stream carries finish_reason "stop" (end token / stop string) or "length";
  stop strings are never part of the returned text;
- GenParams.validate() raises ZhtuneError naming the field for any out-of-range value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Union

from zhtune.data.templates import Message, Template
from zhtune.errors import ZhtuneError

Prompt = Union[str, list[Message]]  # raw text (used as is) or a conversation (rendered by the template)


@dataclass
class GenParams:
    max_new_tokens: int = 512
    temperature: float = 0.7          # 0 means greedy
    top_p: float = 0.9
    top_k: int = 40                   # 0 disables
    repetition_penalty: float = 1.1   # 1.0 disables (multiplicative, as transformers/llama.cpp)
    frequency_penalty: float = 0.0    # OpenAI-style, -2..2
    presence_penalty: float = 0.0     # OpenAI-style, -2..2
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> "GenParams":
        checks = [
            ("max_new_tokens", 1 <= self.max_new_tokens <= 1_000_000, "an integer >= 1"),
            ("temperature", 0.0 <= self.temperature <= 5.0, "a number in [0, 5]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "a number in (0, 1]"),
            ("top_k", self.top_k >= 0, "an integer >= 0"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "a number in (0, 10]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "a number in [-2, 2]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "a number in [-2, 2]"),
            ("stop", len(self.stop) <= 16 and all(isinstance(s, str) and s for s in self.stop),
             "at most 16 non-empty strings"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ZhtuneError(f"generation parameter {name}={getattr(self, name)!r} is out of range",
                                  where=name, expected=expected)
        return self


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None   # None while streaming; "stop" | "length" on the last delta


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Engine:
    """What every backend provides. Backends live in hf.py, llamacpp.py, vllm.py."""

    backend: str = ""
    model_name: str = ""            # shown by /v1/models
    template: Template
    max_model_len: int = 0          # context length in tokens

    def format(self, prompt: Prompt) -> str:
        """A conversation rendered by the template (or raw text as is)."""
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def stream(self, prompt: Prompt, params: GenParams) -> Iterator[Delta]:
        raise NotImplementedError

    def generate(self, prompts: list[Prompt], params: GenParams) -> list[Completion]:
        """Batch form: one Completion per prompt (backends batch where they can)."""
        raise NotImplementedError

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Mean-pooled last hidden states, L2-normalised (as Chinese-LLaMA-Alpaca-2's server)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model (and any worker threads)."""


def load_engine(model: str, loras: list[str] | tuple[str, ...] = (), backend: str | None = None,
                template: str | None = None, **options) -> Engine:
    """Open `model` with the backend named, or the one its path implies (.gguf -> llamacpp, else hf)."""
    raise NotImplementedError("implemented by the inference issue (#6)")
