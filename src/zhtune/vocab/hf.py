"""SentencePiece model -> a Hugging Face tokenizer folder whose fast tokenizer gives sentencepiece's ids.

Used by `zhtune vocab merge` and the test fixtures: `write_hf_tokenizer(sp_model, out_dir)`.

Why not transformers' own converter: it rebuilds merges from the vocabulary in a way that does not
follow sentencepiece's BPE on merged vocabularies, and LlamaTokenizer's Metaspace pre-tokenizer
drops the dummy prefix of a text that starts with a space (" a" -> "▁a" instead of "▁▁a"). So we
build tokenizer.json ourselves:

- merges: sentencepiece BPE repeatedly joins the adjacent pair whose *joined piece* has the highest
  score (leftmost on ties). A fast BPE joins the pair of lowest merge rank. Listing every split
  (left, right) of every piece, both halves being pieces, ranked by the joined piece's score,
  reproduces it exactly as long as scores are distinct (`vocab merge --mode preserve|chars` make
  them distinct; `all-pieces` gives every new piece score 0, which no rank order can reproduce).
- normalizer Prepend("▁") + Replace(" ", "▁") (sentencepiece's add_dummy_prefix and whitespace
  escaping, also for a leading space), no pre-tokenizer (sentencepiece sees the whole text at once),
  byte_fallback for characters outside the vocabulary, and a decoder that undoes all of it.
- tokenizer_config.json names PreTrainedTokenizerFast (transformers 5 maps it to TokenizersBackend;
  transformers 4, which vLLM and others may pin, knows it too): the generic fast tokenizer, which
  loads tokenizer.json as written. Naming LlamaTokenizer would make transformers rebuild the
  pipeline with the Metaspace pre-tokenizer above.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

from zhtune.errors import ZhtuneError
from zhtune.io import atomic_write_bytes, atomic_write_json

# sentencepiece_model.proto piece types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # ▁, sentencepiece's visible space
HF_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def resolve_base(path: str | Path, flag: str = "--base") -> Path:
    """The SentencePiece file of a base: a .model path or an HF folder holding tokenizer.model."""
    path = Path(path).expanduser()
    if not path.exists():
        what = "base tokenizer" if flag == "--base" else "tokenizer"  # --add names the vocabulary to add
        raise ZhtuneError(f"{what} not found: {path}", where=flag,
                          expected="an HF tokenizer folder with tokenizer.model, or a tokenizer.model file")
    if path.is_file():
        return path
    # an HF folder, a `vocab train` output, or a `vocab merge` output (its HF folder)
    for name in ("tokenizer.model", "zh_sp.model", "merged_tokenizer_hf/tokenizer.model"):
        if (path / name).is_file():
            return path / name
    models = sorted(path.glob("*.model"))
    if len(models) == 1:
        return models[0]
    if (path / "tokenizer.json").is_file():
        raise ZhtuneError(f"{path} has tokenizer.json but no tokenizer.model", where=flag,
                          expected="the SentencePiece model (tokenizer.model) that LLaMA, Mistral and "
                                   "Chinese-LLaMA ship next to tokenizer.json",
                          hint="this tokenizer.json is SentencePiece-style BPE (not byte-level): copy tokenizer.model "
                               "from the original model repository into this folder")
    raise ZhtuneError(f"no tokenizer.model in {path}", where=flag,
                      expected="an HF tokenizer folder with tokenizer.model, or a .model file")


def read_sp_model(path: str | Path, what: str = "SentencePiece model"):
    """Parse a SentencePiece .model file into a ModelProto; a ZhtuneError names the file otherwise."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = Path(path)
    if not path.is_file():
        raise ZhtuneError(f"{what} not found: {path}", where=str(path),
                          expected="a SentencePiece .model file (e.g. tokenizer.model)")
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except (DecodeError, RuntimeError, ValueError) as exc:
        proto = None
        reason = str(exc)
    else:
        reason = "no pieces"
    if proto is None or len(proto.pieces) == 0:
        raise ZhtuneError(f"not a SentencePiece model: {path} ({reason})", where=str(path),
                          expected="a SentencePiece .model file (protobuf), like LLaMA's tokenizer.model")
    return proto


def sp_encoder(model: str | Path):
    """text (or a list of texts) -> sentencepiece ids, for the model file `model`."""
    return sp_processor(read_sp_model(model)).encode


def sp_processor(proto):
    """A sentencepiece processor for a ModelProto (serialised deterministically)."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString(deterministic=True))


def sp_merges(proto) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a piece, in the order sentencepiece BPE joins them.

    Pieces that take part: normal and user-defined ones (sentencepiece's `pieces_` map).
    Order: score of the joined piece, highest first; then the joined piece's id; then the split
    point (ties of one piece only matter for periodic strings like "aba", which are rare).
    """
    scores = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type in (NORMAL, USER_DEFINED)}
    ranked = []
    for piece, (score, pid) in scores.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in scores and right in scores:
                ranked.append((-score, pid, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _normalizer(spec):
    """sentencepiece's normalizer_spec as a tokenizers normalizer (None when it does nothing)."""
    from tokenizers import Regex, normalizers

    steps = []
    if spec.precompiled_charsmap and spec.name not in ("identity", ""):
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE if spec.escape_whitespaces else " "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps) if steps else None


def build_fast_tokenizer(proto):
    """A `tokenizers.Tokenizer` that encodes and decodes like the sentencepiece BPE model `proto`."""
    from tokenizers import AddedToken, Tokenizer, decoders, processors
    from tokenizers.models import BPE

    if proto.trainer_spec.model_type != 2:  # 1 unigram, 2 bpe, 3 word, 4 char
        raise ZhtuneError("only SentencePiece BPE models can be written as a fast BPE tokenizer",
                          where=f"model_type={proto.trainer_spec.model_type}",
                          expected="a BPE SentencePiece model (LLaMA, Mistral, `zhtune vocab train`)")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = next((p.piece for p in proto.pieces if p.type == UNKNOWN), None)
    model = BPE(vocab=vocab, merges=sp_merges(proto), unk_token=unk, fuse_unk=True,
                byte_fallback=bool(proto.trainer_spec.byte_fallback), dropout=None)
    tok = Tokenizer(model)
    tok.normalizer = _normalizer(proto.normalizer_spec)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    special = [AddedToken(p.piece, special=True, normalized=False)
               for p in proto.pieces if p.type in (UNKNOWN, CONTROL)]
    tok.add_special_tokens(special)
    # User-defined pieces are matched in the text, as sentencepiece does. One difference remains:
    # the text after any added token gets its own dummy prefix ▁ (the normaliser runs per section;
    # sentencepiece adds it once). normalized=True would not help: the token itself gets the prefix.
    user = [AddedToken(p.piece, special=False, normalized=False) for p in proto.pieces if p.type == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    bos = _piece_of(proto, proto.trainer_spec.bos_id)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, proto.trainer_spec.bos_id)])
    return tok


def _piece_of(proto, index: int) -> str | None:
    return proto.pieces[index].piece if 0 <= index < len(proto.pieces) else None


def tokenizer_config(proto, extra_config: dict | None = None) -> dict:
    """tokenizer_config.json: the generic fast backend, BOS added, specials named from the model."""
    spec = proto.trainer_spec
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": spec.bos_id >= 0, "add_eos_token": False,
        "bos_token": _piece_of(proto, spec.bos_id), "eos_token": _piece_of(proto, spec.eos_id),
        "unk_token": _piece_of(proto, spec.unk_id), "pad_token": _piece_of(proto, spec.pad_id),
        "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000,
        "padding_side": "left",
    }
    config.update(extra_config or {})
    return config


def write_hf_tokenizer(sp_model: str | Path, out_dir: str | Path, extra_config: dict | None = None) -> Path:
    """Write an HF tokenizer folder for `sp_model` into `out_dir` (created; files written atomically).

    Files: tokenizer.model (the sentencepiece model, for llama.cpp and sentencepiece users),
    tokenizer.json (fast), tokenizer_config.json, special_tokens_map.json.
    """
    proto = read_sp_model(sp_model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if Path(sp_model).resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(sp_model, out / "tokenizer.model")
    tok = build_fast_tokenizer(proto)
    # tokenizers writes vocab by id and merges by rank: the same model gives the same bytes
    atomic_write_bytes(out / "tokenizer.json", (tok.to_str(pretty=True) + "\n").encode("utf-8"))
    config = tokenizer_config(proto, extra_config)
    atomic_write_json(out / "tokenizer_config.json", config)
    atomic_write_json(out / "special_tokens_map.json",
                      {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k)})
    return out


def compare_with_sp(tokenizer_dir: str | Path, lines: Iterable[str], sp_model: str | Path | None = None,
                    use_transformers: bool = True) -> dict:
    """Encode each line with the HF folder and with sentencepiece; count agreement.

    use_transformers: load the folder with AutoTokenizer (what training does); False reads
    tokenizer.json with `tokenizers` alone, which avoids importing torch (seconds) and runs the
    same pipeline (the tests check that AutoTokenizer keeps it).
    Returns {"lines": n, "same_ids": k, "roundtrip": r, "first_difference": {...} | None}.
    """
    folder = Path(tokenizer_dir)
    sp = sp_processor(read_sp_model(sp_model or folder / "tokenizer.model"))
    if use_transformers:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(folder))
    else:
        hf = _FastOnly(folder / "tokenizer.json")
    n = same = roundtrip = 0
    first = None
    for line in lines:
        n += 1
        ids_sp = sp.encode(line)
        ids_hf = hf.encode(line, add_special_tokens=False)
        if ids_sp == ids_hf:
            same += 1
        elif first is None:
            at = next((i for i, (a, b) in enumerate(zip(ids_sp, ids_hf)) if a != b), min(len(ids_sp), len(ids_hf)))
            first = {"line": n, "text": line[:80], "token": at, "sentencepiece": sp.id_to_piece(ids_sp[at:at + 6]),
                     "hf": hf.convert_ids_to_tokens(ids_hf[at:at + 6])}
        roundtrip += hf.decode(ids_hf) == line
    return {"lines": n, "same_ids": same, "roundtrip": roundtrip, "first_difference": first}


class _FastOnly:
    """The three calls compare_with_sp needs, on a bare `tokenizers.Tokenizer`."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.tok.id_to_token(i) for i in ids]
