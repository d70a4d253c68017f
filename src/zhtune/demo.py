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
    steps: dict = field(default_factory=lambda: {"pt": 60, "sft": 150, "dpo": 10})

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

# the tiny model: big enough to memorise the demo's answers in a minute of CPU, small enough to be quick
MODEL = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=352, max_position=512)
QUESTIONS = 4  # the first records of assets/sft_qa.jsonl are the questions the demo asks


def _trained(*keys: str) -> list[str]:
    """Common `zhtune train` keys of the demo's runs (CPU, quick, logged every few steps)."""
    return ["per_device_train_batch_size=8", "logging_steps=10", "save_steps=1000", "seed=0",
            "lr_scheduler_type=constant_with_warmup", *keys]


def _losses(out: Path) -> tuple[float, float]:
    import json

    history = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    return losses[0], losses[-1]


def _capture(demo: Demo, *args: str) -> str:
    """Run a zhtune command while keeping a copy of what it prints (for the summary's figures)."""
    import contextlib
    import io

    class Tee(io.TextIOBase):
        def __init__(self, out):
            self.out, self.buf = out, io.StringIO()

        def write(self, text):
            self.buf.write(text)
            return self.out.write(text)

        def flush(self):
            self.out.flush()

    tee = Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        demo.zhtune(*args)
    return tee.buf.getvalue()


def _max_diff(printed: str) -> str:
    import re

    found = re.findall(r"max \|Δlogit\| (\S+)", printed)
    return found[-1] if found else "?"


def step_base(demo: Demo) -> str:
    """A tiny LLaMA-like English tokenizer (standing in for LLaMA's) and a random tiny Llama."""
    from zhtune.vocab.hf import write_hf_tokenizer

    sp = tiny.train_base_sp(tiny.asset_lines("en_corpus.txt"), demo.path("base_sp", "tokenizer.model"),
                            vocab_size=1000)
    write_hf_tokenizer(sp, demo.path("base_tokenizer"))
    tiny.build_tiny_model(demo.path("base_model"), vocab_size=1000, seed=0,
                          tokenizer_dir=demo.path("base_tokenizer"), **MODEL)
    return f"English BPE vocab 1000 + Llama {MODEL['num_layers']}×{MODEL['hidden_size']}"


def step_vocab(demo: Demo) -> str:
    corpus = tiny.asset("zh_corpus.txt")
    demo.zhtune("vocab", "train", "--corpus", corpus, "--vocab-size", "4000", "--output", demo.path("zh_vocab"))
    demo.zhtune("vocab", "merge", "--base", demo.path("base_tokenizer"), "--add",
                demo.path("zh_vocab", "zh_sp.model"), "--output", demo.path("tokenizer"))
    held = tiny.asset_lines("zh_heldout.txt")
    before = tokens_per_cjk(demo.path("base_tokenizer"), held)
    after = tokens_per_cjk(demo.path("tokenizer", "merged_tokenizer_hf"), held)
    return f"tokens/中文字 {before:.2f} → {after:.2f} (held-out)"


def step_pt(demo: Demo) -> str:
    demo.zhtune("train", "stage=pt", f"model_name_or_path={demo.path('base_model')}",
                f"tokenizer_name_or_path={demo.path('tokenizer', 'merged_tokenizer_hf')}",
                f"dataset={tiny.asset('zh_corpus.txt')}", "cutoff_len=128", "lora_rank=16", "lora_alpha=32",
                "learning_rate=3e-3", f"max_steps={demo.steps['pt']}", *_trained(),
                f"output_dir={demo.path('pt')}")
    printed = _capture(demo, "merge", "--lora", demo.path("pt", "pt_lora_model"), "--output",
                       demo.path("merged_pt"), "--verify")
    first, last = _losses(demo.path("pt"))
    return f"loss {first:.2f} → {last:.2f}; merge max|Δlogit| {_max_diff(printed)}"


def step_sft(demo: Demo) -> str:
    demo.zhtune("train", "stage=sft", f"model_name_or_path={demo.path('merged_pt')}",
                f"dataset={tiny.asset('sft_qa.jsonl')}", "template=chinese-alpaca", "cutoff_len=256",
                "packing=true", "lora_rank=16", "lora_alpha=32", "modules_to_save=embed_tokens,lm_head",
                "learning_rate=3e-3", f"max_steps={demo.steps['sft']}", *_trained(),
                f"output_dir={demo.path('sft')}")
    first, last = _losses(demo.path("sft"))
    return f"loss {first:.2f} → {last:.2f}"


def step_dpo(demo: Demo) -> str:
    import json

    demo.zhtune("train", "stage=dpo", f"model_name_or_path={demo.path('merged_pt')}",
                f"peft_path={demo.path('sft', 'sft_lora_model')}", f"dataset={tiny.asset('dpo_pairs.jsonl')}",
                "template=chinese-alpaca", "cutoff_len=256", "pref_beta=0.1", "learning_rate=1e-4",
                f"max_steps={demo.steps['dpo']}", *_trained("per_device_train_batch_size=4", "logging_steps=2"),
                f"output_dir={demo.path('dpo')}")
    results = json.loads(demo.path("dpo", "train_results.json").read_text(encoding="utf-8"))
    acc = next((v for k, v in results.items() if k.endswith("rewards/accuracies")), None)
    return f"reward accuracy {acc:.2f}" if isinstance(acc, (int, float)) else "done"


def step_merge(demo: Demo) -> str:
    printed = _capture(demo, "merge", "--lora", demo.path("dpo", "dpo_lora_model"), "--output",
                       demo.path("merged"), "--verify")
    return f"max|Δlogit| {_max_diff(printed)} vs base+LoRA (peft)"


def step_gguf(demo: Demo) -> str:
    printed = _capture(demo, "export", "gguf", "--model", demo.path("merged"), "--output",
                       demo.path("gguf", "zhtune-demo.f16.gguf"), "--quant", "f16", "--verify")
    return f"llama.cpp vs transformers max|Δlogit| {_max_diff(printed)}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _questions() -> list[dict]:
    import json

    rows = [json.loads(line) for line in tiny.asset_lines("sft_qa.jsonl")]
    return rows[:QUESTIONS]


def step_serve(demo: Demo) -> str:
    """`zhtune serve` on the GGUF in a child process, asked through the official OpenAI client."""
    import subprocess
    import urllib.request

    port = _free_port()
    cmd = [sys.executable, "-m", "zhtune", "serve", "--model", str(demo.path("gguf", "zhtune-demo.f16.gguf")),
           "--port", str(port), "--served-model-name", "zhtune-demo"]
    print(f"\n  $ zhtune {' '.join(shlex.quote(c) for c in cmd[3:])} &", flush=True)
    log = open(demo.path("serve.log"), "w", encoding="utf-8")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise ZhtuneError("zhtune serve did not start", where=str(demo.path("serve.log"))) from None
                time.sleep(0.5)
        return _ask(port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _ask(port: int) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    right = 0
    shown = ""
    for i, row in enumerate(_questions()):
        reply = client.chat.completions.create(
            model="zhtune-demo", messages=[{"role": "user", "content": row["instruction"]}],
            temperature=0, max_tokens=32)
        answer = (reply.choices[0].message.content or "").strip()
        ok = answer == row["output"].strip()
        right += ok
        print(f"  问 Q: {row['instruction']}\n  答 A: {answer}  {'✓' if ok else '✗ (expected ' + row['output'] + ')'}")
        if i == 0:
            shown = answer
    return f"{right}/{len(_questions())} answers right, e.g. “{shown}”"


STEPS = [
    Step("base", "基座模型 / tiny base model", step_base),
    Step("vocab", "中文词表扩充 / Chinese vocabulary", step_vocab),
    Step("pt", "继续预训练+合并 / PT (LoRA) + merge", step_pt),
    Step("sft", "指令精调 / SFT (LoRA)", step_sft),
    Step("dpo", "偏好训练 / DPO", step_dpo),
    Step("merge", "合并 / merge adapters", step_merge),
    Step("gguf", "导出 GGUF / export GGUF", step_gguf),
    Step("serve", "API 服务问答 / serve + OpenAI client", step_serve),
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


def _run_steps(demo: Demo, work: Path) -> float:
    print(f"zhtune demo — 工作目录 work folder: {work}", flush=True)
    start = time.perf_counter()
    for i, step in enumerate(STEPS, 1):
        print(f"\n[{i}/{len(STEPS)}] {step.title}", flush=True)
        t0 = time.perf_counter()
        step.figure = step.run(demo)
        step.seconds = time.perf_counter() - t0
        print(f"  ✓ {step.figure}  ({step.seconds:.1f}s)", flush=True)
    return time.perf_counter() - start


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
        zhtune demo --steps pt=20,sft=40,dpo=4          # a quicker, rougher run
        """,
    )
    parser.add_argument("--workdir", default="zhtune-demo", help="folder for everything the demo writes")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the folder of an earlier demo (never other files)")
    parser.add_argument("--steps", default="", metavar="pt=N,sft=N,dpo=N",
                        help="training steps per stage (fewer: quicker, and the answers may be wrong)")
    args = parser.parse_args(argv)
    steps = dict(Demo(Path(".")).steps)
    for item in filter(None, args.steps.split(",")):
        key, _, value = item.partition("=")
        if key not in steps or not value.isdigit() or int(value) < 1:
            raise ZhtuneError(f"cannot read --steps item {item!r}", where="--steps",
                              expected="pt=N,sft=N,dpo=N with N >= 1")
        steps[key] = int(value)
    work = Path(args.workdir).resolve()
    from zhtune.io import check_output_dir, output_lock, write_manifest

    with output_lock(work, where="--workdir"):
        # --overwrite replaces only an earlier demo's folder: one holding anything else is refused by name
        check_output_dir(work, args.overwrite, where="--workdir")
        if work.exists():
            import shutil

            shutil.rmtree(work)
        work.mkdir(parents=True)
        try:
            elapsed = _run_steps(Demo(work, steps), work)
        finally:  # the folder started empty: all it holds is the demo's, even after Ctrl-C
            write_manifest(work)
    print("\n" + _summary(STEPS, elapsed))

    def q(path) -> str:  # paths with spaces still run as printed
        return shlex.quote(str(path))

    print(f"""
作品都在 {work}，接下来试试 / everything is in {work}; try next:
  zhtune chat --model {q(work / 'merged')}   # 终端对话 chat in the terminal
  zhtune chat --model {q(work / 'gguf' / 'zhtune-demo.f16.gguf')}   # llama.cpp on CPU
  zhtune webui --model {q(work / 'merged')}   # 网页 browser chat
  zhtune serve --model {q(work / 'merged')}   # OpenAI API
  zhtune rag qa --docs {q(tiny.asset('rag_docs'))} --model {q(work / 'merged')} --question "星帆X3 的电池能用多久？"
  zhtune vocab stats --tokenizer {q(work / 'base_tokenizer')} \\
      --tokenizer {q(work / 'tokenizer' / 'merged_tokenizer_hf')} --text {q(tiny.asset('zh_heldout.txt'))}
  zhtune train examples/tiny/sft.yaml {q('model_name_or_path=' + str(work / 'merged_pt'))}   # your own recipe""")
    sys.stdout.flush()
    return 0
