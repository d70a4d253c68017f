"""Byte-level BPE tokenizers (LLaMA-3, Qwen2.5/3, SmolLM, Mistral-Nemo, GPT-2): what a tokenizer.json is,
its byte alphabet and pre-tokenizer, and training Chinese tokens in that alphabet.

    kind, path = tokenizer_kind("Llama-3.2-1B/")          # ("bytelevel", .../tokenizer.json)
    base = read_bytelevel(path); base.family               # "llama3" | "qwen2" | "gpt2" | "smollm" | "tekken" | None
    tok = train_bytelevel(sentences, base, vocab_size=20000)

Used by `vocab train --base`, `vocab merge` (vocab/bpe_merge.py), `vocab stats`, the embedding init, the
GGUF export (which names the pre-tokenizer for llama.cpp) and `convert meta` (tiktoken files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from zhtune.errors import ZhtuneError

# The pre-tokenizer regexes of the byte-level families, as their tokenizer.json files spell them.
PRE_TOKENIZER_REGEX = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "tekken": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
              r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
FAMILIES = ("llama3", "qwen2", "tekken", "gpt2", "smollm")
KIND_EXAMPLES = {"WordPiece": "BERT-style", "Unigram": "T5 / ALBERT-style", "WordLevel": "word list"}


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """GPT-2's byte -> printable character table (byte b is alphabet[b]): printable Latin-1 bytes stand
    for themselves, the other 68 take the code points from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


@lru_cache(maxsize=1)
def _byte_of() -> dict[str, int]:
    return {ch: b for b, ch in enumerate(byte_alphabet())}


def to_token(data: bytes) -> str:
    """Bytes -> the token string in the byte alphabet ("中" -> "ä¸Ń")."""
    alphabet = byte_alphabet()
    return "".join(alphabet[b] for b in data)


def token_bytes(token: str) -> bytes | None:
    """A byte-alphabet token string -> its bytes (None for a string outside the alphabet, e.g. <|eot_id|>)."""
    table = _byte_of()
    try:
        return bytes(table[ch] for ch in token)
    except KeyError:
        return None


@dataclass
class ByteLevelBPE:
    """A byte-level BPE tokenizer.json, parsed."""

    path: Path                      # the tokenizer.json
    data: dict                      # its JSON
    vocab: dict[str, int] = field(init=False)
    merges: list[tuple[str, str]] = field(init=False)

    def __post_init__(self):
        model = self.data["model"]
        self.vocab = dict(model["vocab"])
        self.merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]

    @property
    def ignore_merges(self) -> bool:
        return bool(self.data["model"].get("ignore_merges"))

    @property
    def added(self) -> list[dict]:
        return list(self.data.get("added_tokens") or [])

    @property
    def size(self) -> int:
        """One past the highest id (model vocabulary and added tokens)."""
        ids = list(self.vocab.values()) + [t["id"] for t in self.added]
        return max(ids) + 1

    @property
    def family(self) -> str | None:
        return pre_tokenizer_family(self.data)

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(json.dumps(self.data))


def _steps(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for child in node.get("pretokenizers") or node.get("normalizers") or [] for s in _steps(child)]
    return [node]


def is_bytelevel(data: dict) -> bool:
    """A BPE model over GPT-2's byte alphabet: ByteLevel pre-tokenizer and decoder, no byte fallback."""
    model = data.get("model") or {}
    pre = [s.get("type") for s in _steps(data.get("pre_tokenizer"))]
    decoder = [s.get("type") for s in _steps(data.get("decoder"))] if data.get("decoder") else []
    if (data.get("decoder") or {}).get("type") == "Sequence":
        decoder = [d.get("type") for d in data["decoder"].get("decoders", [])]
    return (model.get("type") == "BPE" and not model.get("byte_fallback") and "ByteLevel" in pre
            and (not decoder or "ByteLevel" in decoder))


def pre_tokenizer_family(data: dict) -> str | None:
    """Which known family's pre-tokenizer this tokenizer.json uses (by its structure and regex), or None."""
    steps = _steps(data.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            return next((name for name, r in PRE_TOKENIZER_REGEX.items() if r == regex), None)
        return None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    return None


def read_json(path: Path, what: str = "tokenizer.json") -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ZhtuneError(f"cannot read {what} {path}: {exc}", where=str(path), expected="valid JSON") from None
    if not isinstance(data, dict):
        raise ZhtuneError(f"{path} is a JSON {type(data).__name__}, not an object", where=str(path),
                          expected=f"a {what} object")
    return data


def model_type(data: dict) -> str:
    return str((data.get("model") or {}).get("type") or "unknown")


def tokenizer_kind(path: str | Path, flag: str = "--base") -> tuple[str, Path]:
    """("bytelevel", tokenizer.json) or ("sentencepiece", .model) for a tokenizer folder or file.

    A folder whose tokenizer.json is byte-level BPE is "bytelevel" even beside a tokenizer.model (LLaMA-3's
    is a tiktoken file, not SentencePiece). WordPiece / Unigram / WordLevel tokenizers are refused by name.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ZhtuneError(f"tokenizer not found: {path}", where=flag,
                          expected="an HF tokenizer folder (tokenizer.json or tokenizer.model) or a file")
    candidates = [path] if path.is_file() else [path / "tokenizer.json", path / "merged_tokenizer_hf/tokenizer.json"]
    for json_file in (c for c in candidates if c.suffix == ".json" and c.is_file()):
        data = read_json(json_file)
        if is_bytelevel(data):
            return "bytelevel", json_file
        kind = model_type(data)
        if kind in ("WordPiece", "Unigram", "WordLevel"):
            raise ZhtuneError(f"{json_file} is a {kind} tokenizer; zhtune merges into SentencePiece BPE and "
                              "byte-level BPE tokenizers only", where=flag,
                              expected="a LLaMA/Mistral SentencePiece tokenizer or a byte-level BPE tokenizer.json "
                                       "(LLaMA-3, Qwen, SmolLM, Mistral-Nemo)",
                              hint=f"a {kind} vocabulary ({KIND_EXAMPLES[kind]}) has no BPE merges to append "
                                   "Chinese merges to")
        if path.is_file():
            raise ZhtuneError(f"{json_file} is a {kind} tokenizer.json that is not byte-level", where=flag,
                              expected="a byte-level BPE tokenizer.json, or the SentencePiece tokenizer.model")
        break
    return "sentencepiece", path


def read_bytelevel(path: str | Path, flag: str = "--base") -> ByteLevelBPE:
    """Parse a byte-level BPE tokenizer.json (a folder holding one, or the file)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    data = read_json(path)
    if not is_bytelevel(data):
        raise ZhtuneError(f"{path} is not a byte-level BPE tokenizer (model {model_type(data)})", where=flag,
                          expected="tokenizer.json with a BPE model and the ByteLevel pre-tokenizer")
    return ByteLevelBPE(path, data)


def all_split_merges(vocab: dict[str, int], tokens: list[str] | None = None) -> list[tuple[str, str]]:
    """Every (left, right) whose halves are tokens and whose concatenation is a token, ranked by the joined
    token's id, then by the halves' ids: the merges tiktoken applies implicitly (merge the pair whose join
    has the lowest rank), written out for a fast BPE in the order transformers' TikTokenConverter writes
    them (LLaMA-3's and Mistral-Nemo's tokenizer.json). `tokens`: only the merges producing these."""
    out = []
    for token in sorted(tokens if tokens is not None else vocab, key=vocab.__getitem__):
        splits = [(token[:cut], token[cut:]) for cut in range(1, len(token))
                  if token[:cut] in vocab and token[cut:] in vocab]
        out += sorted(splits, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    return out


def normalizer_json(data: dict) -> str:
    return json.dumps(data.get("normalizer"), sort_keys=True)


def train_bytelevel(sentences: list[str], base: ByteLevelBPE, vocab_size: int, show_progress: bool = True):
    """A byte-level BPE trained on `sentences` with the base's normaliser, pre-tokenizer and alphabet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    ref = base.tokenizer()
    tok = Tokenizer(models.BPE(ignore_merges=base.ignore_merges))
    if ref.normalizer is not None:
        tok.normalizer = ref.normalizer
    tok.pre_tokenizer = ref.pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=show_progress, special_tokens=[], min_frequency=2)
    tok.train_from_iterator(sentences, trainer=trainer, length=len(sentences))
    return tok


# --- tiktoken files (Meta's LLaMA-3 tokenizer.model): one "base64(token bytes) rank" line per token ------------
def is_tiktoken_file(path: str | Path) -> bool:
    """A tiktoken BPE file (LLaMA-3's tokenizer.model), not a SentencePiece protobuf: its first line is
    a base64 token and a rank."""
    import base64
    import binascii

    try:
        with open(path, "rb") as fh:
            first = fh.readline(4096).split()
        return len(first) == 2 and first[1].isdigit() and bool(base64.b64decode(first[0], validate=True))
    except (OSError, ValueError, binascii.Error):
        return False


def read_tiktoken(path: str | Path, flag: str = "--input") -> dict[bytes, int]:
    """{token bytes: rank} of a tiktoken file; a bad line is named by file:line."""
    import base64
    import binascii

    ranks: dict[bytes, int] = {}
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ZhtuneError(f"not a tiktoken line: {line[:60]!r}", where=f"{path}:{number}",
                                  expected="base64 of the token's bytes, a space, its rank (LLaMA-3's tokenizer.model)",
                                  hint=f"check {flag}") from None
    if len(set(ranks.values())) != len(ranks):
        raise ZhtuneError(f"{path} gives two tokens the same rank", where=str(path), expected="one rank per token")
    return ranks


def tiktoken_text(vocab: dict[str, int]) -> str:
    """The tiktoken file of a byte-level vocabulary {token string: id} (special tokens left out: tiktoken keeps
    them in code), ranks = ids, so reading it back gives the same ids."""
    import base64

    rows = sorted((i, token_bytes(t)) for t, i in vocab.items() if token_bytes(t) is not None)
    return "".join(f"{base64.b64encode(data).decode()} {i}\n" for i, data in rows)


def tiktoken_tokenizer(ranks: dict[bytes, int], specials: dict[str, int], bos: str | None, regex: str):
    """A byte-level BPE `tokenizers.Tokenizer` that tokenizes as tiktoken does with these ranks: the regex split,
    the whole-word lookup first (ignore_merges), then every split of every token as a merge ranked by the
    joined token (all_split_merges, TikTokenConverter's order); the special tokens at their ids, BOS added."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {to_token(data): rank for data, rank in ranks.items()}
    merges = all_split_merges(vocab)
    taken = set(vocab.values())
    clash = [s for s, i in specials.items() if i in taken]
    if clash:
        raise ZhtuneError(f"special token {clash[0]} has id {specials[clash[0]]}, which a tiktoken rank uses",
                          expected="special tokens after (or between) the ranks, at ids no token has")
    # the special tokens go into the model's vocabulary at their own ids: tokenizers would otherwise number
    # them after the model's size, which a vocabulary with new tokens after the specials makes wrong
    tok = Tokenizer(models.BPE(vocab={**vocab, **specials}, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:
        steps.append(processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                   special_tokens=[(bos, specials[bos])]))
    tok.post_processor = processors.Sequence(steps)
    return tok
