"""`zhtune vocab train`: stream a Chinese corpus and train a vocabulary to merge into a base.

    zhtune vocab train --corpus corpus/ --vocab-size 20000 --output zh_vocab/                 # SentencePiece
    zhtune vocab train --corpus corpus/ --vocab-size 20000 --base Llama-3.2-1B --output zh/  # byte-level BPE

Without --base (or with a SentencePiece base): DIR/zh_sp.model, .vocab, with defaults that suit Chinese and
merging into LLaMA: BPE, byte fallback, digits split one by one, the identity normaliser (full-width
characters stay as they are, so decode(encode(x)) == x). With a byte-level BPE base (LLaMA-3, Qwen, SmolLM,
Mistral-Nemo): DIR/tokenizer.json, a BPE in the base's byte alphabet with its normaliser and pre-tokenizer.
"""

from __future__ import annotations

import json
import random
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from zhtune.args import make_parser
from zhtune.errors import ZhtuneError
from zhtune.io import atomic_output_dir, atomic_write_bytes, atomic_write_json, write_run_yaml
from zhtune.vocab.hf import read_sp_model

SUFFIXES = (".txt", ".json", ".jsonl")
SEED = 42


@dataclass
class CorpusReport:
    """What reading the corpus kept and skipped (first offending file:line for each kind)."""

    files: int = 0
    lines: int = 0  # usable sentences seen
    kept: int = 0  # sentences given to sentencepiece (after sampling)
    skipped_not_utf8: int = 0
    skipped_too_long: int = 0
    skipped_files: int = 0  # files in folders with other suffixes
    first_not_utf8: str | None = None
    first_too_long: str | None = None


def corpus_files(paths: list[str], report: CorpusReport) -> list[Path]:
    """Files of the corpus, sorted (folders recursively: .txt, .json, .jsonl)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise ZhtuneError(f"corpus path does not exist: {raw}", where="--corpus",
                              expected="a .txt/.json/.jsonl file or a folder of them")
        if path.is_file():
            files.append(path)
            continue
        found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        report.skipped_files += sum(1 for p in found if p.suffix.lower() not in SUFFIXES)
        files += [p for p in found if p.suffix.lower() in SUFFIXES]
    if not files:
        raise ZhtuneError(f"no corpus files in {' '.join(paths)}", where="--corpus",
                          expected="files ending in .txt, .json or .jsonl")
    return files


def _decode(raw: bytes, where: str, report: CorpusReport) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        report.skipped_not_utf8 += 1
        report.first_not_utf8 = report.first_not_utf8 or where
        return None


def _field(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise ZhtuneError(f"record has no {text_field!r} field (it has: {keys})", where=where,
                          expected=f"a JSON object with a string field {text_field!r}",
                          hint="choose the field with --text-field")
    value = record[text_field]
    if not isinstance(value, str):
        raise ZhtuneError(f"field {text_field!r} is {type(value).__name__}, not text", where=where,
                          expected="a string")
    return value


def file_texts(path: Path, text_field: str, report: CorpusReport) -> Iterator[tuple[str, str]]:
    """(text, "file:line") for each document of one file, read line by line (json arrays: whole)."""
    suffix = path.suffix.lower()
    with path.open("rb") as handle:
        head = handle.read(64).lstrip()
        handle.seek(0)
        if suffix == ".json" and head.startswith(b"["):
            try:
                records = json.loads(handle.read().decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise ZhtuneError(f"cannot parse JSON: {exc}", where=str(path),
                                  expected="a JSON array of objects, or one JSON object per line") from None
            for i, record in enumerate(records):
                yield _field(record, text_field, f"{path}[{i}]"), f"{path}[{i}]"
            return
        for number, raw in enumerate(handle, 1):
            where = f"{path}:{number}"
            text = _decode(raw, where, report)
            if text is None or not text.strip():
                continue
            if suffix in (".json", ".jsonl"):
                try:
                    record = json.loads(text)
                except ValueError as exc:
                    raise ZhtuneError(f"not valid JSON: {exc}", where=where,
                                      expected="one JSON object per line (jsonl)") from None
                text = _field(record, text_field, where)
            yield text, where


def stream_sentences(files: list[Path], text_field: str, max_bytes: int, report: CorpusReport) -> Iterator[str]:
    """Every usable sentence (a document's non-empty lines), counting what is skipped; with progress."""
    from tqdm import tqdm

    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="读取语料 reading corpus", file=sys.stderr,
              disable=None, leave=False) as bar:
        for path in files:
            report.files += 1
            for text, where in file_texts(path, text_field, report):
                for line in text.splitlines():
                    line = line.strip("\r")
                    if not line.strip():
                        continue
                    if len(line.encode("utf-8")) > max_bytes:
                        report.skipped_too_long += 1
                        report.first_too_long = report.first_too_long or where
                        continue
                    report.lines += 1
                    yield line
            bar.update(path.stat().st_size)


def sample(sentences: Iterator[str], limit: int, seed: int = SEED) -> list[str]:
    """At most `limit` sentences, a uniform sample (reservoir, fixed seed), in corpus order."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, line in enumerate(sentences):
        if i < limit:
            reservoir.append((i, line))
        else:
            j = rng.randrange(i + 1)
            if j < limit:
                reservoir[j] = (i, line)
    reservoir.sort()
    return [line for _, line in reservoir]


def sp_options(args, n_sentences: int) -> dict:
    """SentencePiece trainer options: Chinese-friendly and LLaMA-compatible (<unk>,<s>,</s> = 0,1,2)."""
    return dict(
        vocab_size=args.vocab_size, model_type=args.model_type, character_coverage=args.character_coverage,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=args.max_line_bytes,
        num_threads=args.threads, minloglevel=2,
    )


def _explain_sp_error(exc: Exception, args) -> ZhtuneError:
    text = str(exc)
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", text)
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", text)
    if too_high:
        return ZhtuneError(f"the corpus cannot support --vocab-size {args.vocab_size}", where="--vocab-size",
                           expected=f"at most {too_high.group(2)} for this corpus",
                           hint="use a smaller --vocab-size or a bigger corpus")
    if too_small:
        return ZhtuneError(f"--vocab-size {args.vocab_size} is smaller than the {too_small.group(2)} pieces "
                           "the corpus needs (its characters, 256 byte pieces, <unk> <s> </s>)",
                           where="--vocab-size", expected=f"at least {too_small.group(2)}",
                           hint="raise --vocab-size or lower --character-coverage")
    return ZhtuneError(f"SentencePiece training failed: {text}", where="--corpus",
                       expected="a corpus and options SentencePiece accepts")


def train_sp(sentences: list[str], args, prefix: Path) -> float:
    """Train in a thread while showing elapsed time; writes prefix.model and prefix.vocab. Returns seconds.

    The model goes through model_writer (not model_prefix, which sentencepiece would record in the
    model with our temp folder's name), so the same corpus and options give the same bytes.
    """
    import io

    import sentencepiece as spm
    from tqdm import tqdm

    spm.set_random_generator_seed(SEED)
    errors: list[BaseException] = []
    buf = io.BytesIO()

    def work():
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf,
                                           **sp_options(args, len(sentences)))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    start = time.perf_counter()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    with tqdm(desc=f"训练 training {args.model_type} {args.vocab_size}", bar_format="{desc}: {elapsed}",
              file=sys.stderr, disable=None, leave=False) as bar:
        while thread.is_alive():
            thread.join(0.5)
            bar.refresh()
    if errors:
        raise _explain_sp_error(errors[0], args) if isinstance(errors[0], RuntimeError) else errors[0]
    atomic_write_bytes(prefix.with_suffix(".model"), buf.getvalue())
    proto = read_sp_model(prefix.with_suffix(".model"))
    # sentencepiece's .vocab format: piece TAB score (C++ default float formatting, as %g)
    vocab = "".join(f"{p.piece}\t{p.score:g}\n" for p in proto.pieces)
    atomic_write_bytes(prefix.with_suffix(".vocab"), vocab.encode("utf-8"))
    return time.perf_counter() - start


EXAMPLES = """
# 用中文语料训练 2 万词表 / a 20k Chinese vocabulary from a folder of .txt/.jsonl files
zhtune vocab train --corpus corpus/ --vocab-size 20000 --output zh_vocab/
# jsonl 的 content 字段，最多采样 50 万句 / the "content" field of jsonl files, sampled to 500k sentences
zhtune vocab train --corpus news.jsonl wiki.jsonl --text-field content --vocab-size 20000 \\
    --max-sentences 500000 --threads 8 --output zh_vocab/
# 然后 / then: zhtune vocab merge --base llama2/ --add zh_vocab/zh_sp.model --output merged/
# 字节级 BPE 基座 (LLaMA-3.x, Qwen) / in a byte-level base's own alphabet and pre-tokenizer: tokenizer.json
zhtune vocab train --corpus corpus/ --vocab-size 20000 --base Llama-3.2-1B/ --output zh_bpe/
"""


def build_parser():
    p = make_parser("vocab train", """
        训练中文词表 / train a Chinese vocabulary: SentencePiece, or with --base a byte-level BPE base,
        a byte-level BPE in that base's alphabet, normaliser and pre-tokenizer (tokenizer.json).

        Reads .txt (a document per line), .json/.jsonl (the --text-field of each record) and folders
        (recursively), one line at a time; samples at most --max-sentences sentences; skips and counts
        lines that are not UTF-8 or longer than --max-line-bytes. Writes DIR/zh_sp.model,
        DIR/zh_sp.vocab, DIR/corpus_report.json and DIR/run.yaml. Defaults: BPE, byte fallback,
        split digits, identity normalisation (full-width text round-trips exactly).""", EXAMPLES)
    p.add_argument("--corpus", nargs="+", required=True, metavar="PATH", help="files or folders")
    p.add_argument("--vocab-size", type=int, required=True, help="pieces in the model (e.g. 20000)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                   help="bpe merges into LLaMA exactly; unigram for other uses")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters covered by pieces; the rest fall back to bytes")
    p.add_argument("--max-sentences", type=int, default=1_000_000,
                   help="sample at most this many sentences (uniformly, fixed seed)")
    p.add_argument("--threads", type=int, default=16,
                   help="trainer threads (sentencepiece's default; the count changes how ties are broken, "
                        "so keep it fixed for reproducible vocabularies)")
    p.add_argument("--text-field", default="text", help="field of .json/.jsonl records holding the text")
    p.add_argument("--max-line-bytes", type=int, default=16384, help="skip longer lines (counted)")
    p.add_argument("--base", default=None, metavar="TOKENIZER",
                   help="the base the vocabulary will be merged into: a byte-level BPE base (tokenizer.json) "
                        "gets tokens in its own byte alphabet and pre-tokenizer; SentencePiece or none: zh_sp.model")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output folder an earlier zhtune run wrote (never other files)")
    return p


def _check_args(args) -> None:
    if args.vocab_size < 300:
        raise ZhtuneError(f"--vocab-size {args.vocab_size} is too small", where="--vocab-size",
                          expected="at least 300 (256 byte pieces, <unk> <s> </s> and some characters)")
    if not 0.9 <= args.character_coverage <= 1.0:
        raise ZhtuneError(f"--character-coverage {args.character_coverage}", where="--character-coverage",
                          expected="between 0.9 and 1.0 (0.9995 for Chinese)")
    if args.max_sentences < 1:
        raise ZhtuneError("--max-sentences must be positive", where="--max-sentences", expected="e.g. 1000000")
    if args.max_line_bytes < 16:
        raise ZhtuneError("--max-line-bytes is too small", where="--max-line-bytes", expected="e.g. 16384")
    if args.threads < 1:
        raise ZhtuneError("--threads must be positive", where="--threads", expected="e.g. 16")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    base = bytelevel_base(args)  # before reading the corpus: a wrong --base fails at once
    start = time.perf_counter()
    report = CorpusReport()
    files = corpus_files(args.corpus, report)
    sentences = sample(stream_sentences(files, args.text_field, args.max_line_bytes, report), args.max_sentences)
    report.kept = len(sentences)
    read_seconds = time.perf_counter() - start
    if not sentences:
        raise ZhtuneError(f"the corpus has no text ({report.files} files)", where=" ".join(args.corpus),
                          expected="non-empty UTF-8 lines",
                          hint=_skips(report) or "the files are empty")
    print(f"语料 corpus: {report.files} files, {report.lines} sentences, {report.kept} used "
          f"({read_seconds:.1f}s){'; ' + _skips(report) if _skips(report) else ''}", flush=True)
    with atomic_output_dir(args.output, args.overwrite) as tmp:
        if base is not None:
            seconds, written = train_bpe(sentences, args, base, tmp), "tokenizer.json"
        else:
            seconds, written = train_sp(sentences, args, tmp / "zh_sp"), "zh_sp.model"
        atomic_write_json(tmp / "corpus_report.json", vars(report))
        config = {k: v for k, v in vars(args).items() if k != "overwrite"}
        write_run_yaml(tmp, "vocab train", config, parents={"base": args.base} if args.base else {})
    total = time.perf_counter() - start
    what = "byte-level BPE" if base is not None else args.model_type
    print(f"完成 done: {Path(args.output) / written} ({what}, {args.vocab_size} pieces); "
          f"训练 training {seconds:.1f}s, 共 total {total:.1f}s")
    add = Path(args.output) if base is not None else Path(args.output) / "zh_sp.model"
    print(f"下一步 next: zhtune vocab merge --base {_quote(args.base or 'LLAMA_TOKENIZER')} --add {_quote(add)} "
          f"--output merged/")
    return 0


def _quote(path) -> str:
    import shlex

    return shlex.quote(str(path))


def bytelevel_base(args):
    """The byte-level BPE base named by --base (None without --base or for a SentencePiece base)."""
    if not args.base:
        return None
    from zhtune.vocab.bytelevel import read_bytelevel, tokenizer_kind

    kind, found = tokenizer_kind(args.base)
    if kind == "bytelevel":
        return read_bytelevel(found)
    from zhtune.vocab.hf import read_sp_model, resolve_base

    # a SentencePiece base adds nothing to training, but a --base that is no tokenizer at all is a mistake
    read_sp_model(resolve_base(found), "--base SentencePiece model")
    return None


def train_bpe(sentences: list[str], args, base, out: Path) -> float:
    """A byte-level BPE in the base's alphabet: DIR/tokenizer.json (+ tokenizer_config.json, so AutoTokenizer
    and `vocab stats` read it as the Chinese vocabulary alone). Returns seconds."""
    from zhtune.vocab.bytelevel import train_bytelevel

    t0 = time.perf_counter()
    tok = train_bytelevel(sentences, base, args.vocab_size, show_progress=sys.stderr.isatty())
    atomic_write_bytes(out / "tokenizer.json", (tok.to_str(pretty=True) + "\n").encode("utf-8"))
    atomic_write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                      "clean_up_tokenization_spaces": False,
                                                      "model_max_length": 1_000_000})
    return time.perf_counter() - t0


def _skips(report: CorpusReport) -> str:
    parts = []
    if report.skipped_not_utf8:
        parts.append(f"skipped {report.skipped_not_utf8} non-UTF-8 lines (first: {report.first_not_utf8})")
    if report.skipped_too_long:
        parts.append(f"skipped {report.skipped_too_long} lines over the byte limit (first: {report.first_too_long})")
    if report.skipped_files:
        parts.append(f"ignored {report.skipped_files} files that are not .txt/.json/.jsonl")
    return "; ".join(parts)
