"""Grow a model's vocabulary to its (merged) tokenizer and start each new row from what the model knows.

    info = expand_embeddings(model, tokenizer, base_tokenizer_path(cfg), calibration=texts)

Used by `zhtune train` when the tokenizer grew (`embedding_init`: auto | mean | logprob). "mean": each
new row of the input embeddings and of the output head is the mean of the base rows of the pieces the
BASE tokenizer splits that piece's text into ("中国" -> <0xE4><0xB8>... -> mean). "logprob" (the
default when the head is untied and there is training text to calibrate on): the output rows are
fitted so a new piece's day-0 probability tracks the base's probability of its whole text, and
input rows weigh the piece's last characters most, byte-spelled ones as a neutral row; see
expand_embeddings and benchmarks/embedding_init.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from zhtune.config import TrainConfig
from zhtune.errors import ZhtuneError
from zhtune.model.logprob_init import calibration_sequences, context_offsets, fit_output_rows

METHODS = ("auto", "mean", "logprob")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass
class Expansion:
    old_vocab: int                       # model rows before
    new_vocab: int                       # model rows after (= len(tokenizer))
    base_tokenizer: str | None = None    # what split the new pieces
    fallback_rows: list[int] = field(default_factory=list)  # new ids the base could not encode: mean of all rows
    method: str = ""                     # "mean" or "logprob": how the new lm_head rows were set
    fit: dict = field(default_factory=dict)  # logprob: calibration positions, bias-direction fit error

    @property
    def grew(self) -> bool:
        return self.new_vocab > self.old_vocab


def padding_allowance(vocab: int) -> int:
    """How much smaller than the embedding a tokenizer may be: models pad their embedding (Qwen2: +271)."""
    return max(128, vocab // 100)


def base_tokenizer_path(cfg: TrainConfig) -> Path | None:
    """The base SentencePiece model (or HF tokenizer folder) that new pieces are split with.

    Order: `base_tokenizer` in the config; what `vocab merge` recorded in the tokenizer folder;
    the model folder's own tokenizer (Chinese-LLaMA-Alpaca layouts keep the base tokenizer there).
    """
    if cfg.base_tokenizer:
        path = Path(cfg.base_tokenizer).expanduser()
        if not path.exists():
            raise ZhtuneError(f"base tokenizer not found: {path}", where="base_tokenizer",
                              expected="the base model's tokenizer.model or tokenizer folder")
        if path.is_dir() and (path / "tokenizer.model").is_file() and not _is_bytelevel_dir(path):
            return path / "tokenizer.model"
        return path
    if cfg.tokenizer_name_or_path:
        from zhtune.vocab.merge import base_sp_model_for

        found = base_sp_model_for(cfg.tokenizer_name_or_path)
        if found:
            return Path(found)
    model_dir = Path(cfg.model_name_or_path).expanduser()
    if cfg.tokenizer_name_or_path and (model_dir / "tokenizer.model").is_file() and not _is_bytelevel_dir(model_dir):
        return model_dir / "tokenizer.model"
    if cfg.tokenizer_name_or_path and (model_dir / "tokenizer.json").is_file():
        return model_dir
    return None


def _is_bytelevel_dir(folder: Path) -> bool:
    """A folder whose tokenizer.json is byte-level BPE (its tokenizer.model, if any, is tiktoken's, not ours)."""
    from zhtune.vocab.bytelevel import is_bytelevel, read_json

    return (folder / "tokenizer.json").is_file() and is_bytelevel(read_json(folder / "tokenizer.json"))


def calibration_texts(cfg: TrainConfig, limit: int = 4096) -> list[str]:
    """Up to `limit` texts of the training data (documents, or an SFT/DPO record's turns joined), for
    fit_output_rows. Unreadable data gives [] under "auto" (the data loader reports it, with file:line,
    next) and raises that error under "logprob"."""
    if cfg.embedding_init == "mean" or not cfg.dataset:
        return []
    from zhtune.data.readers import detect_format, read_records, to_messages, to_text

    texts = []
    try:
        for rec in read_records(cfg.dataset, cfg.format, cfg.columns, max_samples=limit):
            fmt = detect_format(rec, cfg.format)
            if fmt == "text":
                texts.append(to_text(rec))
            elif fmt == "preference":
                texts.append("\n".join(str(v) for v in rec.data.values() if isinstance(v, str)))
            else:
                texts.append("\n".join(m["content"] for m in to_messages(rec, fmt)))
            if len(texts) >= limit:
                break
    except ZhtuneError:
        if cfg.embedding_init == "logprob":   # asked for by name: the data's own error (file:line) is the useful one
            raise
        return []
    return [t for t in texts if t.strip()]


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


def expand_embeddings(model, tokenizer, base: Path | None, calibration=None, method: str = "auto") -> Expansion:
    """Resize `model` to len(tokenizer) and initialise the new rows (input embeddings and lm_head).

    method "mean": both rows = the mean of the base rows of the piece's text. "logprob" (what "auto"
    picks when `calibration` texts, or a function returning them, are given): input rows = a weighted
    mean over the piece's characters, byte-spelled ones neutral (_reading_rows; a byte-level BPE base
    keeps the mean); lm_head rows = the first base piece's row + c_t * u, fitted so the new piece's
    day-0 probability tracks the base's probability of its whole text (fit_output_rows). A tied head:
    "auto" keeps the mean; "logprob" keeps the mean rows and fits only c_t * u (which the inputs share).
    """
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
    if method not in METHODS:
        raise ZhtuneError(f"unknown embedding init {method!r}", where="embedding_init",
                          expected=" | ".join(METHODS))
    encode = _base_encoder(base, old)
    sources = [encode(_piece_bytes(tokenizer, i)) for i in range(old, size)]
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        inp = model.get_input_embeddings().weight          # (size, hidden)
        out = model.get_output_embeddings()
        tied = out is None or out.weight is inp
        for weight in [inp] if tied else [inp, out.weight]:
            _mean_rows(weight, old, sources)
    info.fallback_rows = [old + k for k, ids in enumerate(sources) if not ids]
    info.method = "mean"
    if callable(calibration) and method != "mean":
        calibration = calibration()  # e.g. reading the training data: only now that it is needed
    if method == "mean" or (method == "auto" and (tied or not calibration)):
        return info
    if not calibration:
        raise ZhtuneError("embedding_init=logprob needs calibration text", where="embedding_init",
                          expected="a dataset, or embedding_init=mean")
    if tied:  # one row is both the input and the output row: keep the mean as its reading and fit only the
        # shared bias direction c_t * u, so each new piece's day-0 frequency is right. Only when asked for:
        # c_t * u moves the input reading too. Measured (day-0 bits/char, mean -> this): SentencePiece tied
        # tiny base 12.58 -> 12.36; byte-level tied tiny base 10.26 -> 11.65 (the same head untied: 9.29),
        # so "auto" keeps the mean for a tied head
        info.fit = {**fit_output_rows(model, tokenizer, old, sources, calibration, start="current"), "tied": True}
    else:
        info.fit = _fit_untied(model, tokenizer, base, old, sources, calibration)
    info.method = "logprob"
    return info


def _fit_untied(model, tokenizer, base: Path, old: int, sources: list[list[int]], calibration: list[str]) -> dict:
    """logprob on an untied head: reading input rows (a SentencePiece base), then the head rows fitted with
    context offsets measured by the base on the calibration text in its own tokens."""
    import torch

    if not _tokenizer_is_bytelevel(tokenizer):  # a byte-level base keeps the mean input rows: measured on a
        # tiny llama3-style base trained on Chinese bytes (tests/model/test_embeddings_bytelevel.py, 100 / 400
        # steps), day-0 bits/char mean 10.20 / 10.39, reading rows + fitted head 10.64 / 10.67, mean rows +
        # fitted head 9.92 / 10.36: its byte tokens are how it knows Chinese, so their mean reads best
        with torch.no_grad():
            _reading_rows(model.get_input_embeddings().weight, old, sources, tokenizer)
    base_seqs = calibration_sequences(map(_base_text_encoder(base, old), calibration), *_base_bos_eos(base), 65536)
    offsets, prefixes = context_offsets(model, old, sources, base_seqs)
    fit = fit_output_rows(model, tokenizer, old, sources, calibration, offsets=offsets)
    return {**fit, "context_prefixes": prefixes}


def _mean_rows(weight, old: int, sources: list[list[int]]) -> None:
    """weight[old + k] = mean of weight[sources[k]]; the mean of every base row where sources[k] is empty."""
    everything = weight[:old].float().mean(0)
    for offset, ids in enumerate(sources):
        row = weight[ids].float().mean(0) if ids else everything
        weight[old + offset] = row.to(weight.dtype)


def _byte_ids(tokenizer, old: int) -> dict[int, int]:
    """The base's byte pieces (ids below `old`) -> their byte value: SentencePiece's <0xNN> byte fallback,
    or a byte-level BPE's single non-ASCII bytes (its ASCII bytes are whole characters)."""
    if _tokenizer_is_bytelevel(tokenizer):
        from zhtune.vocab.bytelevel import to_token

        ids = tokenizer.convert_tokens_to_ids([to_token(bytes([b])) for b in range(0x80, 0x100)])
        return {i: 0x80 + b for b, i in enumerate(ids) if i is not None and i < old}
    ids = tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])
    unk = tokenizer.unk_token_id
    return {i: b for b, i in enumerate(ids) if i is not None and i != unk and i < old}


def _tokenizer_is_bytelevel(tokenizer) -> bool:
    """A transformers tokenizer over a byte-level BPE (its tokens are GPT-2 byte strings)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


def _reading_rows(inp, old: int, sources: list[list[int]], tokenizer) -> None:
    """Input rows for "logprob": a weighted mean over the piece's CHARACTERS, weights 1, 2, 4, ... toward
    the last one. A character the base has whole is its row; one the base spells with bytes reads as
    the mean of the base's single-character rows of the same script (an average Han character; the
    mean of all base rows if the base has none). Why: the mean of <0xE4><0xB8><0xAD>'s rows reads to
    the base like a lead byte, so it expects continuation bytes next; and what follows a word depends
    most on its last character. Measured on benchmarks/embedding_init.py (day-0 bits/char / base, with
    the fitted head): mean of the base rows 1.119x, this 1.074x; base with 824 whole Han characters:
    1.142x -> 1.121x."""
    import torch

    byte_value = _byte_ids(tokenizer, old)
    neutral = _script_means(inp, old, tokenizer)
    for k, ids in enumerate(sources):
        units: list = []  # base ids, or bytes of a character the base spells with byte pieces
        for i in ids:
            if i not in byte_value:
                units.append(i)
            elif units and isinstance(units[-1], bytes) and 0x80 <= byte_value[i] < 0xC0:
                units[-1] += bytes([byte_value[i]])  # a continuation byte of the same character
            else:
                units.append(bytes([byte_value[i]]))
        if not units:
            continue
        weights = torch.tensor([2.0 ** j for j in range(len(units))])
        vecs = torch.stack([inp[u].float() if isinstance(u, int) else neutral(u) for u in units])
        inp[old + k] = (weights[:, None] * vecs).sum(0).div(weights.sum()).to(inp.dtype)


def _script(char: str) -> str:
    """'CJK' for 中, 'HIRAGANA', 'LATIN', ...: the first word of the character's Unicode name."""
    import unicodedata

    return unicodedata.name(char, "?").split(" ")[0]


def _script_means(inp, old: int, tokenizer):
    """bytes of one character -> the mean input row of the base's single characters of its script."""
    import torch

    everything = inp[:old].float().mean(0)
    by_script: dict[str, list[int]] = {}
    for i in range(old):
        text = _piece_bytes(tokenizer, i).decode("utf-8", errors="replace").lstrip(" ")
        if len(text) == 1 and text != "\ufffd":
            by_script.setdefault(_script(text), []).append(i)
    means: dict[str, torch.Tensor] = {}

    def neutral(data: bytes):
        text = data.decode("utf-8", errors="ignore")
        key = _script(text[0]) if len(text) == 1 else ""
        if key not in means:
            ids = by_script.get(key)
            means[key] = inp[ids].float().mean(0) if ids else everything
        return means[key]

    return neutral


def _piece_bytes(tokenizer, token_id: int) -> bytes:
    """The text of one token as bytes: SentencePiece's ▁ is a space, <0xNN> is that byte."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return b""
    added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    if _tokenizer_is_bytelevel(tokenizer) and piece not in added:
        from zhtune.vocab.bytelevel import token_bytes

        data = token_bytes(piece)  # GPT-2 byte string -> its bytes, also for part of a character
        return data if data is not None else piece.encode("utf-8")
    match = _BYTE_PIECE.match(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    if piece in added:  # e.g. <|im_start|>: its literal text
        return piece.encode("utf-8")
    if "\u2581" in piece or (getattr(tokenizer, "vocab_file", None) or "").endswith(".model"):
        return piece.replace("\u2581", " ").encode("utf-8")
    return tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode("utf-8")


def _base_encoder(base: Path, limit: int):
    """bytes -> base token ids (all < limit): sentencepiece without the dummy prefix, a byte-level BPE's
    merges on the bytes (also part of a character), or an HF tokenizer."""
    if base.is_file():
        return _sp_encoder(base, limit)
    if _is_bytelevel_dir(base):
        return _bytelevel_encoder(base, limit)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))

    def encode(data: bytes) -> list[int]:
        ids = tok.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False)
        return [i for i in ids if i < limit and i != tok.unk_token_id]

    return encode


def _base_text_encoder(base: Path, limit: int):
    """text -> base token ids (< limit) the way the base reads running text (dummy prefix and all)."""
    if base.is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(base))
        return lambda text: [i for i in sp.encode(text) if i < limit]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    return lambda text: [i for i in tok.encode(text, add_special_tokens=False) if i < limit]


def _base_bos_eos(base: Path) -> tuple[int | None, int | None]:
    if base.is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(base))
        return (sp.bos_id() if sp.bos_id() >= 0 else None), (sp.eos_id() if sp.eos_id() >= 0 else None)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    return tok.bos_token_id, tok.eos_token_id


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


def _bytelevel_encoder(folder: Path, limit: int):
    """bytes -> what the base byte-level BPE makes of them as one word (its model, no pre-tokenizer)."""
    from tokenizers import Tokenizer

    from zhtune.vocab.bytelevel import to_token

    model = Tokenizer.from_file(str(folder / "tokenizer.json")).model

    def encode(data: bytes) -> list[int]:
        return [t.id for t in model.tokenize(to_token(data)) if t.id < limit] if data else []

    return encode
