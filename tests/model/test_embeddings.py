"""New embedding rows start from the base: English logits unchanged, Chinese rows = mean of base rows."""

from __future__ import annotations

import pytest
import torch

from zhtune.config import TRAIN_ALIASES, TrainConfig, load_config
from zhtune.errors import ZhtuneError
from zhtune.model.embeddings import _piece_bytes, base_tokenizer_path, expand_embeddings
from zhtune.model.load import load_model, load_tokenizer

ENGLISH = "The quick brown fox jumps over the lazy dog, and the model reads it the same way."


def _cfg(model_dir, tok_dir=None, **kw):
    args = [f"model_name_or_path={model_dir}", "output_dir=unused"]
    if tok_dir:
        args.append(f"tokenizer_name_or_path={tok_dir}")
    args += [f"{k}={v}" for k, v in kw.items()]
    return load_config(TrainConfig, None, args, TRAIN_ALIASES)


@pytest.fixture(scope="module")
def grown(tiny_model_dir, grown_tokenizer_dir):
    cfg = _cfg(tiny_model_dir, grown_tokenizer_dir)
    tok = load_tokenizer(cfg)
    model = load_model(cfg)
    info = expand_embeddings(model, tok, base_tokenizer_path(cfg))
    return cfg, tok, model.eval(), info


def test_base_tokenizer_is_found(tiny_model_dir, grown_tokenizer_dir):
    path = base_tokenizer_path(_cfg(tiny_model_dir, grown_tokenizer_dir))
    assert path is not None and path.name in ("base_tokenizer.model", "tokenizer.model")


def test_english_logits_equal_the_base(tiny_model_dir, grown):
    _, tok, model, info = grown
    assert info.grew and info.new_vocab == len(tok) > info.old_vocab == 1000
    base_cfg = _cfg(tiny_model_dir)
    base_tok, base = load_tokenizer(base_cfg), load_model(base_cfg).eval()
    ids = tok(ENGLISH, return_tensors="pt").input_ids
    assert ids.tolist() == base_tok(ENGLISH, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        new, old = model(input_ids=ids).logits, base(input_ids=ids).logits
    assert new.shape[-1] == len(tok)
    torch.testing.assert_close(new[..., :1000], old, rtol=1e-5, atol=1e-5)


def test_new_rows_are_the_mean_of_the_base_byte_rows(tiny_model_dir, grown, base_sp_model):
    import sentencepiece as spm

    _, tok, model, info = grown
    sp = spm.SentencePieceProcessor(model_file=str(base_sp_model))
    base_cfg = _cfg(tiny_model_dir)
    base = load_model(base_cfg)
    emb0, head0 = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    torch.testing.assert_close(emb[:1000], emb0)  # old rows untouched
    checked = 0
    for i in range(info.old_vocab, info.new_vocab):
        piece = tok.convert_ids_to_tokens(i)
        text = piece.lstrip("\u2581")
        assert all(sp.encode(c, out_type=str)[-1].startswith("<0x") for c in text)  # the base has no such char
        # the base spells this text as (▁ +) its UTF-8 bytes
        want = ([sp.piece_to_id("\u2581")] if piece.startswith("\u2581") else [])
        want += [sp.piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]
        torch.testing.assert_close(emb[i], emb0[want].mean(0))
        torch.testing.assert_close(head[i], head0[want].mean(0))
        checked += 1
    assert checked > 200
    # and on Chinese text, the grown tokenizer uses those rows
    ids = tok("中国的首都是北京。", add_special_tokens=False).input_ids
    assert any(i >= 1000 for i in ids)


def test_piece_text_decoding(grown):
    _, tok, _, info = grown
    i = next(i for i in range(info.old_vocab, info.new_vocab) if tok.convert_ids_to_tokens(i).startswith("\u2581"))
    assert _piece_bytes(tok, i) == tok.convert_ids_to_tokens(i).replace("\u2581", " ").encode()
    byte = tok.convert_tokens_to_ids("<0xE4>")
    assert _piece_bytes(tok, byte) == b"\xe4"


def test_smaller_tokenizer_is_refused(tmp_path, tiny_model_dir, en_corpus):
    from zhtune import tiny
    from zhtune.train.common import prepare_model
    from zhtune.vocab.hf import write_hf_tokenizer

    sp = tiny.train_base_sp(tiny.asset_lines("en_corpus.txt"), tmp_path / "small.model", vocab_size=400)
    small = write_hf_tokenizer(sp, tmp_path / "small")
    with pytest.raises(ZhtuneError) as exc:
        prepare_model(_cfg(tiny_model_dir, small))
    assert exc.value.where == "tokenizer_name_or_path" and "400" in str(exc.value)


def test_grown_vocab_without_a_known_base_is_an_error(tmp_path, grown_tokenizer_dir, copy_of, tiny_model_dir):
    tok_dir = copy_of(grown_tokenizer_dir)
    (tok_dir / "base_tokenizer.model").unlink()
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    for f in tiny_model_dir.iterdir():  # the model folder without its own tokenizer files
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            (model_dir / f.name).write_bytes(f.read_bytes())
    cfg = _cfg(model_dir, tok_dir)
    with pytest.raises(ZhtuneError) as exc:
        expand_embeddings(load_model(cfg), load_tokenizer(cfg), base_tokenizer_path(cfg))
    assert exc.value.where == "base_tokenizer"
