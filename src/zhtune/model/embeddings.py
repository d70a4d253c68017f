"""Grow a model's vocabulary to its (merged) tokenizer and start each new row from what the model knows.

    info = expand_embeddings(model, tokenizer, base_tokenizer_path(cfg), calibration=texts)

Used by `zhtune train` when the tokenizer grew (`embedding_init`: auto | mean | logprob). "mean": each
new row of the input embeddings and of the output head is the mean of the base rows of the pieces the
BASE tokenizer splits that piece's text into ("中国" -> <0xE4><0xB8>... -> mean). "logprob" (the
default when the head is untied and there is training text to calibrate on): the output rows are
fitted so a new piece's day-0 probability tracks the base's probability of its whole text, and
byte-spelled pieces read as a neutral row; see expand_embeddings and benchmarks/embedding_init.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from zhtune.errors import ZhtuneError

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


def calibration_texts(cfg, limit: int = 512) -> list[str]:
    """Up to `limit` texts of the training data (documents, or an SFT/DPO record's turns joined), for
    fit_output_rows. Unreadable data gives [] here: the data loader reports it, with file:line, next."""
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
    picks when `calibration` texts, or a function returning them, are given and the head is not tied):
    input rows as "mean" except pieces the base spells with bytes, which get the mean of all base rows
    (_neutral_byte_rows); lm_head rows = the first base piece's row + c_t * u, fitted so the new piece's
    day-0 probability tracks the base's probability of its whole text (fit_output_rows).
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
    if callable(calibration) and method != "mean" and not (method == "auto" and tied):
        calibration = calibration()  # e.g. reading the training data: only now that it is needed
    if method == "mean" or (method == "auto" and (tied or not calibration)):
        return info
    if tied:
        raise ZhtuneError("embedding_init=logprob needs an output head of its own; this model ties it to "
                          "the input embeddings", where="embedding_init", expected="mean or auto")
    if not calibration:
        raise ZhtuneError("embedding_init=logprob needs calibration text", where="embedding_init",
                          expected="a dataset, or embedding_init=mean")
    with torch.no_grad():
        _neutral_byte_rows(inp, old, sources, _byte_ids(tokenizer, old))
    info.fit = fit_output_rows(model, tokenizer, old, sources, calibration)
    info.method = "logprob"
    return info


def _mean_rows(weight, old: int, sources: list[list[int]]) -> None:
    """weight[old + k] = mean of weight[sources[k]]; the mean of every base row where sources[k] is empty."""
    everything = weight[:old].float().mean(0)
    for offset, ids in enumerate(sources):
        row = weight[ids].float().mean(0) if ids else everything
        weight[old + offset] = row.to(weight.dtype)


def _byte_ids(tokenizer, old: int) -> set[int]:
    """The base's byte-fallback pieces <0xNN> (ids below `old`)."""
    ids = tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])
    unk = tokenizer.unk_token_id
    return {i for i in ids if i is not None and i != unk and i < old}


def _neutral_byte_rows(inp, old: int, sources: list[list[int]], byte_ids: set[int]) -> None:
    """Input rows of pieces the base spells with bytes (a character it never saw whole) = the mean of all
    base rows. Why: a mean of <0xE4><0xB8><0xAD>'s rows reads to the base like a lead byte, so it expects
    continuation bytes next; a neutral row lets it predict from the context (measured on the
    embedding_init benchmark: day-0 bits/char 1.114x -> 1.076x the base). Pieces spelled by pieces
    the base knows whole ("质量" = 质 + 量) keep the mean of those rows."""
    neutral = inp[:old].float().mean(0).to(inp.dtype)
    for k, ids in enumerate(sources):
        if any(i in byte_ids for i in ids):
            inp[old + k] = neutral


def fit_output_rows(model, tokenizer, old: int, sources: list[list[int]], texts: list[str],
                    max_positions: int = 16384, iterations: int = 30, alpha: float = 0.5, offsets=None) -> dict:
    """Set each new lm_head row to w[first base piece] + c_t * u, from one forward pass over `texts`.

    Why: a mean of byte rows scores a new piece like the average of its bytes' logits, but the base
    gives the whole text log P(b1) + log P(b2 | b1) + ...: the first piece's row carries the first
    term (and its context), c_t the rest. Llama's head has no bias, but final hidden states share a
    common direction: u solves H u ≈ 1 (least squares over the calibration states H), so adding
    c_t * u to a row adds ≈ c_t to its logit at every position. c_t is fitted without gradients
    (iterative proportional fitting): each new piece's expected count under the day-0 softmax over
    the calibration positions is made equal to its count there (+ alpha), which also accounts for
    the probability the old byte rows keep.
    """
    import torch

    hidden, nxt = _calibration_states(model, tokenizer, texts, max_positions)   # (N, d), (N,)
    head = model.get_output_embeddings().weight.detach()                         # (size, d)
    h = hidden.to(head.device)
    w_old = head[:old].float()                                                   # (old, d)
    rows = torch.stack([w_old[ids[0]] if ids else head[old + k].float() for k, ids in enumerate(sources)])
    if offsets is not None:
        rows = rows + offsets.to(rows)
    gram = h.T @ h                                                               # (d, d)
    ridge = 1e-4 * gram.diagonal().mean() * torch.eye(gram.shape[0], device=h.device)
    u = torch.linalg.solve(gram + ridge, h.sum(0))                               # (d,)
    proj = h @ u                                                                 # (N,) ≈ 1
    counts = torch.bincount((nxt[nxt >= old] - old).to(h.device), minlength=len(sources)).float() + alpha
    z_old = torch.cat([torch.logsumexp(part @ w_old.T, -1) for part in h.split(1024)])  # (N,)
    c = torch.zeros(len(sources), device=h.device)
    for _ in range(iterations):
        expected = torch.zeros_like(c)
        for part, p, zo in zip(h.split(1024), proj.split(1024), z_old.split(1024)):
            z = part @ rows.T + p[:, None] * c[None]                             # (chunk, new)
            total = torch.logaddexp(zo, torch.logsumexp(z, -1))
            expected += torch.exp(z - total[:, None]).sum(0)
        step = counts.log() - expected.log()
        c = (c + step).clamp(-30.0, 10.0)
        if float(step.abs().max()) < 0.01:  # every expected count within 1% of its target
            break
    with torch.no_grad():
        head[old:] = (rows + c[:, None] * u[None]).to(head.dtype)
    return {"positions": int(len(nxt)), "bias_fit_rms": float((proj - 1).pow(2).mean().sqrt()),
            "seen_pieces": int((counts > alpha).sum())}


def _calibration_states(model, tokenizer, texts: list[str], max_positions: int, block: int = 512,
                        batch: int = 8):
    """Final hidden states (N, d) float32 on the CPU and the next token ids (N,) of `texts` (BOS + text
    + EOS, each cut to `block` tokens), until `max_positions` positions."""
    import torch

    seqs, total = [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
        ids = (ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))[:block]
        if len(ids) > 1:
            seqs.append(ids)
            total += len(ids) - 1
        if total >= max_positions:
            break
    device = model.get_input_embeddings().weight.device
    decoder, was_training = model.get_decoder(), model.training
    # train mode: an eval-mode forward repacks bitsandbytes' 4-bit weights on the CPU, after which
    # QLoRA gets no gradients (docs NOTES); Llama-family models have no dropout to disturb the states
    model.train()
    states, nexts = [], []
    seqs.sort(key=len)
    with torch.no_grad():
        for start in range(0, len(seqs), batch):
            group = seqs[start:start + batch]
            width = max(map(len, group))
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for row, seq in enumerate(group):
                ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
            out = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            for row, seq in enumerate(group):  # positions 0..len-2 predict tokens 1..len-1
                states.append(out[row, :len(seq) - 1].float().cpu())
                nexts.append(torch.tensor(seq[1:]))
    model.train(was_training)
    return torch.cat(states)[:max_positions], torch.cat(nexts)[:max_positions]


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
