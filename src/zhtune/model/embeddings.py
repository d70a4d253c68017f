"""Grow a model's vocabulary to its (merged) tokenizer and start each new row from what the model knows.

    info = expand_embeddings(model, tokenizer, base_tokenizer_path(cfg))

Each new row of the input embeddings and of the output head is the mean of the base rows of the
pieces the BASE tokenizer splits that new piece's text into ("中国" -> <0xE4><0xB8>... -> mean),
so an expanded model behaves like the base on day 0 instead of emitting noise. Used by `zhtune train`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from zhtune.errors import ZhtuneError

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass
class Expansion:
    old_vocab: int                       # model rows before
    new_vocab: int                       # model rows after (= len(tokenizer))
    base_tokenizer: str | None = None    # what split the new pieces
    fallback_rows: list[int] = field(default_factory=list)  # new ids the base could not encode: mean of all rows

    @property
    def grew(self) -> bool:
        return self.new_vocab > self.old_vocab


def padding_allowance(vocab: int) -> int:
    """How much smaller than the embedding a tokenizer may be: models pad their embedding (Qwen2: +271)."""
    return max(128, vocab // 100)


def base_tokenizer_path(cfg) -> Path | None:
    """The base SentencePiece model (or HF tokenizer folder) that new pieces are split with.

    Order: `base_tokenizer` in the config; what `vocab merge` recorded in the tokenizer folder;
    the model folder's own tokenizer (Chinese-LLaMA-Alpaca layouts keep the base tokenizer there).
    """
    if cfg.base_tokenizer:
        path = Path(cfg.base_tokenizer).expanduser()
        if not path.exists():
            raise ZhtuneError(f"base tokenizer not found: {path}", where="base_tokenizer",
                              expected="the base model's tokenizer.model or tokenizer folder")
        if path.is_dir() and (path / "tokenizer.model").is_file():
            return path / "tokenizer.model"
        return path
    if cfg.tokenizer_name_or_path:
        try:
            from zhtune.vocab.merge import base_sp_model_for
        except ImportError:  # vocab merge not installed in this build
            base_sp_model_for = None
        if base_sp_model_for is not None:
            found = base_sp_model_for(cfg.tokenizer_name_or_path)
            if found:
                return Path(found)
    model_dir = Path(cfg.model_name_or_path).expanduser()
    if cfg.tokenizer_name_or_path and (model_dir / "tokenizer.model").is_file():
        return model_dir / "tokenizer.model"
    if cfg.tokenizer_name_or_path and (model_dir / "tokenizer.json").is_file():
        return model_dir
    return None


def check_vocab_sizes(model, tokenizer, where: str = "tokenizer_name_or_path") -> tuple[int, int]:
    """(model rows, tokenizer size); a tokenizer smaller than the model (beyond padding) is refused."""
    rows = model.get_input_embeddings().weight.shape[0]
    size = len(tokenizer)
    if size < rows - padding_allowance(rows):
        raise ZhtuneError(
            f"the tokenizer has {size} tokens but the model has {rows} embedding rows", where=where,
            expected="the tokenizer the model was trained with (or a larger, merged one)",
            hint="a smaller tokenizer maps ids to the wrong rows: e.g. the original LLaMA tokenizer with "
                 "a Chinese-LLaMA model; point tokenizer_name_or_path at the model's own tokenizer")
    return rows, size


def expand_embeddings(model, tokenizer, base: Path | None) -> Expansion:
    """Resize `model` to len(tokenizer) and initialise the new rows (input embeddings and lm_head)."""
    import torch

    old, size = check_vocab_sizes(model, tokenizer)
    info = Expansion(old_vocab=old, new_vocab=max(old, size), base_tokenizer=str(base) if base else None)
    if size <= old:
        return info
    if base is None:
        raise ZhtuneError(f"the tokenizer has {size - old} new tokens but the base tokenizer is unknown",
                          where="base_tokenizer", expected="the base model's tokenizer.model (or folder)",
                          hint="set base_tokenizer=path/to/base/tokenizer.model so new rows start from the "
                               "mean of the base rows of their text")
    encode = _base_encoder(base, old)
    sources = [encode(_piece_bytes(tokenizer, i)) for i in range(old, size)]
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        inp = model.get_input_embeddings().weight          # (size, hidden)
        out = model.get_output_embeddings()
        heads = [inp] if out is None or out.weight is inp else [inp, out.weight]
        for weight in heads:
            everything = weight[:old].float().mean(0)
            for offset, ids in enumerate(sources):
                row = old + offset
                if ids:
                    weight[row] = weight[ids].float().mean(0).to(weight.dtype)
                else:  # nothing the base can encode (e.g. an empty piece): the mean of every row
                    weight[row] = everything.to(weight.dtype)
    info.fallback_rows = [old + k for k, ids in enumerate(sources) if not ids]
    return info


def _piece_bytes(tokenizer, token_id: int) -> bytes:
    """The text of one token as bytes: SentencePiece's ▁ is a space, <0xNN> is that byte."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return b""
    match = _BYTE_PIECE.match(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    if piece in added:  # e.g. <|im_start|>: its literal text
        return piece.encode("utf-8")
    if "\u2581" in piece or (getattr(tokenizer, "vocab_file", None) or "").endswith(".model"):
        return piece.replace("\u2581", " ").encode("utf-8")
    return tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode("utf-8")


def _base_encoder(base: Path, limit: int):
    """bytes -> base token ids (all < limit): sentencepiece without the dummy prefix, or an HF tokenizer."""
    if base.is_file():
        return _sp_encoder(base, limit)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))

    def encode(data: bytes) -> list[int]:
        ids = tok.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False)
        return [i for i in ids if i < limit and i != tok.unk_token_id]

    return encode


def _sp_encoder(model_file: Path, limit: int):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise ZhtuneError(f"not a SentencePiece model: {model_file}", where="base_tokenizer",
                          expected="a tokenizer.model file") from None
    # a piece's own text already says whether it starts a word ("▁中国" vs "中国"): no dummy prefix
    proto.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    unk = sp.unk_id()

    def encode(data: bytes) -> list[int]:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # a lone byte piece: the base's own byte rows
            ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in data]
            return [i for i in ids if i != unk and i < limit]
        same = sp.piece_to_id(text.replace(" ", "\u2581"))
        if text and same != unk and same < limit:
            return [same]
        return [i for i in sp.encode(text) if i != unk and i < limit]

    return encode
