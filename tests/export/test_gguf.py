"""zhtune export gguf: llama.cpp loads the file, tokenizes the expanded Chinese vocabulary like
transformers, and its logits match (f32/f16) or agree on the top token (quantised)."""

from __future__ import annotations

import json

import pytest

from zhtune.errors import ZhtuneError
from zhtune.export import gguf as G
from zhtune.export.gguf_vocab import LLAMA_CPP_PRE
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


# --- byte-level BPE vocabularies and the other architectures --------------------------------------------------
def test_every_supported_architecture_has_a_gguf_mapping():
    from zhtune.model.load import SUPPORTED_MODEL_TYPES

    assert set(G.ARCHS) == set(SUPPORTED_MODEL_TYPES)


EDGE = ["  two leading spaces", "tab\tand\nnewlines\n\n", "1234567890 3.14159", "emoji 😀🎉 ok",
        "全角ＡＢＣ１２３，。！", "中文 English 混合 mixed 123", "𠀀𠀁 rare 龘", "한국어 日本語のテキスト",
        "it's I'M we'Ve", "def f(x):\n    return x"]


@pytest.mark.parametrize("family", ["llama3", "gpt2", "qwen2", "smollm", "tekken"])
def test_bytelevel_vocabulary_ids_equal_transformers(family, tmp_path, bytelevel_merged):
    """A merged byte-level vocabulary in GGUF: tokenizer.ggml.model gpt2, its merges, the pre-tokenizer name
    llama.cpp knows for the family, and llama.cpp's ids equal transformers' on every asset line."""
    import gguf
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from zhtune import tiny

    tok_dir = bytelevel_merged(family) / "merged_tokenizer_hf"
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = tiny.build_tiny_model(tmp_path / "m", vocab_size=len(tok), tokenizer_dir=tok_dir, arch="llama",
                                  hidden_size=32, intermediate_size=64)
    out = G.export_gguf(model, tmp_path / "m.gguf", "f16", modelfile=False, log=lambda *_: None)
    reader = gguf.GGUFReader(str(out))

    def field(key):
        f = reader.fields[key]
        return bytes(f.parts[f.data[0]]).decode()

    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == LLAMA_CPP_PRE[family]
    assert len(reader.fields["tokenizer.ggml.merges"].data) == len(json.loads(
        (tok_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"])
    lines = [x for name in ("zh_heldout.txt", "zh_corpus.txt", "en_corpus.txt") for x in tiny.asset_lines(name) if x]
    lines += EDGE
    llm = Llama(model_path=str(out), vocab_only=True, verbose=False)
    try:
        differ = [x for x in lines if llm.tokenize(x.encode(), add_bos=True, special=False) != tok(x).input_ids]
    finally:
        llm.close()
    assert len(lines) > 700 and differ == []


def test_a_pre_tokenizer_llama_cpp_lacks_is_refused(tmp_path, bytelevel_merged):
    from zhtune import tiny

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    data = json.loads((bytelevel_merged("qwen2") / "merged_tokenizer_hf" / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+|[^\s\p{L}]+"
    (tok_dir / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    for name in ("tokenizer_config.json",):
        (tok_dir / name).write_bytes((bytelevel_merged("qwen2") / "merged_tokenizer_hf" / name).read_bytes())
    model = tiny.build_tiny_model(tmp_path / "m", vocab_size=len(data["model"]["vocab"]), tokenizer_dir=tok_dir,
                                  arch="qwen2", hidden_size=32, intermediate_size=64)
    with pytest.raises(ZhtuneError, match="not one llama.cpp implements") as exc:
        G.export_gguf(model, tmp_path / "x.gguf")
    assert "llama3, qwen2, tekken, gpt2, smollm" in exc.value.expected
    assert not (tmp_path / "x.gguf").exists()


def test_quantised_bytelevel_export_verifies(tmp_path, bytelevel_merged):
    from zhtune import tiny

    tok_dir = bytelevel_merged("qwen2") / "merged_tokenizer_hf"
    from transformers import AutoTokenizer

    model = tiny.build_tiny_model(tmp_path / "m", vocab_size=len(AutoTokenizer.from_pretrained(str(tok_dir))),
                                  tokenizer_dir=tok_dir, arch="qwen3")
    logs = []
    out = G.export_gguf(model, tmp_path / "m.q8_0.gguf", "q8_0", verify=True, log=logs.append)
    assert G.tensor_types(out).get("Q8_0", 0) >= 10 and any("token ids equal" in line for line in logs)


def test_ollama_template_leaves_bos_to_llama_cpp():
    from zhtune.data.templates import get_template

    for name in ("llama3", "llama3.1"):
        text = G.ollama_template(get_template(name), "<|begin_of_text|>", "<|end_of_text|>")
        assert "<|begin_of_text|>" not in text and text.startswith("{{- $first")  # no second BOS
        assert "<|start_header_id|>assistant<|end_header_id|>" in text and "<|eot_id|>" in text
        # LLaMA-3.1 writes its system block (knowledge date) also without a system prompt
        assert ("{{ if $.System }}<|start_header_id|>system" in text) is (name == "llama3")
