"""THE chat templates: the only place prompt formats live (training, chat, serve, exported chat_template).

A template renders a conversation to text. Training uses `encode_pairs` (prompt, response) so the
loss can be put on responses only; inference uses `render` (everything up to the next response);
`jinja` turns the same template into a tokenizer chat_template that renders the identical string,
so transformers, vLLM and llama.cpp build prompts exactly as training did.

Formats hold three placeholders: {content}, {system} and the special tokens {bos} / {eos}.
The user format already ends with the assistant header ("### Response:\n", "[/INST]"), so the
prompt for the next answer is simply the conversation rendered up to the last user turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from zhtune.errors import ZhtuneError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    user: str                       # one user turn incl. the assistant header, e.g. "Human: {content}\nAssistant: "
    assistant: str                  # one answer incl. its end marker, e.g. "{content}{eos}"
    system: str = "{system}\n\n"    # how a system prompt is written before the first turn
    first_user: str | None = None   # first user turn when a system prompt is folded into it (llama2, mistral)
    default_system: str = ""
    prefix: str = "{bos}"           # start of the conversation
    turn_prefix: str = ""           # before every user turn after the first (llama2: "{bos}")
    separator: str = ""             # between an answer and the next user turn
    stop: tuple[str, ...] = ()      # extra stop strings for generation (besides eos)
    special_tokens: tuple[str, ...] = field(default=())  # literal tokens the tokenizer must know
    trim: bool = False              # strip whitespace around each message (LLaMA-3's official `| trim`)
    system_always: bool = False     # write the system block even without a system prompt (LLaMA-3.1's)
    strip_think: bool = False       # drop "<think>...</think>" from answers before the last one (Qwen3's)

    # --- rendering -------------------------------------------------------------------------
    def _fill(self, fmt: str, bos: str, eos: str, content: str = "", system: str = "") -> str:
        # replace placeholders one by one: `str.format` would choke on braces in user content
        if self.trim:
            content, system = content.strip(), system.strip()
        out = fmt.replace("{bos}", bos).replace("{eos}", eos).replace("{system}", system)
        return out.replace("{content}", content)

    def _split(self, messages: list[Message]) -> tuple[str, list[Message]]:
        if not messages:
            raise ZhtuneError("empty conversation", expected="at least one user message")
        system = self.default_system
        rest = list(messages)
        if rest[0].get("role") == "system":
            system = rest.pop(0).get("content") or ""
        if not rest:
            raise ZhtuneError("conversation has no user message", where="messages",
                              expected="an optional system message, then at least one user message")
        for i, m in enumerate(rest):
            role = m.get("role")
            want = "user" if i % 2 == 0 else "assistant"
            if role != want:
                raise ZhtuneError(f"message {i} has role {role!r}", where=f"messages[{i}]",
                                  expected="an optional system message, then user/assistant turns alternating")
            if not isinstance(m.get("content"), str):
                raise ZhtuneError(f"message {i} content is not text", where=f"messages[{i}].content",
                                  expected="a string")
        return system, rest

    def encode_pairs(self, messages: list[Message], bos: str = "<s>", eos: str = "</s>") -> list[tuple[str, str]]:
        """[(prompt_text, response_text), ...] whose concatenation is the whole conversation.

        The last pair's response is "" when the conversation ends with a user turn.
        """
        system, turns = self._split(messages)
        pairs: list[tuple[str, str]] = []
        for i in range(0, len(turns), 2):
            user = turns[i]["content"]
            text = ""
            if i == 0:
                text += self._fill(self.prefix, bos, eos)
                if system and self.first_user is not None:
                    text += self._fill(self.first_user, bos, eos, user, system)
                else:
                    if system or self.system_always:
                        text += self._fill(self.system, bos, eos, system=system)
                    text += self._fill(self.user, bos, eos, user)
            else:
                text += self._fill(self.separator, bos, eos) + self._fill(self.turn_prefix, bos, eos)
                text += self._fill(self.user, bos, eos, user)
            answer = ""
            if i + 1 < len(turns):
                content = turns[i + 1]["content"]
                if self.strip_think and i + 2 < len(turns):  # an earlier answer: its reasoning is not kept
                    content = content.split("</think>")[-1].lstrip("\n")
                answer = self._fill(self.assistant, bos, eos, content)
            pairs.append((text, answer))
        return pairs

    def render(self, messages: list[Message], bos: str = "<s>", eos: str = "</s>") -> str:
        """The whole conversation as text (ending with the assistant header after a user turn)."""
        return "".join(p + r for p, r in self.encode_pairs(messages, bos, eos))

    # --- export ----------------------------------------------------------------------------
    def jinja(self) -> str:
        """A chat_template that renders exactly `render(messages, bos_token, eos_token)`."""

        def lit(fmt: str, content: str = "''", system: str = "''") -> str:
            # fmt -> a Jinja expression concatenating literals and variables
            parts, rest = [], fmt
            tokens = {"{bos}": "bos_token", "{eos}": "eos_token", "{content}": content, "{system}": system}
            while rest:
                hits = [(rest.find(t), t) for t in tokens if t in rest]
                if not hits:
                    parts.append(json.dumps(rest))
                    break
                pos, tok = min(hits)
                if pos:
                    parts.append(json.dumps(rest[:pos]))
                parts.append(tokens[tok])
                rest = rest[pos + len(tok):]
            return "{{ " + (" ~ ".join(parts) if parts else "''") + " }}"

        content = "(message['content'] | trim)" if self.trim else "message['content']"
        answer = (f"({content} if loop.last else {content}.split('</think>')[-1].lstrip('\\n'))"
                  if self.strip_think else content)
        system = "(ns.system | trim)" if self.trim else "ns.system"
        first_user = (
            "{%- if ns.system -%}" + lit(self.first_user, content, system) + "{%- else -%}"
            + lit(self.user, content) + "{%- endif -%}"
            if self.first_user is not None
            else "{%- if ns.system" + (" or true" if self.system_always else "") + " -%}"
            + lit(self.system, system=system) + "{%- endif -%}" + lit(self.user, content)
        )
        return (
            "{%- set ns = namespace(system=" + json.dumps(self.default_system) + ") -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set ns.system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
            "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
            + lit(self.prefix)
            + "{%- for message in loop_messages -%}"
            "{%- if message['role'] == 'user' -%}"
            "{%- if loop.first -%}" + first_user + "{%- else -%}"
            + lit(self.separator) + lit(self.turn_prefix) + lit(self.user, content) + "{%- endif -%}"
            "{%- elif message['role'] == 'assistant' -%}" + lit(self.assistant, answer) + "{%- endif -%}"
            "{%- endfor -%}"
        )


_ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                  "Write a response that appropriately completes the request.")
_LLAMA2_ZH_SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"
_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")

TEMPLATES: dict[str, Template] = {t.name: t for t in [
    Template("default", "Human/Assistant turns; a plain default for base models",
             user="Human: {content}\nAssistant: ", assistant="{content}{eos}", separator="\n",
             stop=("\nHuman:",)),
    Template("alpaca", "Stanford Alpaca's instruction format",
             user="### Instruction:\n{content}\n\n### Response:\n", assistant="{content}{eos}",
             default_system=_ALPACA_SYSTEM, separator="\n\n", stop=("### Instruction:",)),
    Template("chinese-alpaca", "Chinese-Alpaca (Chinese-LLaMA-Alpaca v1) prompt, as its build_dataset.py",
             user="### Instruction:\n{content}\n\n### Response: ", assistant="{content}{eos}",
             default_system=_ALPACA_SYSTEM, separator="\n\n", stop=("### Instruction:",)),
    Template("llama2", "Llama-2-chat [INST] <<SYS>> format",
             user="[INST] {content} [/INST]", assistant=" {content} {eos}",
             first_user="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]", turn_prefix="{bos}"),
    Template("llama2-zh", "Chinese-Alpaca-2's Llama-2 format with its bilingual system prompt",
             user="[INST] {content} [/INST]", assistant=" {content} {eos}",
             first_user="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]", turn_prefix="{bos}",
             default_system=_LLAMA2_ZH_SYSTEM),
    *[Template(name, description, prefix="<|begin_of_text|>",
               system="<|start_header_id|>system<|end_header_id|>\n\n" + knowledge + "{system}<|eot_id|>",
               user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n",
               assistant="{content}<|eot_id|>", stop=("<|eot_id|>",), trim=True, system_always=bool(knowledge),
               special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
      for name, description, knowledge in [
          ("llama3", "Llama-3 instruct header format (Meta-Llama-3-*-Instruct's template, token for token)", ""),
          ("llama3.1", "Llama-3.1 / 3.3 instruct: a system block always, with the knowledge date lines "
                       "(Llama-3.1-*-Instruct's template without tools, token for token)",
           "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"),
      ]],
    *[Template(name, description, prefix="", system="<|im_start|>system\n{system}<|im_end|>\n",
               user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
               assistant="{content}<|im_end|>\n", default_system=system, stop=("<|im_end|>",),
               special_tokens=("<|im_start|>", "<|im_end|>"), strip_think=name == "qwen3")
      for name, description, system in [
          ("chatml", "ChatML <|im_start|> turns, no default system prompt (SmolLM2, OpenHermes, ...)", ""),
          ("qwen", "Qwen / Qwen2-Instruct ChatML with its default system prompt", "You are a helpful assistant."),
          ("qwen2.5", "Qwen2.5-Instruct ChatML with its default system prompt",
           "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
          ("qwen3", "Qwen3 ChatML, no default system prompt; earlier answers lose their <think> part "
                    "(thinking mode: the model writes <think> itself)", ""),
          ("smollm2", "SmolLM2-Instruct ChatML with its default system prompt",
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
      ]],
    Template("mistral", "Mistral instruct [INST] format (system folded into the first turn)",
             user="[INST] {content} [/INST]", assistant="{content}{eos}",
             first_user="[INST] {system}\n\n{content} [/INST]"),
    Template("vicuna", "Vicuna v1.1 USER/ASSISTANT format",
             system="{system} ", user="USER: {content} ASSISTANT: ", assistant="{content}{eos}",
             default_system=_VICUNA_SYSTEM, stop=("USER:",)),
]}


def get_template(name: str) -> Template:
    """The template called `name`; an unknown name is a ZhtuneError listing the known ones."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    import difflib

    close = difflib.get_close_matches(name, list(TEMPLATES), n=1)
    raise ZhtuneError(f"unknown template {name!r}", expected=f"one of {', '.join(TEMPLATES)}",
                      hint=f"did you mean {close[0]!r}?" if close else None)


def install(tokenizer, template: Template) -> list[str]:
    """Write the template into tokenizer.chat_template; add its literal special tokens if missing.

    Returns the tokens that were added (the caller must resize the model's embeddings then).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in template.special_tokens if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tokenizer.chat_template = template.jinja()
    return missing


# Conversations a tokenizer's own chat_template is rendered on to find the registry template it equals.
_PROBES = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "1+1=?"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "Q2"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nA1"},
     {"role": "user", "content": "Q2"}],  # a reasoning model's earlier answer (Qwen3 drops the reasoning)
]


def render_jinja(chat_template: str, messages: list[Message], bos: str, eos: str, add_generation_prompt: bool) -> str:
    """Render a tokenizer chat_template as transformers does (sandboxed Jinja, trim_blocks, lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(chat_template).render(messages=messages, bos_token=bos, eos_token=eos,
                                                 add_generation_prompt=add_generation_prompt)


def match_chat_template(chat_template: str | None, bos: str = "<s>", eos: str = "</s>") -> Template | None:
    """The registry template that renders exactly like `chat_template` (a Jinja string, e.g. a base's own
    official one) on probe conversations, prompts for the next answer; None if none does."""
    if not chat_template:
        return None
    for template in TEMPLATES.values():
        if template.jinja() == chat_template:
            return template
    try:
        want = [render_jinja(chat_template, conv, bos, eos, True) for conv in _PROBES]
    except Exception:  # noqa: BLE001 - a template that needs tools, dates, ... is simply not one of ours
        return None
    for template in TEMPLATES.values():
        if all(template.render(conv, bos, eos) == text for conv, text in zip(_PROBES, want)):
            return template
    return None


def tokenizer_chat_template(folder) -> tuple[str | None, str, str]:
    """(chat_template, bos, eos) of a tokenizer folder (chat_template.jinja or tokenizer_config.json)."""
    import json
    from pathlib import Path

    folder = Path(folder)
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}
    cfg = cfg if isinstance(cfg, dict) else {}

    def text(value, default):
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) else default

    chat = cfg.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        chat = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    bos, eos = text(cfg.get("bos_token"), "<s>"), text(cfg.get("eos_token"), "</s>")
    return (chat if isinstance(chat, str) else None), bos, eos


def training_template(name: str | None, folders) -> tuple[Template, str]:
    """(template, where it came from) for a training run: `name` when given ("template"); else the registry
    template the base's own chat_template renders like, in the first of `folders` (tokenizer, then model)
    that has one; else "default" (with why, when the base's chat_template is none of ours)."""
    from pathlib import Path

    if name:
        return get_template(name), "template"
    for folder in folders:
        if not folder or not Path(folder).expanduser().is_dir():
            continue
        chat_template, bos, eos = tokenizer_chat_template(Path(folder).expanduser())
        if chat_template:
            found = match_chat_template(chat_template, bos, eos)
            if found is not None:
                return found, f"the chat_template of {folder}"
            return TEMPLATES["default"], (f"default: the chat_template of {folder} is none of zhtune's templates; "
                                          "name one with template=NAME (zhtune train --help-templates)")
    return TEMPLATES["default"], "default"


def template_for_model(folder, name: str | None = None) -> tuple[Template, str]:
    """The template for a model or tokenizer folder, and where it came from: `name` ("--template"), the
    run.yaml an earlier stage wrote ("run.yaml"), the folder's own chat_template when it equals a
    registry template ("chat_template"), else "default"."""
    from zhtune.io import read_run_yaml

    if name:
        return get_template(name), "--template"
    recorded = (read_run_yaml(folder).get("config") or {}).get("template")
    if recorded in TEMPLATES:
        return TEMPLATES[recorded], "run.yaml"
    found = match_chat_template(*tokenizer_chat_template(folder))
    if found is not None:
        return found, "chat_template"
    return TEMPLATES["default"], "default"
