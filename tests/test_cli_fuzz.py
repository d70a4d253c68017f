"""CLI fuzz: every subcommand, every front end on both backends, fed missing, misspelled, wrong-typed and
out-of-range flags and missing or wrong-kind paths (a file for a folder, a GGUF where an HF folder is
expected and back, a folder that is not a model), all under a folder whose name has spaces and Chinese.

Each case asserts what a user sees: exit code 2, the flag or path named in the output, no traceback,
and nothing new left on disk. The cases run in-process through `zhtune.cli.main` (what the console
script calls), with output captured at the file-descriptor level; a few run as real subprocesses to
prove the in-process runs are faithful.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zhtune import cli

WORLD = "工作 区 work"   # spaces and Chinese in every path a case passes


@dataclasses.dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]   # "{name}" is replaced by the path of that fixture in the world
    says: tuple[str, ...]   # each must appear in the output (a flag, a key or a path)
    xfail: str = ""         # a known failure: the reason (strict: it must still fail)


def case(argv: str | list[str], *says: str, xfail: str = "") -> Case:
    words = argv.split(" ") if isinstance(argv, str) else argv
    return Case(tuple(words), tuple(says), xfail)


# --- the world every case runs in ------------------------------------------------------------------

def _adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter folder as `zhtune train` writes it (adapter + tokenizer + run.yaml beside it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from zhtune.io import write_run_yaml

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    folder = out / "sft_lora_model"
    model.save_pretrained(str(folder))
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, folder / f.name)
    write_run_yaml(out, "sft", {"model_name_or_path": str(base), "stage": "sft"}, parents={"model": str(base)})
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, base_sp_model, base_tokenizer_dir, zh_corpus) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz") / WORLD
    root.mkdir()
    w = {"root": root, "cwd": root / "当前 cwd", "model": root / "模型 model", "tokenizer": root / "分词器 tok",
         "sp": root / "词表 zh.model", "notes": root / "笔记 notes.txt", "empty": root / "空 目录",
         "notmodel": root / "不是模型 not a model", "fakegguf": root / "坏 bad.gguf",
         "corpus": root / "语料 corpus.txt", "docs": root / "文档 docs", "missing": root / "缺失 missing",
         "out": root / "输出 out", "badyaml": root / "坏 bad.yaml", "badjson": root / "坏 bad.json",
         "listjson": root / "列表 list.json", "prompts": root / "提示 prompts.json",
         "sft": root / "指令 sft.jsonl", "heldout": root / "留出 heldout.txt"}
    w["cwd"].mkdir()
    shutil.copytree(tiny_model_dir, w["model"])
    shutil.copytree(base_tokenizer_dir, w["tokenizer"])
    shutil.copyfile(base_sp_model, w["sp"])
    w["notes"].write_text("这不是模型。not a model\n", encoding="utf-8")
    w["empty"].mkdir()
    w["notmodel"].mkdir()
    (w["notmodel"] / "readme.txt").write_text("照片 photos\n", encoding="utf-8")
    w["fakegguf"].write_bytes(b"GGUF\x03\x00\x00\x00 truncated, not a model")
    shutil.copyfile(zh_corpus, w["corpus"])
    w["docs"].mkdir()
    (w["docs"] / "说明 manual.txt").write_text("星帆X3 的电池可以使用十小时。\n" * 20, encoding="utf-8")
    w["badyaml"].write_text("stage: [sft\nlearning_rate: 1\n", encoding="utf-8")
    w["badjson"].write_text('{"dim": 64, "n_layers": ', encoding="utf-8")
    w["listjson"].write_text("[1, 2, 3]", encoding="utf-8")
    w["prompts"].write_text('["你好"]', encoding="utf-8")
    w["sft"].write_text("".join(json.dumps({"instruction": f"第{i}题", "output": "答案。"}, ensure_ascii=False) + "\n"
                                for i in range(4)), encoding="utf-8")
    w["heldout"].write_text("中国的首都是北京。\nThe capital of China is Beijing.\n", encoding="utf-8")
    w["adapter"] = _adapter(w["model"], root / "训练 run")
    for name, params in (("meta", '{"dim": 64, "n_layers": 2, "n_heads": 4, "norm_eps": 1e-5, "vocab_size": -1}'),
                         ("badmeta", '{"dim": 64, "n_layers": ')):   # malformed JSON
        w[name] = root / f"元 {name}"
        w[name].mkdir()
        (w[name] / "params.json").write_text(params, encoding="utf-8")
        (w[name] / "consolidated.00.pth").write_bytes(b"")   # never read: the flags are checked first
        shutil.copyfile(base_sp_model, w[name] / "tokenizer.model")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        w["gguf"] = None
    else:
        from zhtune.export.gguf import export_gguf

        w["gguf"] = export_gguf(w["model"], root / "模型 model.f16.gguf", quant="f16", modelfile=False,
                                log=lambda *a: None)
    return w


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _remove_new(root: Path, new: set[str]) -> None:
    for name in sorted(new, key=len):
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _expand(words: tuple[str, ...], w: dict[str, Path]) -> list[str]:
    out = []
    for word in words:
        for name, path in w.items():
            word = word.replace("{" + name + "}", str(path))
        out.append(word)
    return out


def _run(argv: list[str], capfd) -> tuple[int, str]:
    """zhtune.cli.main in this process, as the console script runs it; (exit code, all output)."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:   # argparse's own errors and --help
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capfd.readouterr()
    return code, captured.out + captured.err


def check(c: Case, world, capfd, monkeypatch) -> None:
    if "{gguf}" in " ".join(c.argv) and world["gguf"] is None:
        pytest.skip("llama-cpp-python is not installed")
    monkeypatch.chdir(world["cwd"])
    monkeypatch.delenv("ZHTUNE_DEBUG", raising=False)
    argv = _expand(c.argv, world)
    before = _tree(world["root"])
    try:
        code, output = _run(argv, capfd)
    finally:
        after = _tree(world["root"])
        _remove_new(world["root"], after - before)   # a failing case must not change what the next one sees
    shown = f"zhtune {' '.join(argv)}\n{output[-3000:]}"
    assert "Traceback" not in output, shown
    assert code == 2, f"exit {code}: {shown}"
    for text in _expand(c.says, world):
        assert text in output, f"{text!r} not named: {shown}"
    assert after == before, f"left on disk: {sorted(after - before)}, removed: {sorted(before - after)}"


# --- the cases --------------------------------------------------------------------------------------

REQUIRED = "the following arguments are required"

VOCAB = [
    case("vocab train", REQUIRED, "--corpus"),
    case("vocab train --corpus {corpus} --vocab-size abc --output {out}", "--vocab-size"),
    case("vocab train --corpus {corpus} --vocab-size 0 --output {out}", "--vocab-size"),
    case("vocab train --corpus {corpus} --vocab-size -5 --output {out}", "--vocab-size"),
    case("vocab train --corpus {corpus} --vocab-sise 3000 --output {out}", "--vocab-sise", "--vocab-size"),
    case("vocab train --corpus {missing} --vocab-size 3000 --output {out}", "{missing}"),
    case("vocab train --corpus {empty} --vocab-size 3000 --output {out}", "{empty}"),
    case("vocab train --corpus {corpus} --vocab-size 3000 --output {notes}", "{notes}"),
    case("vocab train --corpus {corpus} --vocab-size 3000 --output {notmodel}", "{notmodel}"),
    case("vocab train --corpus {corpus} --vocab-size 3000 --output {out} --model-type wordpiece", "--model-type"),
    case("vocab train --corpus {corpus} --vocab-size 3000 --output {out} --character-coverage 2",
         "--character-coverage"),
    case("vocab train --corpus {corpus} --vocab-size 3000 --output {out} --character-coverage x",
         "--character-coverage"),
    case("vocab train --corpus {corpus} --vocab-size 3000 --output {out} --max-sentences 0", "--max-sentences"),
    case("vocab train --corpus {corpus} --vocab-size 3000 --output {out} --threads 0", "--threads"),
    case("vocab train --corpus {corpus} --vocab-size 3000 --output {out} --max-line-bytes -1", "--max-line-bytes"),
    case("vocab train --corpus {corpus} --vocab-size 3000 --output {out} --base {notmodel}", "{notmodel}"),
    case("vocab train --corpus {corpus} --vocab-size 3000 --output {out} --base {gguf}", "{gguf}"),
    case("vocab train --corpus {corpus} --vocab-size 3000 --output {out} --base {missing}", "{missing}"),
    case("vocab merge", REQUIRED, "--base"),
    case("vocab merge --base {missing} --add {sp} --output {out}", "{missing}"),
    case("vocab merge --base {gguf} --add {sp} --output {out}", "{gguf}"),
    case("vocab merge --base {notmodel} --add {sp} --output {out}", "{notmodel}"),
    case("vocab merge --base {notes} --add {sp} --output {out}", "{notes}"),
    case("vocab merge --base {model} --add {notes} --output {out}", "{notes}"),
    case("vocab merge --base {model} --add {missing} --output {out}", "{missing}"),
    case("vocab merge --base {model} --add {gguf} --output {out}", "{gguf}"),
    case("vocab merge --base {model} --add {sp} --output {notes}", "{notes}"),
    case("vocab merge --base {model} --add {sp} --output {out} --mode everything", "--mode"),
    case("vocab merge --base {model} --output {out} --mode chars --chars ZZZZ-1", "--chars"),
    case("vocab merge --base {model} --add {sp} --output {out} --cjk-ranges nonsense", "--cjk-ranges"),
    case("vocab merge --base {model} --add {sp} --output {out} --check-text {missing}", "{missing}"),
    case("vocab merge --base {model} --add {sp} --output {out} --check-text {empty}", "{empty}"),
    case("vocab merge --base {model} --add {sp} --outptu {out}", "--outptu"),
    case("vocab stats", REQUIRED, "--tokenizer"),
    case("vocab stats --tokenizer {missing} --text {corpus}", "{missing}"),
    case("vocab stats --tokenizer {notmodel} --text {corpus}", "{notmodel}"),
    case("vocab stats --tokenizer {gguf} --text {corpus}", "{gguf}"),
    case("vocab stats --tokenizer {notes} --text {corpus}", "{notes}"),
    case("vocab stats --tokenizer {tokenizer} --text {missing}", "{missing}"),
    case("vocab stats --tokenizer {tokenizer} --text {empty}", "{empty}"),
    case("vocab stats --tokenizer {tokenizer} --text {corpus} --json {notmodel}", "{notmodel}"),
    case("vocab stats --tokenizer {tokenizer} --txet {corpus}", "--txet"),
    case("vocab trian", "vocab train"),
]

CONVERT = [
    case("convert meta", REQUIRED, "--input"),
    case("convert meta --input {missing} --output {out}", "{missing}"),
    case("convert meta --input {model} --output {out}", "params.json"),
    case("convert meta --input {notes} --output {out}", "{notes}"),
    case("convert meta --input {notmodel} --output {out}", "{notmodel}"),
    case("convert meta --input {badmeta} --output {out}", "params.json"),
    case("convert meta --input {meta} --output {out}", "consolidated.00.pth"),
    case("convert meta --input {meta} --output {notes}", "{notes}"),
    case("convert meta --input {meta} --output {out} --dtype float8", "--dtype"),
    case("convert meta --input {meta} --output {out} --max-shard-size abc", "abc"),
    case("convert meta --input {meta} --output {out} --max-shard-size=-1GB", "-1GB"),
    case("convert meta --input {meta} --output {out} --context-length 0", "--context-length"),
    case("convert meta --input {meta} --output {out} --context-length abc", "--context-length"),
    case("convert meta --inptu {meta} --output {out}", "--inptu"),
    case("convert mega", "convert meta"),
]

TRAIN_BASE = "train stage=sft model_name_or_path={model} dataset={sft} output_dir={out} max_steps=1"
TRAIN = [
    case("train learnig_rate=1e-4 model_name_or_path={model} output_dir={out}", "learnig_rate", "learning_rate"),
    case(TRAIN_BASE + " max_steps=abc", "max_steps"),
    case(TRAIN_BASE + " max_steps=-5", "max_steps"),
    case(TRAIN_BASE + " max_steps=0", "max_steps"),
    case(TRAIN_BASE + " warmup_ratio=10", "warmup_ratio"),
    case(TRAIN_BASE + " learning_rate=-1", "learning_rate"),
    case(TRAIN_BASE + " lora_rank=0", "lora_rank"),
    case(TRAIN_BASE + " cutoff_len=zero", "cutoff_len"),
    case(TRAIN_BASE + " stage=rlhf", "stage"),
    case(TRAIN_BASE + " finetuning_type=half", "finetuning_type"),
    case(TRAIN_BASE + " quantization_bit=3", "quantization_bit"),
    case(TRAIN_BASE + " template=chinese-alpacca", "template", "chinese-alpaca"),
    case(TRAIN_BASE + " val_size=-1", "val_size"),
    case(TRAIN_BASE + " bf16=maybe", "bf16"),
    case(TRAIN_BASE + " streaming=true", "streaming", "stage=pt"),                     # pt only
    case(TRAIN_BASE.replace("stage=sft", "stage=dpo") + " streaming=true", "streaming", "stage=pt"),
    case([*TRAIN_BASE.split(" "), "training_args={warmup_ratioo: 0.1}"], "training_args.warmup_ratioo"),
    case("train stage=sft model_name_or_path={missing} dataset={sft} output_dir={out}", "model_name_or_path"),
    case("train stage=sft model_name_or_path={gguf} dataset={sft} output_dir={out}", "model_name_or_path"),
    case("train stage=sft model_name_or_path={notmodel} dataset={sft} output_dir={out}", "model_name_or_path"),
    case("train stage=sft model_name_or_path={notes} dataset={sft} output_dir={out}", "model_name_or_path"),
    case("train stage=sft model_name_or_path={adapter} dataset={sft} output_dir={out}", "model_name_or_path"),
    case("train stage=sft model_name_or_path={model} dataset={missing} output_dir={out}", "{missing}"),
    case("train stage=sft model_name_or_path={model} dataset={empty} output_dir={out}", "{empty}"),
    case("train stage=sft model_name_or_path={model} dataset={sft} output_dir={notes}", "output_dir"),
    case("train stage=sft model_name_or_path={model} dataset={sft} output_dir={notmodel}", "output_dir"),
    case("train stage=sft model_name_or_path={model} dataset={sft}", "output_dir"),
    case(TRAIN_BASE + " tokenizer_name_or_path={gguf}", "tokenizer_name_or_path"),
    case(TRAIN_BASE + " tokenizer_name_or_path={notmodel}", "tokenizer_name_or_path"),
    case(TRAIN_BASE + " peft_path={notmodel}", "peft_path"),
    case(TRAIN_BASE + " peft_path={missing}", "peft_path"),
    case(TRAIN_BASE + " deepspeed={missing}", "deepspeed"),
    case(TRAIN_BASE + " resume_from_checkpoint={notmodel}", "resume_from_checkpoint"),
    case("train {badyaml}", "{badyaml}"),
    case("train {missing}.yaml", "{missing}.yaml"),
    case("train {notes} max_steps=1", "{notes}"),
    case("train --help-confg", "--help-confg"),
]

MERGE = [
    case("merge", REQUIRED, "--lora"),
    case("merge --lora {missing} --output {out}", "{missing}"),
    case("merge --lora {notmodel} --output {out}", "{notmodel}"),
    case("merge --lora {model} --output {out}", "{model}"),
    case("merge --lora {gguf} --output {out}", "{gguf}"),
    case("merge --lora {notes} --output {out}", "{notes}"),
    case("merge --lora {adapter} --base {gguf} --output {out}", "{gguf}"),
    case("merge --lora {adapter} --base {notmodel} --output {out}", "{notmodel}"),
    case("merge --lora {adapter} --base {missing} --output {out}", "{missing}"),
    case("merge --lora {adapter} --output {notes}", "{notes}"),
    case("merge --lora {adapter} --output {model}", "{model}"),
    case("merge --lora {adapter} --output {out} --format gguf", "--format"),
    case("merge --lora {adapter} --output {out} --dtype int4", "--dtype"),
    case("merge --lora {adapter} --output {out} --max-shard-size 0", "--max-shard-size"),
    case("merge --lora {adapter} --output {out} --format pth --num-shards 0", "--num-shards"),
    case("merge --lora {adapter} --output {out} --num-shards abc", "--num-shards"),
    case("merge --lora {adapter} --ouput {out}", "--ouput"),
]

EXPORT = [
    case("export gguf", REQUIRED, "--model"),
    case("export gguf --model {missing} --output {out}.gguf", "{missing}"),
    case("export gguf --model {gguf} --output {out}.gguf", "{gguf}"),
    case("export gguf --model {notmodel} --output {out}.gguf", "{notmodel}"),
    case("export gguf --model {notes} --output {out}.gguf", "{notes}"),
    case("export gguf --model {adapter} --output {out}.gguf", "{adapter}"),
    case("export gguf --model {model} --output {out}.gguf --quant q3_bogus", "--quant"),
    case("export gguf --model {model} --output {notmodel}", "{notmodel}"),
    case("export gguf --model {model} --output {notmodel} --overwrite", "{notmodel}"),
    case("export gguf --model {model} --output {gguf}", "{gguf}"),
    case("export gguf --model {model} --outptu {out}.gguf", "--outptu"),
    case("export ggfu", "export gguf"),
]

ESTIMATE = [
    case("estimate model_name_or_path={model} --gpu-memory -5", "--gpu-memory"),
    case("estimate model_name_or_path={model} --gpu-memory abc", "--gpu-memory"),
    case("estimate model_name_or_path={model} --vocab-size 0", "--vocab-size"),
    case("estimate model_name_or_path={model} --num-gpus 0", "--num-gpus"),
    case("estimate model_name_or_path={model} --vocab-size abc", "--vocab-size"),
    case("estimate model_name_or_path={missing}", "model_name_or_path"),
    case("estimate model_name_or_path={notmodel}", "model_name_or_path"),
    case("estimate model_name_or_path={gguf}", "{gguf}"),
    case("estimate model_name_or_path={notes}", "{notes}"),
    case("estimate model_name_or_path=llama-7b lora_rnak=8", "lora_rnak"),
    case("estimate model_name_or_path=llama-7b max_steps=-5", "max_steps"),
    case("estimate model_name_or_path=llama-7b deepspeed={missing}", "deepspeed"),
    case("estimate model_name_or_path=llama-7b deepspeed={badjson}", "{badjson}"),
    case("estimate {badyaml}", "{badyaml}"),
    case("estimate model_name_or_path=llama-7b --gpu-memroy 24", "--gpu-memroy"),
]

DEMO = [
    case("demo --steps pt=abc", "--steps"),
    case("demo --steps pt=0", "--steps"),
    case("demo --steps pt=-1", "--steps"),
    case("demo --steps xx=1", "--steps"),
    case("demo --workdir {notes}", "{notes}"),
    case("demo --workdir {notmodel}", "{notmodel}"),
    case("demo --stpes pt=1", "--stpes"),
]

# front ends: the same bad model / engine / sampling flags on each backend
FRONT_ENDS = {   # front end -> the argv that makes it do one thing (nothing interactive)
    "chat": "chat --prompt-file {prompts}",
    "webui": "webui",
    "serve": "serve",
    "rag qa": "rag qa --docs {docs} --question 电池",
    "rag summarize": "rag summarize --docs {docs}",
    "eval": "eval --task ppl --data {heldout}",
}
BACKENDS = {"hf": "{model}", "llamacpp": "{gguf}"}
SAMPLING = [("--temperature -1", "--temperature"), ("--temperature abc", "--temperature"),
            ("--top-p 0", "--top-p"), ("--top-p 1.5", "--top-p"), ("--top-k -1", "--top-k"),
            ("--max-new-tokens 0", "--max-new-tokens"), ("--max-new-tokens many", "--max-new-tokens"),
            ("--repetition-penalty 0", "--repetition-penalty"), ("--seed x", "--seed")]
ENGINE = [("--threads 0", "--threads"), ("--threads-batch x", "--threads-batch"),
          ("--context-length -1", "--context-length"), ("--num-gpus 0", "--num-gpus"), ("--dtype fp8", "--dtype"),
          ("--backend onnx", "--backend"), ("--lora {missing}", "{missing}"), ("--lora {notmodel}", "{notmodel}"),
          ("--template nope", "nope"), ("--temprature 0.5", "--temprature")]
WRONG_MODELS = [("{missing}", "{missing}"), ("{notmodel}", "{notmodel}"), ("{notes}", "{notes}"),
                ("{empty}", "{empty}"), ("{fakegguf}", "{fakegguf}"), ("{tokenizer}", "{tokenizer}")]
PER_FRONT_END = {
    "webui": [("--port 0", "--port"), ("--port 70000", "--port"), ("--port http", "--port")],
    "serve": [("--port 0", "--port"), ("--port abc", "--port"), ("--max-concurrency 0", "--max-concurrency"),
              ("--max-queue -1", "--max-queue"), ("--max-body-bytes -1", "--max-body-bytes"),
              ("--max-body-bytes lots", "--max-body-bytes"), ("--log-level loud", "--log-level")],
    "chat": [("--prompt-file {missing}", "{missing}"), ("--prompt-file {badjson}", "{badjson}"),
             ("--prompt-file {empty}", "{empty}"), ("--prompt-file {listjson}", "{listjson}")],
    "rag qa": [("--top-k 0", "--top-k"), ("--chunk-size 0", "--chunk-size"), ("--chunk-overlap -1", "--chunk-overlap"),
               ("--chunk-size 100 --chunk-overlap 100", "--chunk-overlap"), ("--retrieval psychic", "--retrieval"),
               ("--chain map", "--chain"), ("--embedding {missing}", "{missing}"),
               ("--embedding {notmodel}", "{notmodel}"), ("--index {notes}", "{notes}")],
    "rag summarize": [("--chunk-size 0", "--chunk-size"), ("--chunk-overlap -1", "--chunk-overlap"),
                      ("--chain mapreduce", "--chain")],
    "eval": [("--task bogus", "--task"), ("--limit 0", "--limit"), ("--shots -1", "--shots"),
             ("--mode guess", "--mode"), ("--output {notmodel}", "{notmodel}"), ("--split nope", "--split"),
             ("--task ceval --data {notes}", "{notes}"), ("--task ceval --data {empty}", "{empty}"),
             ("--task ceval --data {docs} --subjects nope", "nope"), ("--task generate --data {sft}", "--output"),
             ("--task ppl --data {missing}", "{missing}"), ("--task ppl --data {empty}", "{empty}")],
}


def _front_end_cases() -> list[tuple[str, Case]]:
    out = []
    for fe, head in FRONT_ENDS.items():
        for backend, model in BACKENDS.items():
            for flags, says in SAMPLING + ENGINE + PER_FRONT_END.get(fe, []):
                if backend == "llamacpp" and flags.startswith("--lora"):
                    says = "--lora"   # any adapter on a GGUF is refused before it is read
                out.append((f"{fe}-{backend}-{flags}", case(f"{head} --model {model} {flags}".split(" "), says)))
            # the model on the other backend, and an adapter on a GGUF
            other = "llamacpp" if backend == "hf" else "hf"
            out.append((f"{fe}-{backend}-backend-{other}",
                        case(f"{head} --model {model} --backend {other}".split(" "), "--backend")))
        out.append((f"{fe}-llamacpp-lora", case(f"{head} --model {{gguf}} --lora {{adapter}}".split(" "), "--lora")))
        for model, says in WRONG_MODELS:
            out.append((f"{fe}-model-{model}", case(f"{head} --model {model}".split(" "), says)))
        out.append((f"{fe}-no-model", case(head.split(" "), "--model")))
    return out


SIMPLE = [(" ".join(c.argv), c) for c in VOCAB + CONVERT + TRAIN + MERGE + EXPORT + ESTIMATE + DEMO]
ALL = SIMPLE + _front_end_cases() + [
    ("rag qa no question", case("rag qa --docs {docs} --model {model}", "--question")),
    ("rag qa docs missing", case("rag qa --docs {missing} --model {model} --question q", "{missing}")),
    ("rag qa docs empty", case("rag qa --docs {empty} --model {model} --question q", "{empty}")),
    ("rag qa model and api", case("rag qa --docs {docs} --model {model} --api-base http://127.0.0.1:9 --question q",
                                  "--api-base")),
    ("rag summarize docs missing", case("rag summarize --docs {missing} --model {model}", "{missing}")),
    ("rag", case("rag aq", "rag qa")),
    ("chat model without a value", case("chat --model", "--model")),
    ("serve port without a value", case("serve --model {model} --port", "--port")),
    ("eval task without a value", case("eval --model {model} --data {heldout} --task", "--task")),
]


def _param(name: str, c: Case):
    marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
    return pytest.param(c, id=name.replace("{", "").replace("}", ""), marks=marks)


@pytest.mark.timeout(120)   # a case that slipped through would start a server or a training run
@pytest.mark.parametrize("c", [_param(name, c) for name, c in ALL])
def test_bad_input_is_named_with_exit_2(c, world, capfd, monkeypatch):
    check(c, world, capfd, monkeypatch)


def test_every_subcommand_is_fuzzed():
    fuzzed = {" ".join(c.argv[:2]) if " ".join(c.argv[:2]) in cli.COMMANDS else c.argv[0] for _, c in ALL}
    assert set(cli.COMMANDS) <= fuzzed, set(cli.COMMANDS) - fuzzed


# --- the same through the real console entry point: in-process runs are faithful ---------------------

@pytest.mark.parametrize("argv, says", [
    ("rag qa --docs {docs} --model {gguf} --question 电池 --threads 0", "--threads"),
    ("chat --model {gguf} --temperature -1", "--temperature"),
    ("serve --model {missing}", "{missing}"),
    ("train stage=sft model_name_or_path={model} dataset={sft} output_dir={out} warmup_ratio=10", "warmup_ratio"),
])
def test_console_entry_point_agrees(argv, says, world):
    c = case(argv, says)
    if "{gguf}" in argv and world["gguf"] is None:
        pytest.skip("llama-cpp-python is not installed")
    before = _tree(world["root"])
    proc = subprocess.run([sys.executable, "-m", "zhtune", *_expand(c.argv, world)], capture_output=True,
                          text=True, timeout=300, cwd=world["cwd"],
                          env={**os.environ, "ZHTUNE_DEBUG": "0"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in output, output
    assert _expand(c.says, world)[0] in output
    assert _tree(world["root"]) == before


def test_world_paths_have_spaces_and_chinese(world):
    assert " " in str(world["model"]) and "模型" in str(world["model"])
    assert json.loads(world["listjson"].read_text()) == [1, 2, 3]
