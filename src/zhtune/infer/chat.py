"""`zhtune chat`: talk to a model in the terminal (streaming, multi-turn), or answer a prompt file / piped
stdin non-interactively. A thin layer over the engine (zhtune.infer.engine); flags from zhtune.infer.options.

    zhtune chat --model out/sft            # an adapter folder: base + template found from run.yaml
    zhtune chat --model chinese.q4_k_m.gguf --system "你是一个乐于助人的助手。"
    echo "你好" | zhtune chat --model out/merged
"""

from __future__ import annotations

import json
import locale
import sys
from pathlib import Path

from zhtune.args import make_parser
from zhtune.errors import ZhtuneError
from zhtune.infer.engine import GenParams, PromptTooLong
from zhtune.infer.options import add_gen_args, add_model_args, engine_from_args, params_from_args

HELP = """命令 commands:
  /clear        清空对话历史 clear the conversation
  /system TEXT  设置系统提示并清空历史 set the system prompt (clears the conversation)
  /history      显示对话历史 show the conversation
  /exit         退出 quit (also Ctrl-D; Ctrl-C at the prompt)
  Ctrl-C while an answer streams stops that answer 回答中按 Ctrl-C 停止本次回答"""
PROMPT = ">>> "      # plain ASCII: readline measures it right, so editing wide characters works


def build_parser(prog: str = "chat", description: str | None = None):
    p = make_parser(prog, description or """
        终端对话：流式输出、多轮历史、/clear /system /exit；也可处理 prompt 文件或管道输入。
        Chat with a model in the terminal: streaming, multi-turn, /clear /system /exit; or answer a
        --prompt-file / piped stdin non-interactively. --model may be a merged model folder, a base
        model (+ --lora adapters), an adapter folder alone (its base is read from run.yaml), or a .gguf.""",
        """
        zhtune chat --model out/sft_run
        zhtune chat --model base_model --lora out/pt/pt_lora_model --lora out/sft/sft_lora_model
        zhtune chat --model model.q4_k_m.gguf --system "你是一个乐于助人的助手。" --temperature 0.2
        zhtune chat --model out/merged --prompt-file chat.json
        echo "中国的首都是哪里？" | zhtune chat --model out/merged --single-turn""")
    add_model_args(p)
    p.add_argument("--system", default=None, help="系统提示 system prompt (default: the template's)")
    p.add_argument("--prompt-file", default=None,
                   help="json list of conversations (each a list of {role, content}) or of strings; "
                        "answers each and exits")
    p.add_argument("--single-turn", action="store_true", help="不保留历史 answer each message on its own")
    add_gen_args(p, "chat")
    return p


# --- one answer ------------------------------------------------------------------------------

def answer(engine, messages: list[dict], params: GenParams, out=None) -> str:
    """Stream one answer to `out`; returns its text. Drops the oldest turns if the context is full.
    Ctrl-C stops the answer (the partial text is kept) and is not propagated."""
    out = out or sys.stdout
    text, stream = "", None
    try:  # Ctrl-C anywhere in here (even before the first token) stops this answer only
        while True:
            try:
                stream = engine.stream(messages, params)
                break
            except PromptTooLong as exc:
                first = 1 if messages[0]["role"] == "system" else 0
                if len(messages) - first <= 1:
                    raise
                del messages[first:first + 2]
                print(f"[上下文已满，删去最早的一轮 context full ({exc.prompt_tokens} tokens): "
                      f"dropped the oldest turn]", file=sys.stderr)
        for delta in stream:
            out.write(delta.text)
            out.flush()
            text += delta.text
    except KeyboardInterrupt:
        if stream is not None:
            stream.close()
        out.write("\n[已停止 stopped]")
    out.write("\n")
    out.flush()
    return text


# --- front ends -----------------------------------------------------------------------------

def _base(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def interactive(engine, params: GenParams, system: str | None, single_turn: bool) -> int:
    try:
        import readline  # noqa: F401  (line editing + history for input(); wide characters in UTF-8)
    except ImportError:
        pass
    print(f"zhtune chat · {engine.model_name} · backend {engine.backend} · template {engine.template.name}\n{HELP}")
    history = _base(system)
    while True:
        try:
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            print("\n再见 bye")
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            print("再见 bye")
            return 0
        if line == "/clear":
            history = _base(system)
            print("[已清空 cleared]")
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            history = _base(system)
            print(f"[系统提示 system prompt: {system or '(template default)'}; 已清空 cleared]")
            continue
        if line == "/history":
            for m in history:
                print(f"[{m['role']}] {m['content']}")
            continue
        if line in ("/help", "/?"):
            print(HELP)
            continue
        if single_turn:
            history = _base(system)
        history.append({"role": "user", "content": line})
        try:
            reply = answer(engine, history, params)
        except ZhtuneError as exc:
            history.pop()
            print(exc.render(), file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": reply})


def _read_prompt_file(path: str) -> list[list[dict]]:
    file = Path(path)
    if not file.is_file():
        raise ZhtuneError(f"prompt file not found: {path}", where="--prompt-file", expected="a json file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ZhtuneError(f"cannot parse {path}: {exc}", where="--prompt-file",
                          expected="json: a list of conversations (lists of {role, content})") from None
    if not isinstance(data, list):
        raise ZhtuneError(f"{path} holds a {type(data).__name__}", where="--prompt-file",
                          expected="a json list of conversations")
    convs = []
    for i, conv in enumerate(data):
        conv = [{"role": "user", "content": conv}] if isinstance(conv, str) else conv
        if not (isinstance(conv, list) and conv and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                        and m.get("role") in ("system", "user", "assistant")
                                                        for m in conv)):
            raise ZhtuneError(f"conversation {i} is not a list of {{role, content}} messages",
                              where=f"{path}[{i}]", expected='[{"role": "user", "content": "..."}]')
        convs.append(conv)
    return convs


def batch(engine, params: GenParams, convs: list[list[dict]], system: str | None) -> int:
    for i, conv in enumerate(convs):
        if system and conv[0]["role"] != "system":
            conv = _base(system) + conv
        if conv[-1]["role"] != "user":
            raise ZhtuneError(f"conversation {i} does not end with a user message", where=f"--prompt-file[{i}]",
                              expected="a last message with role user")
        print(f"==== {i + 1}/{len(convs)} ====\n用户 User: {conv[-1]['content']}\n助手 Assistant: ", end="")
        answer(engine, list(conv), params)
    return 0


def piped(engine, params: GenParams, system: str | None, single_turn: bool) -> int:
    """Each non-empty stdin line is a user message; answers go to stdout (multi-turn unless --single-turn)."""
    history = _base(system)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if single_turn:
            history = _base(system)
        history.append({"role": "user", "content": line})
        history.append({"role": "assistant", "content": answer(engine, history, params)})
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        locale.setlocale(locale.LC_ALL, "")   # readline needs the UTF-8 locale for wide characters
    except locale.Error:
        pass
    params = params_from_args(args, "chat")
    convs = _read_prompt_file(args.prompt_file) if args.prompt_file else None
    print(f"加载模型 loading {args.model} ...", file=sys.stderr, flush=True)
    with engine_from_args(args) as engine:
        if convs is not None:
            return batch(engine, params, convs, args.system)
        if not sys.stdin.isatty():
            return piped(engine, params, args.system, args.single_turn)
        return interactive(engine, params, args.system, args.single_turn)
