"""zhtune export gguf: llama.cpp loads the file, tokenizes the expanded Chinese vocabulary like
transformers, and its logits match (f32/f16) or agree on the top token (quantised)."""

from __future__ import annotations

import pytest

from zhtune.errors import ZhtuneError
from zhtune.export import gguf as G
from zhtune.export.parity import llama_cpp_logits, verify_gguf


@pytest.fixture(scope="module")
def f16_gguf(tmp_path_factory, merged_dir):
    out = tmp_path_factory.mktemp("gguf") / "tiny-zh.f16.gguf"
    logs = []
    path = G.export_gguf(merged_dir, out, "f16", verify=True, log=logs.append)
    assert any("token ids equal" in line for line in logs)
    return path


def test_f16_export_keeps_chinese_vocab_and_template(f16_gguf, merged_dir):
    import gguf
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(str(f16_gguf))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    assert len(tokens) == len(tok) == 1040
    assert all(tokens[i] == tok.convert_ids_to_tokens(i) for i in range(1000, 1040))  # the added Chinese pieces
    ids, _ = llama_cpp_logits(f16_gguf, ["中国的首都是北京。"])
    assert ids[0] == tok("中国的首都是北京。").input_ids and max(ids[0]) >= 1000  # uses the new pieces
    assert "chat_template" in "".join(reader.fields)  # the training template travels in the file
    modelfile = (f16_gguf.parent / (f16_gguf.name + ".Modelfile")).read_text()
    assert f"FROM ./{f16_gguf.name}" in modelfile and "### Instruction" in modelfile
    assert 'PARAMETER stop "### Instruction:"' in modelfile and "SYSTEM" in modelfile


@pytest.mark.parametrize("quant", ["f32", "bf16", "q8_0", "q4_k_m"])
def test_quantised_exports_verify(tmp_path, merged_dir, quant):
    logs = []
    out = G.export_gguf(merged_dir, tmp_path / f"m.{quant}.gguf", quant, verify=True, log=logs.append)
    types = G.tensor_types(out)
    text = "\n".join(logs)
    if quant == "q8_0":
        assert types.get("Q8_0", 0) >= 14
    if quant == "q4_k_m":  # hidden 64 < 256: every k-quant tensor falls back, and we say so
        assert "narrower than a 256-weight k-quant block" in text and not any(k.endswith("_K") for k in types)
    assert "top-1 agreement" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m.{quant}.gguf", f"m.{quant}.gguf.Modelfile"]


def test_verify_catches_a_different_model(f16_gguf, tiny_model_dir, tmp_path, big_tokenizer_dir):
    # same tokenizer, other weights: the logits check must fail
    from zhtune.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", vocab_size=1040, seed=7, tokenizer_dir=big_tokenizer_dir)
    with pytest.raises(ZhtuneError, match="do not match"):
        verify_gguf(f16_gguf, other, quantised=False, log=lambda *_: None)


def test_refusals(tmp_path, merged_dir, copy_of):
    with pytest.raises(ZhtuneError, match="unknown quantisation"):
        G.export_gguf(merged_dir, tmp_path / "x.gguf", "q7_z")
    (tmp_path / "exists.gguf").write_bytes(b"x")
    with pytest.raises(ZhtuneError, match="exists"):
        G.export_gguf(merged_dir, tmp_path / "exists.gguf")
    no_sp = copy_of(merged_dir)
    (no_sp / "tokenizer.model").unlink()
    with pytest.raises(ZhtuneError, match="tokenizer.model"):
        G.export_gguf(no_sp, tmp_path / "y.gguf")
    from zhtune.cli import main

    assert main(["export", "gguf", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "z.gguf")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["exists.gguf", no_sp.name])
