"""The `zhtune` command: one table of subcommands, each imported lazily; no logic here."""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from zhtune import __version__
from zhtune.console import quiet_libraries
from zhtune.errors import Terminated, ZhtuneError

# subcommand -> ("module:function", one-line help). Longest match wins ("vocab train" before "vocab").
COMMANDS: dict[str, tuple[str, str]] = {
    "vocab train": ("zhtune.vocab.train:main", "训练中文词表 / train a Chinese SentencePiece or byte-level vocabulary"),
    "vocab merge": ("zhtune.vocab.merge:main", "把中文词表并入 LLaMA 分词器 / merge pieces into a LLaMA tokenizer"),
    "vocab stats": ("zhtune.vocab.stats:main", "比较分词器的压缩率与一致性 / compare tokenizers on a text"),
    "convert meta": ("zhtune.export.meta:main", "Meta .pth 权重转 HF / convert Meta checkpoints to HF"),
    "train": ("zhtune.train.run:main", "预训练 / 指令精调 / 偏好训练 (pt | sft | dpo) with LoRA, QLoRA or full"),
    "estimate": ("zhtune.train.estimate:main", "估算训练显存 / estimate GPU memory of a training config"),
    "merge": ("zhtune.export.merge:main", "合并 LoRA 到基座 (低内存流式) / merge adapters into the base"),
    "export gguf": ("zhtune.export.gguf:main", "导出并量化为 GGUF / export a model to GGUF for llama.cpp"),
    "eval": ("zhtune.eval.run:main", "评测 C-Eval / CMMLU / MMLU、每字符比特数、ROUGE/BLEU / evaluate a model"),
    "chat": ("zhtune.infer.chat:main", "终端对话 / chat in the terminal"),
    "webui": ("zhtune.serve.webui:main", "网页对话 (Gradio) / chat in the browser"),
    "serve": ("zhtune.serve.api:main", "OpenAI 兼容 API 服务 / OpenAI-compatible API server"),
    "rag qa": ("zhtune.rag.qa:main", "基于文档的检索问答 / retrieval QA over your documents"),
    "rag summarize": ("zhtune.rag.summarize:main", "文档摘要 / summarize documents"),
    "demo": ("zhtune.demo:main", "在 CPU 上几分钟跑通全流程 / the whole pipeline on CPU in minutes"),
}


def _usage() -> str:
    rows = "\n".join(f"  {name:<15} {help_text}" for name, (_, help_text) in COMMANDS.items())
    return (
        f"zhtune {__version__} — 让 LLaMA 学好中文，一条命令行从词表到部署。\n"
        "Make a LLaMA-family model good at Chinese and ship it.\n\n"
        "usage: zhtune [--version] [--debug] <command> [args...]\n\n"
        f"commands / 命令:\n{rows}\n\n"
        "Run `zhtune <command> --help` for a command's flags and examples.\n"
        "--debug (or ZHTUNE_DEBUG=1) shows the full traceback of an error.\n"
        "Start here / 从这里开始:  zhtune demo"
    )


def _resolve(argv: list[str]) -> tuple[str, list[str]] | None:
    for width in (2, 1):
        name = " ".join(argv[:width])
        if len(argv) >= width and name in COMMANDS:
            return name, argv[width:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ZHTUNE_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"zhtune {__version__}")
        return 0
    found = _resolve(argv)
    if found is None:
        group = [n for n in COMMANDS if n.split()[0] == argv[0]]
        if group:  # e.g. `zhtune vocab` alone: list its subcommands
            ok = len(argv) == 1 or argv[1] in ("-h", "--help")
            out = sys.stdout if ok else sys.stderr  # `zhtune vocab trian` is an error: stderr, exit 2
            print(f"usage: zhtune {argv[0]} {{{'|'.join(n.split()[1] for n in group)}}} ...\n", file=out)
            for n in group:
                print(f"  {n:<15} {COMMANDS[n][1]}", file=out)
            return 0 if ok else 2
        import difflib

        close = difflib.get_close_matches(" ".join(argv[:2]), list(COMMANDS), n=1) or \
            difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f"did you mean `zhtune {close[0]}`?" if close else "run `zhtune --help`"
        print(ZhtuneError(f"unknown command: {argv[0]}", hint=hint).render(), file=sys.stderr)
        return 2
    name, rest = found
    module_name, func_name = COMMANDS[name][0].split(":")
    quiet_libraries(debug)   # library notices meant for library authors: shown only with --debug
    _terminate_like_interrupt()
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(rest)
        return int(result or 0)
    except ZhtuneError as exc:
        if debug:
            traceback.print_exc()
        print(exc.render(), file=sys.stderr)
        if not debug:
            print("  (加 --debug 查看调用栈 / add --debug for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated): cleanup has run on the way up
        print("\n已中断 interrupted" + (" (SIGTERM)" if isinstance(exc, Terminated) else ""), file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130


def _terminate_like_interrupt() -> None:
    """SIGTERM (kill, a scheduler's time limit, docker stop) unwinds like Ctrl-C: temporaries are removed and
    locks released instead of the process vanishing mid-write."""
    import signal
    import threading

    def _raise(signum, frame):
        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)


if __name__ == "__main__":
    raise SystemExit(main())
