"""Every architecture with its byte-level BPE tokenizer, through the whole pipeline from the command line:
vocab train --base -> vocab merge -> train pt (2 steps) -> merge --verify -> export gguf --verify -> the hf and
llama.cpp engines agree (prompt ids, greedy text) -> `zhtune chat` and `zhtune serve`'s API answer as their engine on
both backends -> `zhtune estimate` counts the parameters. A tied head stays tied.

Architectures (zhtune.tiny.ARCHITECTURES): llama (LLaMA-3.1: rope_type llama3), llama-tied (LLaMA-3.2 /
SmolLM), mistral (Mistral-Nemo's tekken tokenizer), qwen2 (q/k/v biases), qwen3 (q/k norms, own head_dim, tied).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llama_cpp")

from zhtune import cli, tiny  # noqa: E402
from zhtune.export.weights import WeightReader  # noqa: E402

# the template each family's chat models use (its special tokens are in the tiny tokenizers)
TEMPLATES = {"llama3": "llama3", "smollm": "chatml", "tekken": "mistral", "qwen2": "qwen2.5"}
CONVERSATION = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好，介绍一下北京。"},
                {"role": "assistant", "content": "北京是中国的首都。"}, {"role": "user", "content": "Tell me more!"}]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from a second thread; on a busy 2-core box two spinning ones cost 5-30x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(*args) -> None:
    assert cli.main([str(a) for a in args]) == 0, args


@pytest.mark.parametrize("arch", list(tiny.ARCHITECTURES))
def test_pipeline(arch, tmp_path, bytelevel_base, bytelevel_merged, capsys, monkeypatch):
    import gguf
    family = tiny.ARCHITECTURES[arch]
    base = tiny.build_tiny_model(tmp_path / "base", vocab_size=len_of(bytelevel_base(family)), seed=0,
                                 tokenizer_dir=bytelevel_base(family), arch=arch)
    tied = arch in ("llama-tied", "qwen3")
    assert ("lm_head.weight" in WeightReader(base).names()) is not tied
    tokenizer = bytelevel_merged(family) / "merged_tokenizer_hf"
    corpus = tmp_path / "zh.txt"  # a small corpus: it is also the calibration text of the logprob init
    corpus.write_text("\n".join(tiny.asset_lines("zh_corpus.txt")[:60]) + "\n", encoding="utf-8")
    run("train", "stage=pt", f"model_name_or_path={base}", f"tokenizer_name_or_path={tokenizer}",
        f"dataset=[{corpus}]", "cutoff_len=64", "max_steps=2", "per_device_train_batch_size=2", "lora_rank=4",
        "logging_steps=1", "save_steps=100", f"output_dir={tmp_path / 'pt'}")
    # embedding_init auto: the fitted head for an untied base; the mean rows for a tied one (stays tied)
    assert ("mean init" if tied else "logprob init") in capsys.readouterr().out
    adapter = tmp_path / "pt" / "pt_lora_model"
    run("merge", "--lora", adapter, "--output", tmp_path / "merged", "--verify")
    merged = tmp_path / "merged"
    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    assert config["vocab_size"] == len_of(tokenizer) > 3000 and config["model_type"] == arch.split("-")[0]
    names = WeightReader(merged).names()
    assert bool(config.get("tie_word_embeddings")) is tied and ("lm_head.weight" in names) is not tied
    run("export", "gguf", "--model", merged, "--output", tmp_path / "m.gguf", "--verify")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name for t in reader.tensors}
    assert ("output.weight" in tensors) is not tied  # llama.cpp reads a tied head from token_embd
    assert ("rope_freqs.weight" in tensors) is (arch.startswith("llama"))
    assert ("blk.0.attn_q.bias" in tensors) is (arch == "qwen2")
    assert ("blk.0.attn_q_norm.weight" in tensors) is (arch == "qwen3")
    field = reader.fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == {"llama3": "llama-bpe", "smollm": "gpt-2", "tekken": "tekken",
                                                          "qwen2": "qwen2"}[family]
    answers = engines_agree(merged, tmp_path / "m.gguf", TEMPLATES[family])
    for model, answer in zip((merged, tmp_path / "m.gguf"), answers):
        chat_answers(model, TEMPLATES[family], answer, capsys, monkeypatch)
    estimate_counts_parameters(merged, config, capsys)


def len_of(tokenizer_dir) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))


def engines_agree(merged, gguf_file, template: str) -> tuple[str, str]:
    """chat / serve run on these engines: the same prompt ids (template special tokens included) from
    transformers and llama.cpp, and every token of llama.cpp's greedy answer is transformers' best next token
    too (up to near-ties: new rows that start alike score within f16 rounding of each other). The serve API
    over each engine answers as the engine does; returns each engine's greedy answer to USER (hf, llama.cpp)."""
    from zhtune.infer.engine import GenParams
    from zhtune.infer.resolve import load_engine

    params = GenParams(max_new_tokens=12, temperature=0, repetition_penalty=1.0, logprobs=0)
    with load_engine(str(merged), template=template) as hf, \
            load_engine(str(gguf_file), template=template, n_threads=1) as cpp:
        assert hf.template.name == cpp.template.name == template
        ids = hf.tokenize_prompt(CONVERSATION)
        assert cpp.tokenize_prompt(CONVERSATION) == ids
        specials = set(hf.tokenizer.added_tokens_decoder)  # <|start_header_id|>, <|im_start|>, [INST] ...
        assert sum(i in specials for i in ids[1:]) >= 4, "the template's markers are special tokens, not text"
        deltas = list(cpp.stream(CONVERSATION, params))
        assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 12
        answer = [t.id for d in deltas for t in d.logprobs]
        assert len(answer) == 12 and "".join(d.text for d in deltas)
        scored = hf.score([ids + answer], prompt=True, top_k=1)[0].tokens[len(ids):]
        answers = tuple(served_answer(engine) for engine in (hf, cpp))
    for token in scored:
        best_id, best = token.top[0]
        assert token.logprob >= best - 0.05, (token.id, token.logprob, best_id, best)
    return answers


USER = [{"role": "user", "content": "你好"}]
GREEDY = {"max_tokens": 8, "temperature": 0, "repetition_penalty": 1.0}


def served_answer(engine) -> str:
    """POST /v1/chat/completions to `zhtune serve`'s app over `engine`: the engine's own greedy answer."""
    from fastapi.testclient import TestClient

    from zhtune.infer.engine import GenParams
    from zhtune.serve.api import create_app

    params = GenParams(max_new_tokens=8, temperature=0, repetition_penalty=1.0)
    want = "".join(d.text for d in engine.stream(USER, params))
    with TestClient(create_app(engine)) as client:  # its shutdown stops the app's threads, not the engine
        name = client.get("/v1/models").json()["data"][0]["id"]
        reply = client.post("/v1/chat/completions", json={"model": name, "messages": USER, **GREEDY})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == want
    return want


def chat_answers(model, template: str, want: str, capsys, monkeypatch) -> None:
    """`zhtune chat --model MODEL` (a folder: hf; a .gguf: llama.cpp) with piped stdin prints the greedy answer."""
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO(USER[0]["content"] + "\n"))
    capsys.readouterr()
    assert cli.main(["chat", "--model", str(model), "--template", template, "--threads", "1",
                     "--max-new-tokens", "8", "--temperature", "0", "--repetition-penalty", "1.0"]) == 0
    assert capsys.readouterr().out == want + "\n"


def estimate_counts_parameters(merged, config, capsys) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from zhtune.train.estimate import read_shape

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(merged)))
    real = sum(p.numel() for p in model.parameters())  # tied: counted once
    assert read_shape(str(merged)).params == pytest.approx(real, rel=0.01)
    capsys.readouterr()
    run("estimate", f"model_name_or_path={merged}")
    assert f"({real / 1e6:.2f}M params, hidden {config['hidden_size']}" in capsys.readouterr().out
