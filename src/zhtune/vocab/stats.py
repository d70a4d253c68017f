"""`zhtune vocab stats`: compare tokenizers on a text: compression, round trip, byte fallback, preservation.

    zhtune vocab stats --tokenizer llama2/ --tokenizer merged/merged_tokenizer_hf --text heldout.txt [--json out.json]
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from zhtune.args import make_parser, output_file
from zhtune.errors import ZhtuneError
from zhtune.io import atomic_write_json

BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
BATCH = 512


def read_lines(path: str | Path, flag: str = "--text") -> list[str]:
    """Non-empty lines of a UTF-8 text file; a ZhtuneError names the file:line that is not UTF-8."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ZhtuneError(f"text file not found: {path}", where=flag, expected="a UTF-8 text file, one text per line")
    lines = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise ZhtuneError(f"line is not UTF-8 (byte {exc.start})", where=f"{path}:{number}",
                                  expected="UTF-8 text") from None
            if line.strip():
                lines.append(line)
    if not lines:
        raise ZhtuneError(f"text file is empty: {path}", where=flag, expected="at least one non-empty line")
    return lines


@dataclass
class Loaded:
    """A tokenizer under test: batch encode (no BOS/EOS), decode, vocab size, which ids are bytes."""

    name: str
    path: Path
    # "hf" (AutoTokenizer), "byte-level BPE" (AutoTokenizer on a byte-level tokenizer.json) or "sentencepiece"
    kind: str
    encode: Callable[[list[str]], list[list[int]]]
    decode: Callable[[list[int]], str]
    vocab_size: int
    byte_ids: frozenset
    sp_model: Path | None  # tokenizer.model beside an HF folder, to check fast == sentencepiece


def load_tokenizer(path: str | Path) -> Loaded:
    """An HF folder (AutoTokenizer, as training and inference use it) or a SentencePiece .model file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ZhtuneError(f"tokenizer not found: {path}", where="--tokenizer",
                          expected="an HF tokenizer folder or a SentencePiece .model file")
    if (path / "merged_tokenizer_hf").is_dir():  # a `vocab merge` output folder
        path = path / "merged_tokenizer_hf"
    if path.is_dir() and not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        models = sorted(path.glob("*.model"))
        if len(models) != 1:
            raise ZhtuneError(f"{path} has no tokenizer.json, tokenizer_config.json or single .model file",
                              where="--tokenizer", expected="an HF tokenizer folder or a SentencePiece .model file")
        path = models[0]  # a bare sentencepiece folder: AutoTokenizer would load it with other ids
    generic = path.name in ("tokenizer.model", "merged_tokenizer_hf")
    name = f"{path.parent.name}/{path.name}" if generic else path.name
    if path.is_file():
        from zhtune.vocab.hf import read_sp_model, sp_processor

        sp = sp_processor(read_sp_model(path, "--tokenizer"))
        byte_ids = frozenset(i for i in range(sp.get_piece_size()) if sp.is_byte(i))
        return Loaded(name, path, "sentencepiece", lambda batch: sp.encode(batch), sp.decode,
                      sp.get_piece_size(), byte_ids, None)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a folder it cannot read
        raise ZhtuneError(f"cannot load tokenizer folder {path}: {exc}", where="--tokenizer",
                          expected="a folder AutoTokenizer.from_pretrained can load") from None
    vocab = tok.get_vocab()
    byte_ids = frozenset(i for piece, i in vocab.items() if BYTE_PIECE.match(piece))
    kind = "hf"
    if (path / "tokenizer.json").is_file():
        from zhtune.vocab.bytelevel import is_bytelevel, read_json

        if is_bytelevel(read_json(path / "tokenizer.json")):
            # byte fallback of a byte-level BPE: tokens that are a part of a character, not whole ones
            kind, byte_ids = "byte-level BPE", frozenset(i for piece, i in vocab.items() if _partial(piece))

    def encode(batch: list[str]) -> list[list[int]]:
        return tok(batch, add_special_tokens=False)["input_ids"]

    sp_model = path / "tokenizer.model" if (path / "tokenizer.model").is_file() else None
    return Loaded(name, path, kind, encode, lambda ids: tok.decode(ids), len(tok), byte_ids, sp_model)


def _partial(token: str) -> bool:
    """A byte-level token that is not whole UTF-8 characters (e.g. the first two bytes of 中)."""
    from zhtune.vocab.bytelevel import token_bytes

    data = token_bytes(token)
    if data is None:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def encode_all(tok: Loaded, lines: list[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(lines), BATCH):
        out += tok.encode(lines[i:i + BATCH])
    return out


def measure(tok: Loaded, lines: list[str], reference: list[list[int]] | None = None) -> tuple[dict, list[list[int]]]:
    """The row of numbers for one tokenizer (and its ids, so the next ones can compare to it)."""
    from zhtune.vocab.cjk import CJK as is_cjk
    from zhtune.vocab.cjk import han_count
    from zhtune.vocab.hf import sp_encoder

    start = time.perf_counter()
    ids = encode_all(tok, lines)
    seconds = time.perf_counter() - start
    n_tokens = sum(len(x) for x in ids)
    han_lines = [i for i, line in enumerate(lines) if han_count(line)]
    han_chars = sum(han_count(lines[i]) for i in han_lines)
    plain = [i for i, line in enumerate(lines) if not any(is_cjk(ch) for ch in line)]
    roundtrip = sum(tok.decode(x) == line for x, line in zip(ids, lines))
    byte_tokens = sum(1 for x in ids for t in x if t in tok.byte_ids)
    row = {
        "name": tok.name, "path": str(tok.path), "kind": tok.kind, "vocab_size": tok.vocab_size,
        "tokens": n_tokens,
        "tokens_per_cjk_char": round(sum(len(ids[i]) for i in han_lines) / han_chars, 4) if han_chars else None,
        "tokens_per_char": round(n_tokens / max(1, sum(len(line) for line in lines)), 4),
        "tokens_per_line": round(n_tokens / len(lines), 2),
        "roundtrip_lines": roundtrip, "roundtrip_share": round(roundtrip / len(lines), 4),
        "byte_fallback_tokens": byte_tokens, "byte_fallback_share": round(byte_tokens / max(1, n_tokens), 4),
        "non_cjk_lines": len(plain),
        "non_cjk_identical_to_first": None if reference is None else
        (round(sum(ids[i] == reference[i] for i in plain) / len(plain), 4) if plain else None),
        "encode_seconds": round(seconds, 3),
    }
    if tok.sp_model is not None:
        sp_ids = sp_encoder(tok.sp_model)(lines)  # sentencepiece encodes a list in one call
        row["fast_equals_sentencepiece"] = round(sum(a == b for a, b in zip(ids, sp_ids)) / len(lines), 4)
    return row, ids


ROWS = [
    ("vocab_size", "词表大小 vocab size", "{}"),
    ("tokens_per_cjk_char", "每汉字 token 数 tokens / CJK char", "{:.3f}"),
    ("tokens_per_char", "每字符 tokens / char", "{:.3f}"),
    ("tokens_per_line", "每行 tokens / line", "{:.1f}"),
    ("roundtrip_share", "decode(encode(x)) == x", "{:.1%}"),
    ("byte_fallback_tokens", "字节回退 byte-fallback tokens", "{}"),
    ("non_cjk_identical_to_first", "非中文行同第一个 non-CJK lines = first", "{:.1%}"),
    ("fast_equals_sentencepiece", "fast ids == sentencepiece", "{:.1%}"),
]


def format_table(rows: list[dict], n_lines: int, n_plain: int) -> str:
    """Metrics down, tokenizers across (names above the table, so long paths do not widen it)."""
    header = ["", *[f"[{i + 1}]" for i in range(len(rows))]]
    table = [header]
    for key, label, fmt in ROWS:
        cells = [label]
        for row in rows:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        table.append(cells)
    widths = [max(_width(r[c]) for r in table) for c in range(len(header))]
    legend = [f"[{i + 1}] {row['name']} ({row['kind']}): {row['path']}" for i, row in enumerate(rows)]
    body = ["  ".join(_pad(cell, widths[c], c > 0) for c, cell in enumerate(r)) for r in table]
    return "\n".join(legend + [f"{n_lines} lines, {n_plain} without CJK characters", ""] + body)


def _width(text: str) -> int:
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int, right: bool) -> str:
    space = " " * (width - _width(text))
    return space + text if right else text + space


EXAMPLES = """
zhtune vocab stats --tokenizer llama2/ --tokenizer merged/merged_tokenizer_hf --text zh_heldout.txt
zhtune vocab stats --tokenizer zh_vocab/zh_sp.model --tokenizer merged/merged_tokenizer_hf \\
    --text zh_heldout.txt --text en_code.txt --json stats.json
"""


def main(argv: list[str]) -> int:
    p = make_parser("vocab stats", """
        比较分词器 / compare tokenizers on a text, one column per tokenizer:
        vocab size, tokens per CJK (Han) character on lines that have some, tokens per character,
        tokens per line, lines with decode(encode(x)) == x, byte-fallback tokens, and the share of
        lines without CJK characters tokenized with the same ids as the first tokenizer.
        An HF folder is loaded with AutoTokenizer (as training uses it); a .model with sentencepiece.""",
        EXAMPLES)
    p.add_argument("--tokenizer", action="append", required=True, metavar="DIR|MODEL",
                   help="HF tokenizer folder or SentencePiece .model (repeatable; the first is the reference)")
    p.add_argument("--text", action="append", required=True, metavar="FILE",
                   help="UTF-8 text, one text per line (repeatable)")
    p.add_argument("--json", metavar="OUT", type=output_file("--json"), help="also write the numbers as JSON")
    args = p.parse_args(argv)
    lines = [line for text in args.text for line in read_lines(text)]
    rows, reference = [], None
    for path in args.tokenizer:
        row, ids = measure(load_tokenizer(path), lines, reference)
        reference = ids if reference is None else reference
        rows.append(row)
    n_plain = rows[0]["non_cjk_lines"]
    print(format_table(rows, len(lines), n_plain), file=sys.stdout)
    if args.json:
        from zhtune.vocab.cjk import han_count

        atomic_write_json(args.json, {"text": [str(Path(t).resolve()) for t in args.text], "lines": len(lines),
                                      "cjk_chars": sum(han_count(line) for line in lines),
                                      "non_cjk_lines": n_plain, "tokenizers": rows})
        print(f"JSON -> {args.json}")
    return 0
