"""`zhtune demo`: the whole pipeline on a tiny model and the bundled Chinese corpus, on CPU, in minutes.

Every step runs the same `zhtune ...` command a user would type (printed before it runs), checks
what it wrote, and the run ends with a bilingual table of steps, times and verification figures.
The work folder stays behind for the user to explore.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from zhtune import tiny
from zhtune.args import make_parser
from zhtune.errors import ZhtuneError


@dataclass
class Step:
    key: str
    title: str                       # "中文 / English"
    run: Callable[["Demo"], str]     # returns the verification figure shown in the summary
    seconds: float = 0.0
    figure: str = ""


@dataclass
class Demo:
    work: Path
    quick: bool = False
    state: dict = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)

    def zhtune(self, *args: str) -> None:
        """Run a zhtune command in-process, exactly as typed on the command line."""
        from zhtune.cli import main as cli_main

        shown = " ".join(shlex.quote(str(a)) for a in args)
        print(f"\n  $ zhtune {shown}", flush=True)
        code = cli_main([str(a) for a in args])
        if code != 0:
            raise ZhtuneError(f"demo step failed: zhtune {shown} exited with {code}",
                              hint="the error above says why; re-run with --debug for a traceback")


def cjk_chars(text: str) -> int:
    return sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf")


def tokens_per_cjk(tokenizer_dir: Path, lines: list[str]) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    n_tokens = sum(len(tok(line, add_special_tokens=False)["input_ids"]) for line in lines)
    return n_tokens / max(1, sum(cjk_chars(line) for line in lines))


# --- steps -------------------------------------------------------------------------------------

def step_base(demo: Demo) -> str:
    """A tiny LLaMA-like English tokenizer (stands in for LLaMA's) trained here, in seconds."""
    from zhtune.vocab.hf import write_hf_tokenizer

    sp = tiny.train_base_sp(tiny.asset_lines("en_corpus.txt"), demo.path("base_sp", "tokenizer.model"),
                            vocab_size=1000)
    write_hf_tokenizer(sp, demo.path("base_tokenizer"))
    return "vocab 1000 (English BPE, byte fallback)"


def step_vocab(demo: Demo) -> str:
    corpus = tiny.asset("zh_corpus.txt")
    demo.zhtune("vocab", "train", "--corpus", corpus, "--vocab-size", "4000", "--output", demo.path("zh_vocab"))
    demo.zhtune("vocab", "merge", "--base", demo.path("base_tokenizer"), "--add",
                demo.path("zh_vocab", "zh_sp.model"), "--output", demo.path("tokenizer"))
    held = tiny.asset_lines("zh_heldout.txt")
    before = tokens_per_cjk(demo.path("base_tokenizer"), held)
    after = tokens_per_cjk(demo.path("tokenizer", "merged_tokenizer_hf"), held)
    demo.state["tokens_per_cjk"] = (before, after)
    return f"tokens/中文字 {before:.2f} → {after:.2f} (held-out)"


STEPS = [
    Step("base", "基座分词器 / base tokenizer", step_base),
    Step("vocab", "中文词表扩充 / Chinese vocabulary", step_vocab),
]


def _summary(steps: list[Step], total: float) -> str:
    rows = [("步骤 step", "用时 time", "验证 check")]
    rows += [(s.title, f"{s.seconds:.1f}s", s.figure) for s in steps]
    rows.append(("合计 total", f"{total:.1f}s", ""))
    width0 = max(_width(r[0]) for r in rows)
    width1 = max(_width(r[1]) for r in rows)
    lines = [f"  {_pad(a, width0)}  {_pad(b, width1)}  {c}" for a, b, c in rows]
    lines.insert(1, "  " + "-" * (width0 + width1 + 30))
    return "\n".join(lines)


def _width(text: str) -> int:
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def main(argv: list[str]) -> int:
    parser = make_parser(
        "demo",
        """
        跑通全流程：在 CPU 上用一个小模型和内置的中文语料，几分钟内走完每一步并验证。
        Run the whole pipeline on a tiny model and the bundled Chinese corpus, on CPU, in minutes,
        verifying each step. The work folder stays for you to explore.
        """,
        """
        zhtune demo
        zhtune demo --workdir /tmp/zhtune-demo --overwrite
        """,
    )
    parser.add_argument("--workdir", default="zhtune-demo", help="folder for everything the demo writes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing work folder")
    args = parser.parse_args(argv)
    work = Path(args.workdir).resolve()
    if work.exists() and any(work.iterdir()):
        if not args.overwrite:
            raise ZhtuneError(f"work folder already exists: {work}", expected="a new folder",
                              hint="pass --overwrite or choose --workdir")
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    demo = Demo(work)
    print(f"zhtune demo — 工作目录 work folder: {work}", flush=True)
    start = time.perf_counter()
    for i, step in enumerate(STEPS, 1):
        print(f"\n[{i}/{len(STEPS)}] {step.title}", flush=True)
        t0 = time.perf_counter()
        step.figure = step.run(demo)
        step.seconds = time.perf_counter() - t0
        print(f"  ✓ {step.figure}  ({step.seconds:.1f}s)", flush=True)
    print("\n" + _summary(STEPS, time.perf_counter() - start))
    print(f"\n下一步 / next: explore {work}, then try:\n"
          f"  zhtune vocab stats --tokenizer {work / 'base_tokenizer'} "
          f"--tokenizer {work / 'tokenizer' / 'merged_tokenizer_hf'} --text {tiny.asset('zh_heldout.txt')}")
    sys.stdout.flush()
    return 0
