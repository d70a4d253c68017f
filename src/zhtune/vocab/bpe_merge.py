"""Append Chinese tokens and their merges to a byte-level BPE tokenizer, after every base merge.

    result = merge_bytelevel(base, steps, is_cjk)     # steps from bpe_steps(add) / sp_steps(proto) / char_steps(...)
    result.data                                       # the merged tokenizer.json (dict)

Why non-Chinese text keeps its ids: BPE applies the lowest-ranked applicable merge first, and every new
merge ranks after every base merge, so on any word the base's merges run to completion first and a new
merge can only join two of the base's final tokens. Every new token either holds a whole CJK character
(its two halves can only sit side by side in text that has that character) or is the first bytes of a
character whose every assigned code point is CJK ("safe prefix", e.g. E4 B8 = U+4E00..U+4E3F). So on text
without CJK characters no new merge ever applies, and the ignore_merges whole-word lookup (LLaMA-3,
Mistral-Nemo) never finds a new token either.

Why every new token is reachable: each one is added only when the merged tokenizer can build it from
tokens it already has (its own merge, or a chain built from what the current merges make of its bytes),
and merges are only ever appended, which cannot undo a token. The checks in vocab/merge.py prove both
on text.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from zhtune.vocab.bytelevel import ByteLevelBPE, all_split_merges, to_token, token_bytes

# a step is ("merge", left, right): take the add vocabulary's merge; or ("token", token): build that token
Step = tuple


@dataclass
class MergeResult:
    data: dict                                   # the merged tokenizer.json
    new_tokens: list[str]                        # in id order, from base.size on
    skipped: Counter = field(default_factory=Counter)


def _utf8_length(lead: int) -> int:
    return 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF8 else 0


def _prefix_code_points(prefix: bytes) -> range | None:
    """The code points whose UTF-8 starts with `prefix` (a lead byte + continuation bytes, not a whole char)."""
    n = _utf8_length(prefix[0])
    if not n or len(prefix) >= n or any(not 0x80 <= b < 0xC0 for b in prefix[1:]):
        return None
    value = prefix[0] & (0x7F >> n)
    for b in prefix[1:]:
        value = (value << 6) | (b & 0x3F)
    free = 6 * (n - len(prefix))
    return range(value << free, (value + 1) << free)


class Merger:
    """The merged vocabulary being built: tokens, ranks of merges, and the rules for what may be added."""

    def __init__(self, base: ByteLevelBPE, is_cjk):
        self.base, self.is_cjk = base, is_cjk
        self.vocab = dict(base.vocab)
        self.specials = {t["content"] for t in base.added}
        self.ranks = {pair: i for i, pair in enumerate(base.merges)}
        self.rank_end = len(base.merges)
        self.next_id = base.size
        self.new: list[str] = []
        self.skipped: Counter = Counter()
        ref = base.tokenizer()
        self.normalizer, self.pre = ref.normalizer, ref.pre_tokenizer
        self._safe: dict[bytes, bool] = {}

    # --- what may be added ---------------------------------------------------------------------
    def safe_prefix(self, data: bytes) -> bool:
        """The first bytes of one character, every assigned character starting with them being CJK."""
        if data not in self._safe:
            cps = _prefix_code_points(data)
            self._safe[data] = cps is not None and all(
                self.is_cjk(chr(cp)) or unicodedata.category(chr(cp)) in ("Cn", "Cs") for cp in cps)
        return self._safe[data]

    def refusal(self, token: str, whole: bool) -> str | None:
        """Why `token` may not be added (None: it may). whole: it must also be a word of its own."""
        data = token_bytes(token)
        if data is None or token in self.specials:
            return "not in the byte alphabet"
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None if self.safe_prefix(data) else "part of a character that is not only CJK"
        if not any(self.is_cjk(ch) for ch in text):
            return "no CJK character"
        if self.normalizer is not None and self.normalizer.normalize_str(text) != text:
            return "changed by the base's normaliser"
        if whole and len(self.pre.pre_tokenize_str(text)) != 1:
            return "crosses a pre-tokenizer boundary"
        return None

    # --- adding ----------------------------------------------------------------------------------
    def add(self, token: str, left: str, right: str) -> None:
        self.vocab[token] = self.next_id
        self.next_id += 1
        self.ranks[(left, right)] = self.rank_end
        self.rank_end += 1
        self.new.append(token)

    def split(self, token: str) -> list[str]:
        """What the current merges make of `token` as one word (BPE: lowest-ranked pair first)."""
        parts = list(token)
        while len(parts) > 1:
            ranked = [(self.ranks[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in self.ranks]
            if not ranked:
                break
            _, i = min(ranked)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def chain(self, token: str) -> bool:
        """Make `token` reachable: its characters first (each from its bytes, through safe prefixes), then
        the pieces the current merges give, grown from the first piece with a CJK character outwards so
        every intermediate holds that character. False (nothing added) if some step is not allowed."""
        text = token_bytes(token).decode("utf-8")
        plan: list[tuple[str, str, str]] = []
        planned: set[str] = set()  # beside self.vocab, not a copy of it per token (that made --add a 20k
        # SentencePiece model onto a 32k base take ~125 s instead of ~8 s)

        def have(piece: str) -> bool:
            return piece in self.vocab or piece in planned

        def join(left: str, right: str) -> bool:
            joined = left + right
            if not have(joined):
                if self.refusal(joined, whole=False):
                    return False
                plan.append((joined, left, right))
                planned.add(joined)
            return True

        def grow(pieces: list[str], anchor: int) -> bool:
            acc = pieces[anchor]
            for piece in pieces[anchor + 1:]:
                if not join(acc, piece):
                    return False
                acc += piece
            for piece in reversed(pieces[:anchor]):
                if not join(piece, acc):
                    return False
                acc = piece + acc
            return True

        for ch in dict.fromkeys(text):
            char_token = to_token(ch.encode("utf-8"))
            if not have(char_token) and not grow(self._split_with(char_token, plan), 0):
                return False
        pieces = self._split_with(token, plan)
        anchor = next((i for i, p in enumerate(pieces) if _complete(p) and self.refusal(p, whole=False) is None), 0)
        if len(pieces) > 1 and not grow(pieces, anchor):
            return False
        for joined, left, right in plan:
            if joined not in self.vocab:
                self.add(joined, left, right)
        return token in self.vocab

    def _split_with(self, token: str, plan: list[tuple[str, str, str]]) -> list[str]:
        """split() as if the planned merges were already added."""
        extra = [(left, right) for _, left, right in plan if (left, right) not in self.ranks]
        for k, pair in enumerate(extra):
            self.ranks[pair] = self.rank_end + k
        try:
            return self.split(token)
        finally:
            for pair in extra:
                del self.ranks[pair]


def merge_bytelevel(base: ByteLevelBPE, steps: list[Step], is_cjk) -> MergeResult:
    """Run `steps` over the base; the merged tokenizer.json has the base's merges, then for every new
    token (in id order) each split of it into two tokens (tiktoken's rule, so a Meta tokenizer.model
    written from it tokenizes the same)."""
    m = Merger(base, is_cjk)
    wanted: list[str] = []
    for step in steps:
        token = step[1] + step[2] if step[0] == "merge" else step[1]
        if token in m.vocab or token in m.specials:
            if token in base.vocab and _complete(token):
                m.skipped["already in the vocabulary"] += 1
            continue
        why = m.refusal(token, whole=True)
        if why is not None:
            if _complete(token):  # intermediate byte pieces of the add vocabulary are not counted
                m.skipped[why] += 1
            continue
        if step[0] == "merge" and step[1] in m.vocab and step[2] in m.vocab:
            m.add(token, step[1], step[2])
        else:
            wanted.append(token)
    for token in wanted:
        if token not in m.vocab and not m.chain(token):
            m.skipped["cannot be built without a non-CJK intermediate piece"] += 1
    return MergeResult(_merged_json(base, m), m.new, m.skipped)


def _complete(token: str) -> bool:
    """The token's bytes are whole UTF-8 characters."""
    data = token_bytes(token)
    try:
        data.decode("utf-8")
    except (UnicodeDecodeError, AttributeError):
        return False
    return True


def _merged_json(base: ByteLevelBPE, m: Merger) -> dict:
    data = json.loads(json.dumps(base.data))
    model = data["model"]
    # tokenizers numbers an added token that is not in the model's vocabulary after the model's last id
    # (ignoring the id written beside it), which would now collide with a new token: list the added tokens
    # in the model's vocabulary at their own ids (BPE never produces them: no merge makes them)
    vocab = dict(m.vocab)
    for added in base.added:
        vocab.setdefault(added["content"], added["id"])
    model["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    extra = all_split_merges(m.vocab, m.new)
    as_strings = bool(model.get("merges")) and isinstance(model["merges"][0], str)
    merged = list(base.merges) + extra
    model["merges"] = [f"{a} {b}" for a, b in merged] if as_strings else [list(p) for p in merged]
    return data


# --- steps from the add vocabularies ------------------------------------------------------------
def bpe_steps(add: ByteLevelBPE) -> list[Step]:
    """A byte-level add vocabulary (`vocab train --base`): its merges, in its order."""
    return [("merge", a, b) for a, b in add.merges]


def sp_steps(proto) -> list[Step]:
    """A SentencePiece add (e.g. Chinese-LLaMA's chinese_sp.model) in the byte alphabet (▁ -> space): its
    single characters first (each built from bytes), then each piece from every split of it into two
    pieces, in sentencepiece's merge order (score high to low), as vocab/hf.py's sp_merges."""
    from zhtune.vocab.hf import NORMAL, USER_DEFINED, SPACE, sp_merges

    def tok(piece: str) -> str:
        return to_token(piece.replace(SPACE, " ").encode("utf-8"))

    ordered = sorted((-p.score, i, p.piece) for i, p in enumerate(proto.pieces) if p.type in (NORMAL, USER_DEFINED))
    chars = [("token", tok(piece)) for _, _, piece in ordered if len(piece.replace(SPACE, " ")) == 1]
    return chars + [("merge", tok(a), tok(b)) for a, b in sp_merges(proto)]


def char_steps(chars: list[str]) -> list[Step]:
    """`--mode chars`: single characters."""
    return [("token", to_token(ch.encode("utf-8"))) for ch in chars]


# --- the `vocab merge` command for a byte-level base ---------------------------------------------
BASE_DIR = "base_tokenizer"  # the base's tokenizer files, kept beside the merged one for the embedding init
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def add_steps(base: ByteLevelBPE, path, flag: str = "--add") -> tuple[list[Step], str]:
    """The steps of one --add vocabulary (a byte-level tokenizer.json from `vocab train --base`, or a
    SentencePiece .model) and its resolved path; other byte alphabets and normalisations are refused."""
    from pathlib import Path

    from zhtune.errors import ZhtuneError
    from zhtune.vocab.bytelevel import is_bytelevel, model_type, normalizer_json, read_json

    path = Path(path).expanduser()
    json_file = path / "tokenizer.json" if path.is_dir() else path
    if json_file.suffix == ".json" and json_file.is_file():
        data = read_json(json_file)
        if not is_bytelevel(data):
            raise ZhtuneError(f"{json_file} is a {model_type(data)} tokenizer outside the byte alphabet of the base",
                              where=f"{flag} {path}", expected="a byte-level BPE tokenizer.json (`zhtune vocab train "
                              "--base BASE`) or a SentencePiece .model",
                              hint="its tokens are not GPT-2 byte strings, so they cannot be merged as BPE tokens")
        if normalizer_json(data) != normalizer_json(base.data):
            raise ZhtuneError(f"{json_file} normalises text differently from the base (normalizer "
                              f"{normalizer_json(data)} vs {normalizer_json(base.data)})", where=f"{flag} {path}",
                              expected="the base's own normaliser",
                              hint=f"train it with `zhtune vocab train --base {base.path.parent}`")
        return bpe_steps(ByteLevelBPE(json_file, data)), str(json_file)
    from zhtune.vocab.hf import resolve_base

    model = resolve_base(path, flag=flag)
    proto = read_sp_model_checked(model, base, flag)
    return sp_steps(proto), str(model)


# SentencePiece normalisations whose pieces are valid text for a base without case folding; the others
# (nfkc_cf, nmt_nfkc_cf: lower-cased pieces) describe text the base never sees that way
SP_NORMALISATIONS = ("identity", "nfkc", "nmt_nfkc", "")


def read_sp_model_checked(model, base: ByteLevelBPE, flag: str):
    from zhtune.errors import ZhtuneError
    from zhtune.vocab.hf import read_sp_model

    proto = read_sp_model(model, f"{flag} model")
    name = proto.normalizer_spec.name
    if name not in SP_NORMALISATIONS:
        raise ZhtuneError(f"{model} was trained with the {name!r} normalisation; its pieces are not text the base "
                          "tokenizes as they are", where=f"{flag} {model}",
                          expected=f"a SentencePiece model with normalisation {' / '.join(SP_NORMALISATIONS[:3])}",
                          hint=f"train one with `zhtune vocab train --base {base.path.parent}`")
    if proto.trainer_spec.model_type != 2:
        raise ZhtuneError(f"{model} is a SentencePiece unigram/word/char model, not BPE", where=f"{flag} {model}",
                          expected="a BPE SentencePiece model (its pieces come with a merge order)",
                          hint=f"train one on your corpus with `zhtune vocab train --base {base.path.parent}`")
    return proto


def merge_checks(base: ByteLevelBPE, data: dict, new_tokens: list[str], lines: list[str], is_cjk) -> dict:
    """On the check lines: non-CJK lines keep the base's ids, decode(encode(x)) == x; every new token is
    what the merges alone make of its bytes, and encoding its text gives it (when its text is a word)."""
    from tokenizers import Tokenizer

    merged, base_tok = Tokenizer.from_str(json.dumps(data)), base.tokenizer()
    plain = [line for line in lines if not any(is_cjk(ch) for ch in line)]
    ids = [e.ids for e in merged.encode_batch(plain, add_special_tokens=False)]
    base_ids = [e.ids for e in base_tok.encode_batch(plain, add_special_tokens=False)]
    enc = merged.encode_batch(lines, add_special_tokens=False)
    round_trip = sum(merged.decode(e.ids, skip_special_tokens=False) == line for e, line in zip(enc, lines))
    merges_only = json.loads(json.dumps(data))
    merges_only["model"]["ignore_merges"] = False
    bpe = Tokenizer.from_str(json.dumps(merges_only)).model
    reachable = sum([t.value for t in bpe.tokenize(tok)] == [tok] for tok in new_tokens)
    words = [tok for tok in new_tokens if _complete(tok) and len(merged.pre_tokenizer.pre_tokenize_str(
        token_bytes(tok).decode("utf-8"))) == 1]
    texts = [token_bytes(tok).decode("utf-8") for tok in words]
    own = sum(e.ids == [merged.token_to_id(tok)] for e, tok in
              zip(merged.encode_batch(texts, add_special_tokens=False), words))
    first = next((line for line, a, b in zip(plain, ids, base_ids) if a != b), None)
    return {"check_lines": len(lines), "roundtrip_ok": round_trip, "non_chinese_lines": len(plain),
            "non_chinese_unchanged": sum(a == b for a, b in zip(ids, base_ids)), "first_changed": first,
            "added_tokens": len(new_tokens), "reachable_by_merges": reachable, "word_tokens": len(words),
            "word_tokens_encode_to_themselves": own}


def write_merged(base: ByteLevelBPE, data: dict, out) -> None:
    """merged_tokenizer_hf/: tokenizer.json + the base's tokenizer_config.json (chat_template, specials)
    and special_tokens_map.json; base_tokenizer/: the base's own files."""
    import shutil
    from pathlib import Path

    from tokenizers import Tokenizer

    from zhtune.io import atomic_write_text

    out = Path(out)
    atomic_write_text(out / "tokenizer.json", Tokenizer.from_str(json.dumps(data)).to_str(pretty=True) + "\n")
    src = base.path.parent
    (out / BASE_DIR).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(base.path, out / BASE_DIR / "tokenizer.json")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            shutil.copyfile(src / name, out / BASE_DIR / name)
