"""The vocabulary of `zhtune export gguf` (tokenizer.ggml.*): a SentencePiece tokenizer.model as llama.cpp's `llama`
vocabulary (pieces, scores and types as sentencepiece has them, then the added tokens), or a byte-level BPE
tokenizer.json as its `gpt2` vocabulary with the merges and the pre-tokenizer name llama.cpp knows it by.

    add_vocab(writer, model_dir, n_vocab)      # called by export/gguf.py's metadata step
"""

from __future__ import annotations

from pathlib import Path

from zhtune.errors import ZhtuneError

# byte-level pre-tokenizer family (vocab/bytelevel.py) -> the name llama.cpp gives it (tokenizer.ggml.pre)
LLAMA_CPP_PRE = {"llama3": "llama-bpe", "qwen2": "qwen2", "tekken": "tekken", "gpt2": "gpt-2", "smollm": "smollm"}


def tokenizer_of(model_dir: Path) -> tuple[str, Path]:
    """("sentencepiece", tokenizer.model) or ("bytelevel", tokenizer.json) of a model folder to export."""
    from zhtune.vocab.bytelevel import pre_tokenizer_family, read_json, tokenizer_kind

    kind, found = tokenizer_kind(model_dir, flag="--model")
    if kind == "bytelevel":
        family = pre_tokenizer_family(read_json(found))
        if family not in LLAMA_CPP_PRE:
            raise ZhtuneError(f"the pre-tokenizer of {found} is not one llama.cpp implements", where=str(found),
                              expected=f"a byte-level BPE pre-tokenizer of: {', '.join(LLAMA_CPP_PRE)}",
                              hint="llama.cpp would split text differently from transformers; export with "
                                   "llama.cpp's own convert_hf_to_gguf.py if it knows this model")
        return kind, found
    if not (model_dir / "tokenizer.model").is_file():
        raise ZhtuneError(f"tokenizer.model missing in {model_dir}", where=str(model_dir),
                          expected="the SentencePiece tokenizer.model beside config.json, or a byte-level BPE "
                                   "tokenizer.json",
                          hint="without it llama.cpp would tokenize Chinese differently; copy it from the "
                               "tokenizer folder (zhtune merge copies it for you)")
    return "sentencepiece", model_dir / "tokenizer.model"


def _pad(tokens, scores, types, n_vocab: int, model_dir: Path) -> None:
    import gguf

    if len(tokens) > n_vocab:
        raise ZhtuneError(f"tokenizer has {len(tokens)} tokens but the model only {n_vocab} rows",
                          where=str(model_dir), expected="config vocab_size >= len(tokenizer)")
    for i in range(len(tokens), n_vocab):  # embedding rows padded past the tokenizer
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))


def _sp_vocab(model_dir: Path, n_vocab: int):
    """(tokens, scores, types) for tokenizer.ggml.*: sentencepiece pieces, then added tokens, then padding."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer

    proto = pb.ModelProto()
    proto.ParseFromString((model_dir / "tokenizer.model").read_bytes())
    # ModelProto.SentencePiece.Type numbers equal gguf.TokenType's (NORMAL=1 ... BYTE=6)
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(p.type) or int(gguf.TokenType.NORMAL) for p in proto.pieces]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    extra = sorted((i, t) for t, i in tok.get_vocab().items() if i >= len(tokens))
    special = set(tok.all_special_tokens)
    for i, text in extra:
        if i != len(tokens):
            raise ZhtuneError(f"added token {text!r} has id {i}, expected {len(tokens)}", where=str(model_dir),
                              expected="added tokens numbered right after the sentencepiece pieces")
        tokens.append(text.encode("utf-8"))
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.CONTROL if text in special else gguf.TokenType.USER_DEFINED))
    _pad(tokens, scores, types, n_vocab, model_dir)
    return tokens, scores, types


def _bpe_vocab(tokenizer_json: Path, n_vocab: int):
    """(tokens, types) for a byte-level BPE: the model's tokens and the added ones, by id; gaps and rows
    past the tokenizer as unused [PADn] (as llama.cpp's converter does)."""
    import gguf

    from zhtune.vocab.bytelevel import read_bytelevel

    bpe = read_bytelevel(tokenizer_json, flag="--model")
    by_id = {i: (t, int(gguf.TokenType.NORMAL)) for t, i in bpe.vocab.items()}
    for added in bpe.added:  # special: control tokens; others (user-defined) are matched in text
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], int(kind))
    if max(by_id) >= n_vocab:
        raise ZhtuneError(f"tokenizer has ids up to {max(by_id)} but the model only {n_vocab} rows",
                          where=str(tokenizer_json), expected="config vocab_size > every token id")
    tokens, types = [], []
    for i in range(n_vocab):
        text, kind = by_id.get(i, (f"[PAD{i}]", int(gguf.TokenType.UNUSED)))
        tokens.append(text.encode("utf-8"))
        types.append(kind)
    return tokens, types, LLAMA_CPP_PRE[bpe.family]


def add_vocab(writer, model_dir: Path, n_vocab: int) -> None:
    """tokenizer.ggml.*: a SentencePiece vocabulary (llama) or a byte-level BPE one (gpt2, its merges, its llama.cpp
    pre-tokenizer name), the special token ids and whether llama.cpp adds BOS/EOS as the HF tokenizer does."""
    import gguf

    kind, found = tokenizer_of(model_dir)
    if kind == "sentencepiece":
        tokens, scores, types = _sp_vocab(model_dir, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        return
    tokens, types, pre = _bpe_vocab(found, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    import logging

    quiet = logging.getLogger("gguf.vocab")
    level, quiet.level = quiet.level, logging.ERROR  # its pair-template notes concern BERT-style separators
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    finally:
        quiet.setLevel(level)
    # whether llama.cpp adds BOS/EOS: exactly what the HF tokenizer does (its post-processor decides)
    special.add_special_token.update(_adds_bos_eos(model_dir))
    special.add_to_gguf(writer, quiet=True)


def _adds_bos_eos(model_dir: Path) -> dict[str, bool]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok("a").input_ids
    return {"bos": bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id,
            "eos": bool(ids) and tok.eos_token_id is not None and ids[-1] == tok.eos_token_id}
