"""`zhtune vocab merge`: add Chinese pieces to a LLaMA-family SentencePiece tokenizer (SP model + HF folder).

    zhtune vocab merge --base llama2/ --add zh_vocab/zh_sp.model --output merged/

Modes:
  preserve (default)  only pieces with CJK characters, scored below every base piece (so every base
                      merge still happens first and non-Chinese text keeps its ids), in the added
                      model's own order (so Chinese compresses like the added model).
  all-pieces          every new piece with score 0: Chinese-LLaMA-Alpaca's merge_tokenizers.py.
  chars               single CJK characters from a file or code-point ranges, as real pieces.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np

from zhtune.args import make_parser
from zhtune.errors import ZhtuneError
from zhtune.io import atomic_output_dir, atomic_write_bytes, atomic_write_json, write_run_yaml
from zhtune.vocab.cjk import DEFAULT_CJK_RANGES, RANGES_RE, char_test, han_count, parse_ranges  # noqa: F401 (re-exported)
from zhtune.vocab.hf import NORMAL, USER_DEFINED, read_sp_model, resolve_base, sp_encoder, write_hf_tokenizer

MODES = ("preserve", "all-pieces", "chars")
INFO_FILE = "zhtune_vocab.json"
BASE_COPY = "base_tokenizer.model"


def _score_ladder(below: float, n: int) -> list[float]:
    """n distinct float32 scores, decreasing, all below `below` (sentencepiece stores float32)."""
    start = np.float32(below)
    step = np.float32(1.0)
    values = start - step * np.arange(1, n + 1, dtype=np.float64)
    ladder = values.astype(np.float32)
    if n and (np.any(np.diff(ladder) >= 0) or ladder[0] >= start):
        # huge base scores (e.g. -1e9): float32 spacing exceeds 1, step by representable neighbours
        ladder = np.empty(n, dtype=np.float32)
        value = start
        for i in range(n):
            value = np.nextafter(value, np.float32(-np.inf))
            ladder[i] = value
    return [float(x) for x in ladder]


def _ordered_pieces(proto) -> list[str]:
    """The add model's normal pieces in its own merge order (score high to low, then id)."""
    rows = [(-p.score, i, p.piece) for i, p in enumerate(proto.pieces) if p.type in (NORMAL, USER_DEFINED)]
    return [piece for _, _, piece in sorted(rows)]


def select_preserve(base_pieces: set[str], adds: list, is_cjk) -> tuple[list[str], Counter]:
    """Pieces to add in preserve mode, and counts of what was skipped and why.

    A piece is added if it has a CJK character, is new, and each of its characters is a piece of the
    merged vocabulary (sentencepiece can still join a character it has no piece for; a fast BPE
    tokenizer byte-encodes it instead, so such a piece would make the two disagree).
    """
    skipped: Counter = Counter()
    singles = {p for proto in adds for p in _ordered_pieces(proto) if len(p) == 1 and is_cjk(p)}
    known = base_pieces | singles
    chosen: list[str] = []
    seen = set(base_pieces)
    for proto in adds:
        for piece in _ordered_pieces(proto):
            if piece in seen:
                skipped["already in the vocabulary"] += 1
                continue
            if not any(is_cjk(ch) for ch in piece):
                skipped["no CJK character"] += 1
                continue
            if any(ch not in known for ch in piece):
                skipped["has a character outside the base vocabulary and the CJK ranges"] += 1
                continue
            seen.add(piece)
            chosen.append(piece)
    return chosen, skipped


def select_all_pieces(base_pieces: set[str], adds: list) -> tuple[list[str], Counter]:
    """Every new normal piece (Chinese-LLaMA-Alpaca's merge)."""
    skipped: Counter = Counter()
    chosen, seen = [], set(base_pieces)
    for proto in adds:
        for p in proto.pieces:  # model order, as merge_tokenizers.py walks it
            if p.type not in (NORMAL, USER_DEFINED):
                continue
            if p.piece in seen:
                skipped["already in the vocabulary"] += 1
                continue
            seen.add(p.piece)
            chosen.append(p.piece)
    return chosen, skipped


def select_chars(base_pieces: set[str], spec: str, is_cjk) -> tuple[list[str], Counter]:
    """Single characters from a FILE (its CJK characters, most frequent first) or RANGES."""
    path = Path(spec).expanduser()
    skipped: Counter = Counter()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ZhtuneError(f"{path} is not UTF-8 text (byte {exc.start})", where=f"--chars {path}",
                              expected="a UTF-8 text file of characters") from None
        counts = Counter(ch for ch in text if is_cjk(ch))
        first = {}
        for i, ch in enumerate(text):
            first.setdefault(ch, i)
        candidates = sorted(counts, key=lambda ch: (-counts[ch], first[ch]))
    elif RANGES_RE.match(spec):
        candidates = [chr(cp) for lo, hi in parse_ranges(spec, "--chars") for cp in range(lo, hi + 1)
                      if not (0xD800 <= cp <= 0xDFFF)]
    else:
        raise ZhtuneError(f"--chars is neither a file nor code-point ranges: {spec!r}", where="--chars",
                          expected="a UTF-8 text file of characters, or ranges like 4E00-9FFF")
    chosen, seen = [], set()
    for ch in candidates:
        if unicodedata.category(ch) in ("Cn", "Cs", "Co"):
            skipped["unassigned code point"] += 1
        elif ch in base_pieces or ch in seen:
            skipped["already in the vocabulary"] += 1
        else:
            seen.add(ch)
            chosen.append(ch)
    if not chosen:
        raise ZhtuneError(f"--chars {spec} gives no new character", where="--chars",
                          expected="characters the base vocabulary does not have yet")
    return chosen, skipped


def merge_models(base, new_pieces: list[str], mode: str):
    """A copy of the base ModelProto with `new_pieces` appended (scores by mode)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    merged = pb.ModelProto()
    merged.CopyFrom(base)
    if mode == "all-pieces":
        scores = [0.0] * len(new_pieces)
    else:
        scores = _score_ladder(min(p.score for p in base.pieces), len(new_pieces))
    for piece, score in zip(new_pieces, scores):
        entry = merged.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, NORMAL
    merged.trainer_spec.vocab_size = len(merged.pieces)
    return merged


def base_sp_model_for(tokenizer_dir: str | Path) -> Path | None:
    """The base tokenizer's SentencePiece model recorded by `vocab merge`, if this folder has one.

    Training uses it to initialise new embedding rows from the base pieces of each new piece's text.
    Looks for the copy `base_tokenizer.model`, then for the path in zhtune_vocab.json.
    """
    folder = Path(tokenizer_dir)
    if (folder / BASE_COPY).is_file():
        return folder / BASE_COPY
    if (folder / "base_tokenizer" / "tokenizer.json").is_file():  # a byte-level merge keeps the base's folder
        return folder / "base_tokenizer"
    info_path = folder / INFO_FILE
    if not info_path.is_file():
        return None
    try:
        recorded = Path(json.loads(info_path.read_text(encoding="utf-8"))["base_tokenizer"])
    except (ValueError, KeyError, TypeError):
        return None
    if recorded.is_file():
        return recorded
    if (recorded / "tokenizer.model").is_file():
        return recorded / "tokenizer.model"
    return None


EXAMPLES = """
# 把 vocab train 的中文词表并入 LLaMA-2 分词器 / merge a trained Chinese vocabulary into LLaMA-2's
zhtune vocab merge --base Llama-2-7b-hf/ --add zh_vocab/zh_sp.model --output merged/
# Chinese-LLaMA-Alpaca 兼容模式 / compatibility with merge_tokenizers.py (all pieces, score 0)
zhtune vocab merge --base llama/tokenizer.model --add zh_sp.model --mode all-pieces --output merged_cla/
# 字节级 BPE 基座 / a byte-level BPE base (LLaMA-3.x, Qwen): a vocabulary trained with --base, or a .model
zhtune vocab merge --base Llama-3.2-1B/ --add zh_bpe/ --output merged_l3/
zhtune vocab merge --base Qwen2.5-7B/ --add chinese_sp.model --output merged_qwen/
# 只加单个汉字 / single characters: the CJK ideographs block, or the characters of a file
zhtune vocab merge --base llama/ --mode chars --chars 4E00-9FFF --output merged_chars/
zhtune vocab merge --base llama/ --mode chars --chars common_chars.txt --output merged_chars/
# 看效果 / then compare
zhtune vocab stats --tokenizer llama/ --tokenizer merged/merged_tokenizer_hf --text heldout.txt
"""


def build_parser():
    p = make_parser("vocab merge", """
        把中文词表并入 LLaMA 系分词器 / merge Chinese pieces into a LLaMA-family tokenizer: SentencePiece
        (LLaMA-1/2, Mistral, Chinese-LLaMA) or byte-level BPE (LLaMA-3.x, Qwen2.5/3, SmolLM, Mistral-Nemo).

        SentencePiece: writes DIR/merged_tokenizer_sp/NAME.model and DIR/merged_tokenizer_hf/
        (tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json; loads with
        AutoTokenizer.from_pretrained and gives sentencepiece's ids), plus the base tokenizer's copy
        and location (base_tokenizer.model, zhtune_vocab.json) for initialising new embeddings.
        Byte-level BPE: DIR/merged_tokenizer_hf/ (tokenizer.json with the new tokens and their merges
        after the base's, the base's tokenizer_config.json) and its base_tokenizer/.
        Then checks on held-out text: fast ids == sentencepiece ids (SentencePiece), decode(encode(x))
        == x, non-Chinese lines unchanged, every new token reachable (byte-level).""",
        EXAMPLES)
    p.add_argument("--base", required=True,
                   help="base tokenizer: HF folder with tokenizer.model or a byte-level tokenizer.json, or a .model")
    p.add_argument("--add", action="append", default=[], metavar="MODEL",
                   help="vocabulary to take pieces from (repeatable): `vocab train` output (zh_sp.model, or "
                        "tokenizer.json of `vocab train --base`, or its folder) or another SentencePiece model")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--mode", choices=MODES, default="preserve", help="which pieces to add and how to score them")
    p.add_argument("--chars", metavar="FILE|RANGES", help="--mode chars: a text file, or ranges like 4E00-9FFF")
    p.add_argument("--cjk-ranges", default=DEFAULT_CJK_RANGES,
                   help="code points that count as Chinese for --mode preserve/chars (hex ranges)")
    p.add_argument("--name", default="chinese_llama", help="file name of the merged SentencePiece model")
    p.add_argument("--check-text", action="append", default=[], metavar="FILE",
                   help="more text for the after-merge checks (besides zhtune's held-out texts and edge cases)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output folder an earlier zhtune run wrote (never other files)")
    return p


def _check_args(args) -> None:
    if args.mode == "chars":
        if not args.chars:
            raise ZhtuneError("--mode chars needs --chars", where="--chars",
                              expected="a text file of characters, or ranges like 4E00-9FFF")
        if args.add:
            raise ZhtuneError("--mode chars adds characters, not models' pieces", where="--add",
                              expected="no --add with --mode chars (use --mode preserve to add pieces)")
    else:
        if args.chars:
            raise ZhtuneError("--chars only applies to --mode chars", where="--chars",
                              expected=f"--mode chars, or drop --chars (mode is {args.mode})")
        if not args.add:
            raise ZhtuneError(f"--mode {args.mode} needs at least one --add MODEL", where="--add",
                              expected="a SentencePiece model, e.g. the zh_sp.model from `zhtune vocab train`")
    if not re.fullmatch(r"[\w.-]+", args.name):
        raise ZhtuneError(f"bad --name {args.name!r}", where="--name", expected="a file name without folders")


def main(argv: list[str]) -> int:
    from zhtune.vocab.bytelevel import tokenizer_kind

    args = build_parser().parse_args(argv)
    _check_args(args)
    start = time.perf_counter()
    is_cjk = char_test(parse_ranges(args.cjk_ranges))
    kind, found = tokenizer_kind(args.base)
    if kind == "bytelevel":
        return main_bytelevel(args, found, is_cjk, start)
    base_path = resolve_base(args.base)
    base = read_sp_model(base_path, "base tokenizer")
    if base.trainer_spec.model_type != 2:
        raise ZhtuneError(f"the base {base_path} is a SentencePiece unigram/word/char model, not BPE", where="--base",
                          expected="a BPE SentencePiece model like LLaMA's, LLaMA-2's or Mistral's tokenizer.model")
    adds = []
    for add in args.add:
        add_path = resolve_base(add, flag="--add")
        adds.append((add_path, read_sp_model(add_path, "--add model")))
    base_pieces = {p.piece for p in base.pieces}
    if args.mode == "preserve":
        new, skipped = select_preserve(base_pieces, [a for _, a in adds], is_cjk)
    elif args.mode == "all-pieces":
        new, skipped = select_all_pieces(base_pieces, [a for _, a in adds])
    else:
        new, skipped = select_chars(base_pieces, args.chars, is_cjk)
    merged = merge_models(base, new, args.mode)
    info = {"base_tokenizer": str(Path(args.base).expanduser().resolve()), "base_vocab_size": len(base.pieces),
            "added_pieces": len(new), "vocab_size": len(merged.pieces), "mode": args.mode,
            "added_from": [str(p.resolve()) for p, _ in adds] if adds else [args.chars]}
    with atomic_output_dir(args.output, args.overwrite) as tmp:
        sp_file = tmp / "merged_tokenizer_sp" / f"{args.name}.model"
        atomic_write_bytes(sp_file, merged.SerializeToString(deterministic=True))
        hf_dir = write_hf_tokenizer(sp_file, tmp / "merged_tokenizer_hf")
        shutil.copyfile(base_path, hf_dir / BASE_COPY)
        atomic_write_json(hf_dir / INFO_FILE, info)
        report = after_merge_checks(hf_dir, base_path, args.check_text, is_cjk)
        atomic_write_json(tmp / "merge_report.json", {**info, "skipped": dict(sorted(skipped.items())), **report})
        write_run_yaml(tmp, "vocab merge", {k: v for k, v in vars(args).items() if k != "overwrite"},
                       parents={"base": str(base_path), **{f"add{i}": str(p) for i, (p, _) in enumerate(adds)}})
    _print_summary(args, info, skipped, report, time.perf_counter() - start)
    return 0


def main_bytelevel(args, base_json: Path, is_cjk, start: float) -> int:
    """`vocab merge` for a byte-level BPE base: new tokens and merges after the base's, checked on text."""
    from zhtune.vocab import bpe_merge as bm
    from zhtune.vocab.bytelevel import read_bytelevel

    base = read_bytelevel(base_json)
    if args.mode == "all-pieces":
        raise ZhtuneError("--mode all-pieces is Chinese-LLaMA-Alpaca's SentencePiece merge (every piece, score 0)",
                          where="--mode", expected="preserve or chars for a byte-level BPE base",
                          hint="preserve adds the Chinese tokens with their merges after every base merge")
    adds = []
    if args.mode == "chars":
        singles = {token_bytes_text(t) for t in base.vocab}
        chosen, skipped = select_chars(singles, args.chars, is_cjk)
        steps = bm.char_steps(chosen)
    else:
        steps, skipped = [], Counter()
        for add in args.add:
            more, resolved = bm.add_steps(base, add)
            steps += more
            adds.append(resolved)
    result = bm.merge_bytelevel(base, steps, is_cjk)
    skipped.update(result.skipped)
    info = {"kind": "bytelevel", "base_tokenizer": str(base_json.parent.resolve()), "base_vocab_size": base.size,
            "added_pieces": len(result.new_tokens), "vocab_size": base.size + len(result.new_tokens),
            "mode": args.mode, "added_from": adds or [args.chars], "pre_tokenizer": base.family}
    with atomic_output_dir(args.output, args.overwrite) as tmp:
        hf_dir = tmp / "merged_tokenizer_hf"
        bm.write_merged(base, result.data, hf_dir)
        atomic_write_json(hf_dir / INFO_FILE, info)
        report = bm.merge_checks(base, result.data, result.new_tokens, check_lines(args.check_text), is_cjk)
        atomic_write_json(tmp / "merge_report.json", {**info, "skipped": dict(sorted(skipped.items())), **report})
        write_run_yaml(tmp, "vocab merge", {k: v for k, v in vars(args).items() if k != "overwrite"},
                       parents={"base": str(base_json.parent), **{f"add{i}": p for i, p in enumerate(adds)}})
    _print_bytelevel_summary(args, info, skipped, report, time.perf_counter() - start)
    return 0


def token_bytes_text(token: str) -> str | None:
    from zhtune.vocab.bytelevel import token_bytes

    data = token_bytes(token)
    try:
        return data.decode("utf-8") if data is not None else None
    except UnicodeDecodeError:
        return None


def check_lines(extra_texts: list[str]) -> list[str]:
    """zhtune's held-out Chinese and English texts, the edge cases, and the user's --check-text files."""
    from zhtune.io import asset
    from zhtune.vocab.stats import read_lines

    lines = [line for name in ("zh_heldout.txt", "en_corpus.txt") if asset(name).is_file()
             for line in read_lines(asset(name))]
    lines += CHECK_LINES
    for text in extra_texts:
        lines += read_lines(text, flag="--check-text")
    return lines


def _print_bytelevel_summary(args, info: dict, skipped: Counter, report: dict, seconds: float) -> None:
    print(f"合并完成 merged ({args.mode}, byte-level BPE, pre-tokenizer {info['pre_tokenizer'] or 'custom'}): "
          f"{info['base_vocab_size']} + {info['added_pieces']} = {info['vocab_size']} tokens -> {args.output}")
    for why, n in sorted(skipped.items()):
        print(f"  跳过 skipped {n} tokens: {why}")
    n = report["check_lines"]
    print(f"  decode(encode(x)) == x: {report['roundtrip_ok']}/{n} lines; 非中文行不变 / non-Chinese lines "
          f"unchanged vs base: {report['non_chinese_unchanged']}/{report['non_chinese_lines']}")
    print(f"  可达 / reachable new tokens: {report['reachable_by_merges']}/{report['added_tokens']} by the merges; "
          f"{report['word_tokens_encode_to_themselves']}/{report['word_tokens']} whole words encode to themselves")
    if report["first_changed"] is not None:
        print(f"  注意 note: a non-Chinese line changed: {report['first_changed'][:60]!r}")
    print(f"用时 time: {seconds:.1f}s")


def after_merge_checks(hf_dir: Path, base_model: Path, extra_texts: list[str], is_cjk) -> dict:
    """Fast == sentencepiece on every check line; non-Chinese lines keep the base's ids."""
    from zhtune.vocab.hf import compare_with_sp

    lines = check_lines(extra_texts)
    agree = compare_with_sp(hf_dir, lines, use_transformers=False)  # no torch import: seconds faster
    merged_sp, base_sp = sp_encoder(hf_dir / "tokenizer.model"), sp_encoder(base_model)
    plain = [line for line in lines if not any(is_cjk(ch) for ch in line)]
    unchanged = sum(merged_sp(line) == base_sp(line) for line in plain)
    report = {"check_lines": agree["lines"], "fast_equals_sentencepiece": agree["same_ids"],
              "roundtrip_ok": agree["roundtrip"], "non_chinese_lines": len(plain),
              "non_chinese_unchanged": unchanged, "first_difference": agree["first_difference"]}
    return report


# Edge cases every check includes: spaces, code, digits, emoji, full-width text, newlines.
CHECK_LINES = [
    " leading space", "  two leading spaces", "trailing space ", "multiple   inner    spaces",
    "def add(a, b):\n    return a + b  # sum", "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "1234567890 3.14159 2024-01-01", "emoji 😀🎉👍 ok", "tab\tseparated\tvalues", "line one\nline two\n",
    "全角ＡＢＣ１２３，。！", "中文 English 混合 mixed 123", "“引号”和‘单引号’…——",
]


def _print_summary(args, info: dict, skipped: Counter, report: dict, seconds: float) -> None:
    out = sys.stdout
    print(f"合并完成 merged ({args.mode}): {info['base_vocab_size']} + {info['added_pieces']} = "
          f"{info['vocab_size']} pieces -> {args.output}", file=out)
    for why, n in sorted(skipped.items()):
        print(f"  跳过 skipped {n} pieces: {why}", file=out)
    n = report["check_lines"]
    print(f"  快速分词器 = sentencepiece / fast == sentencepiece ids: {report['fast_equals_sentencepiece']}/{n} lines; "
          f"decode(encode(x)) == x: {report['roundtrip_ok']}/{n}", file=out)
    print(f"  非中文行不变 / non-Chinese lines unchanged vs base: {report['non_chinese_unchanged']}/"
          f"{report['non_chinese_lines']}", file=out)
    if report["fast_equals_sentencepiece"] < n:
        why = (" (expected with --mode all-pieces: every new piece has score 0, and sentencepiece breaks "
               "those ties by position, which a fast BPE tokenizer cannot; use --mode preserve)"
               if args.mode == "all-pieces" else "")
        first = report["first_difference"]
        print(f"  注意 note: the fast tokenizer differs from sentencepiece on "
              f"{n - report['fast_equals_sentencepiece']} lines{why}.\n  first: check line {first['line']} "
              f"{first['text'][:30]!r}... from token {first['token']}: "
              f"sentencepiece {' '.join(first['sentencepiece'])} "
              f"| fast {' '.join(first['hf'])}", file=out)
    print(f"用时 time: {seconds:.1f}s", file=out)
