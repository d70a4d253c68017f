"""Meta layout <-> HF: the rotary permutation is right, params.json reproduces real LLaMA widths,
HF -> pth -> HF gives identical tensors and logits (1 and 2 model-parallel shards, GQA)."""

from __future__ import annotations

import json

import pytest
import torch

from zhtune.errors import ZhtuneError
from zhtune.export import meta
from zhtune.export.weights import WeightReader


def test_permutation_matches_meta_rotary():
    """Meta rotates interleaved pairs with complex numbers; HF rotates halves. q from Meta's wq with
    Meta's rotary must equal q from to_hf_qk(wq) with HF's rotary, after the same row permutation."""
    torch.manual_seed(0)
    heads, head_dim, dim, seq = 2, 8, 16, 5
    wq = torch.randn(heads * head_dim, dim)
    x = torch.randn(seq, dim)
    freqs = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(seq).float(), freqs)                      # [seq, head_dim/2]
    q = (x @ wq.T).view(seq, heads, head_dim // 2, 2)
    q_meta = torch.view_as_real(torch.view_as_complex(q) * torch.polar(torch.ones_like(angles), angles)[:, None])
    q_meta = q_meta.reshape(seq, heads, head_dim)                                # Meta's rotated q
    qh = (x @ meta.to_hf_qk(wq, heads).T).view(seq, heads, head_dim)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    rot = torch.cat([-qh[..., head_dim // 2:], qh[..., : head_dim // 2]], -1)
    q_hf = qh * cos + rot * sin                                                  # HF's rotated q
    # HF's per-head layout is [even dims..., odd dims...] of Meta's: undo it and compare
    back = q_hf.view(seq, heads, 2, head_dim // 2).transpose(2, 3).reshape(seq, heads, head_dim)
    torch.testing.assert_close(back, q_meta, atol=1e-5, rtol=1e-5)
    assert torch.equal(meta.to_meta_qk(meta.to_hf_qk(wq, heads), heads), wq)


@pytest.mark.parametrize("dim,inter,mult,multiple_of", [(4096, 11008, None, 256), (5120, 13824, None, 256),
                                                         (8192, 28672, 1.3, 4096), (4096, 14336, 1.3, 1024),
                                                         (64, 128, None, None)])
def test_params_json_reproduces_intermediate_size(dim, inter, mult, multiple_of):
    cfg = {"hidden_size": dim, "intermediate_size": inter, "num_hidden_layers": 2, "num_attention_heads": 4,
           "vocab_size": 32000, "rope_parameters": {"rope_theta": 500000.0}}
    params = meta.params_from_config(cfg)
    assert meta.meta_ffn_size(dim, params["multiple_of"], params.get("ffn_dim_multiplier")) == inter
    if multiple_of:
        assert params["multiple_of"] == multiple_of and params.get("ffn_dim_multiplier") == mult
    back = meta.config_from_params(params, 32000)
    assert back["intermediate_size"] == inter and back["rope_parameters"]["rope_theta"] == 500000.0


def test_num_shards_as_meta_ships():
    assert meta.num_shards_for({"hidden_size": 5120, "num_hidden_layers": 40}) == 2
    assert meta.num_shards_for({"hidden_size": 8192, "num_hidden_layers": 80}) == 8
    assert meta.num_shards_for({"hidden_size": 64, "num_hidden_layers": 2}) == 1
    assert meta.num_shards_for({"hidden_size": 64, "num_hidden_layers": 2}, "33B") == 4
    with pytest.raises(ZhtuneError, match="unknown model size"):
        meta.num_shards_for({"hidden_size": 64, "num_hidden_layers": 2}, "3B")


def _logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize("shards", [1, 2])
def test_hf_pth_hf_round_trip(tmp_path, tiny_model_dir, shards):
    pth = meta.hf_to_meta(tiny_model_dir, tmp_path / "pth", num_shards=shards)
    files = sorted(p.name for p in pth.glob("consolidated.*.pth"))
    assert files == [f"consolidated.{i:02d}.pth" for i in range(shards)]
    params = json.loads((pth / "params.json").read_text())
    assert params["n_kv_heads"] == 2 and params["n_heads"] == 4  # GQA survives
    rank0 = torch.load(pth / "consolidated.00.pth", weights_only=True)
    assert rank0["layers.0.attention.wk.weight"].shape == (32 // shards, 64)     # column-parallel
    assert rank0["layers.0.feed_forward.w2.weight"].shape == (64, 128 // shards)  # row-parallel
    assert rank0["tok_embeddings.weight"].shape == (1000, 64 // shards)
    hf = meta.meta_to_hf(pth, tmp_path / "hf", max_shard_size=200_000)
    assert (hf / "model.safetensors.index.json").is_file()  # sharded output
    a, b = WeightReader(tiny_model_dir), WeightReader(hf)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name
    ids = [1, 50, 300, 999, 7]
    assert torch.equal(_logits(tiny_model_dir, ids), _logits(hf, ids))


def test_convert_meta_cli_errors(tmp_path, tiny_model_dir):
    from zhtune.cli import main

    assert main(["convert", "meta", "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    pth = meta.hf_to_meta(tiny_model_dir, tmp_path / "pth", num_shards=1)
    (pth / "params.json").unlink()
    with pytest.raises(ZhtuneError, match="params.json"):
        meta.meta_to_hf(pth, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ZhtuneError, match="model-parallel"):
        meta.hf_to_meta(tiny_model_dir, tmp_path / "p3", num_shards=3)


def test_context_length_and_tied_embeddings(tmp_path, tiny_model_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    small = {"dim": 64, "n_layers": 2, "n_heads": 4}
    llama1 = meta.config_from_params({**small, "norm_eps": 1e-6, "multiple_of": 128}, 1000)
    llama2 = meta.config_from_params({**small, "norm_eps": 1e-5, "multiple_of": 128}, 1000)
    assert (llama1["max_position_embeddings"], llama2["max_position_embeddings"]) == (2048, 4096)
    assert meta.config_from_params(small, 1000, 8192)["max_position_embeddings"] == 8192
    tied = tmp_path / "tied"
    shutil.copytree(tiny_model_dir, tied)
    sd = load_file(str(tied / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(tied / "model.safetensors"))
    pth = meta.hf_to_meta(tied, tmp_path / "pth", num_shards=1)
    rank0 = torch.load(pth / "consolidated.00.pth", weights_only=True)
    assert torch.equal(rank0["output.weight"], sd["model.embed_tokens.weight"])
