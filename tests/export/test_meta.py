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


# --- LLaMA-3.x downloads: tiktoken tokenizer.model, use_scaled_rope, a tied 3.2 head ----------------------------
def _llama3_download(root, bytelevel_base, tied: bool, seed: int = 0):
    """A tiny LLaMA-3.x Meta download: tokenizer.model in tiktoken format (the tiny llama3 BPE's 1000 ranks;
    Meta's code adds 256 special tokens after them), params.json with use_scaled_rope, one consolidated.00.pth
    of random weights in Meta's names (3.2's 1B/3B: no separate output)."""
    from zhtune.vocab.bytelevel import read_bytelevel, tiktoken_text

    bpe = read_bytelevel(bytelevel_base("llama3"))
    root.mkdir(parents=True)
    (root / "tokenizer.model").write_text(tiktoken_text({t: i for t, i in bpe.vocab.items() if i < 1000}))
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 1256, "multiple_of": 256,
              "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}
    (root / "params.json").write_text(json.dumps(params))
    g = torch.Generator().manual_seed(seed)
    shapes = {"tok_embeddings.weight": (1256, 64), "norm.weight": (64,), "output.weight": (1256, 64)}
    for i in range(2):
        shapes.update({f"layers.{i}.attention.wq.weight": (64, 64), f"layers.{i}.attention.wk.weight": (32, 64),
                       f"layers.{i}.attention.wv.weight": (32, 64), f"layers.{i}.attention.wo.weight": (64, 64),
                       f"layers.{i}.feed_forward.w1.weight": (256, 64), f"layers.{i}.feed_forward.w2.weight": (64, 256),
                       f"layers.{i}.feed_forward.w3.weight": (256, 64), f"layers.{i}.attention_norm.weight": (64,),
                       f"layers.{i}.ffn_norm.weight": (64,)})
    state = {k: torch.randn(s, generator=g) * (0.3 if len(s) == 2 else 1.0) for k, s in shapes.items()}
    if tied:
        del state["output.weight"]
    torch.save(state, root / "consolidated.00.pth")
    return root


@pytest.fixture(scope="module")
def llama31(tmp_path_factory, bytelevel_base):
    """(Meta download, its `zhtune convert meta --llama-version 3.1` HF folder)."""
    from zhtune.cli import main

    root = tmp_path_factory.mktemp("llama31")
    meta_dir = _llama3_download(root / "meta", bytelevel_base, tied=False)
    assert main(["convert", "meta", "--input", str(meta_dir), "--output", str(root / "hf"),
                 "--llama-version", "3.1"]) == 0
    return meta_dir, root / "hf"


LINES = ["中国的首都是北京。", "The quick brown fox's 12345 jumps!!  \n\n  over",
         "def f(x):\n    return x ** 2  # 平方", "<|eot_id|> is text here", "😀 emoji and ｆｕｌｌ width"]


def test_llama3_tokenizer_is_tiktoken(llama31):
    """The converted tokenizer.json gives tiktoken's own ids (Meta's tokenizer: the LLaMA-3 regex, the ranks,
    the 256 special tokens after them), BOS first; its merges are transformers' TikTokenConverter's."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from zhtune.vocab.bytelevel import PRE_TOKENIZER_REGEX, read_bytelevel

    meta_dir, hf = llama31
    ranks = load_tiktoken_bpe(str(meta_dir / "tokenizer.model"))
    specials = {t: 1000 + i for i, t in enumerate(meta.llama3_special_tokens("3.1"))}
    enc = tiktoken.Encoding("llama3-tiny", pat_str=PRE_TOKENIZER_REGEX["llama3"], mergeable_ranks=ranks,
                            special_tokens=specials)
    tok = AutoTokenizer.from_pretrained(str(hf))
    assert len(tok) == 1256 and tok.bos_token_id == 1000 and tok.convert_tokens_to_ids("<|eot_id|>") == 1009
    for line in LINES + tiny_lines():
        assert tok(line).input_ids == [1000] + enc.encode(line, allowed_special="all"), line  # HF matches specials
        assert tok.decode(tok(line, add_special_tokens=False).input_ids) == line
    _, merges = TikTokenConverter(str(meta_dir / "tokenizer.model")).extract_vocab_merges_from_model(
        str(meta_dir / "tokenizer.model"))
    assert read_bytelevel(hf).merges == merges


def tiny_lines() -> list[str]:
    from zhtune import tiny

    return tiny.asset_lines("zh_heldout.txt")[:30] + tiny.asset_lines("en_corpus.txt")[:30]


def test_llama3_config_and_rope_scaling_are_metas(llama31):
    """rope_type llama3 with Meta's constants: transformers' inverse frequencies equal Meta's apply_scaling."""
    import math

    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, hf = llama31
    config = json.loads((hf / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}
    assert (config["max_position_embeddings"], config["bos_token_id"], config["eos_token_id"]) == (131072, 1000, 1001)
    assert config["vocab_size"] == 1256 and not config["tie_word_embeddings"] and config["intermediate_size"] == 256
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == [1001, 1008, 1009]
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(str(hf)), "cpu")
    freqs = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))

    def apply_scaling(freq, factor=8.0, low=1.0, high=4.0, old=8192):  # Meta's llama3 reference model.py
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            return freq
        if wavelen > old / low:
            return freq / factor
        smooth = (old / wavelen - low) / (high - low)
        return (1 - smooth) * freq / factor + smooth * freq

    want = torch.tensor([apply_scaling(float(f)) for f in freqs])
    torch.testing.assert_close(inv_freq.float(), want, rtol=1e-5, atol=0)
    assert len({float(a / b) for a, b in zip(want, freqs)}) >= 3  # all three regimes are exercised


def test_llama3_hf_to_meta_round_trip(llama31, tmp_path):
    meta_dir, hf = llama31
    back = meta.hf_to_meta(hf, tmp_path / "pth", num_shards=1)
    assert (back / "tokenizer.model").read_bytes() == (meta_dir / "tokenizer.model").read_bytes()
    assert json.loads((back / "params.json").read_text()) == json.loads((meta_dir / "params.json").read_text())
    a = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    b = torch.load(back / "consolidated.00.pth", weights_only=True)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    two = meta.hf_to_meta(hf, tmp_path / "pth2", num_shards=2)  # model parallel: the vocabulary is split
    assert torch.load(two / "consolidated.00.pth", weights_only=True)["tok_embeddings.weight"].shape == (628, 64)
    again = meta.meta_to_hf(two, tmp_path / "hf2")
    for name in WeightReader(hf).names():
        assert torch.equal(WeightReader(hf).get(name), WeightReader(again).get(name)), name


def test_llama32_download_converts_tied(tmp_path, bytelevel_base):
    """A 3.2-sized download (auto: scaled rope, <= 3072 wide) without a separate output: a tied head,
    rope factor 32; back to Meta's layout, the output is the embeddings again."""
    meta_dir = _llama3_download(tmp_path / "meta", bytelevel_base, tied=True, seed=1)
    hf = meta.meta_to_hf(meta_dir, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["rope_parameters"]["factor"] == 32.0
    assert "lm_head.weight" not in WeightReader(hf).names()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    back = meta.hf_to_meta(hf, tmp_path / "pth", num_shards=1)
    state = torch.load(back / "consolidated.00.pth", weights_only=True)
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    assert json.loads((back / "params.json").read_text())["rope_scaling_factor"] == 32.0
    assert json.loads((meta.meta_to_hf(back, tmp_path / "hf2") / "config.json").read_text()) == config


def test_expanded_llama3_vocabulary_survives_both_ways(llama31, tmp_path, bytelevel_zh):
    """vocab merge into the converted LLaMA-3 (Chinese tokens after the 256 specials), the model grown to
    match, then HF -> Meta -> HF: the same ids and logits (tiktoken ranks = ids, gaps kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhtune.cli import main

    _, hf = llama31
    assert main(["vocab", "merge", "--base", str(hf), "--add", str(bytelevel_zh("llama3")),
                 "--output", str(tmp_path / "tok")]) == 0
    tok_dir = tmp_path / "tok" / "merged_tokenizer_hf"
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) > 3000 and tok.convert_tokens_to_ids("<|eot_id|>") == 1009
    model = AutoModelForCausalLM.from_pretrained(str(hf))
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    grown = tmp_path / "grown"
    model.save_pretrained(grown)
    for f in tok_dir.iterdir():
        if f.is_file():
            (grown / f.name).write_bytes(f.read_bytes())
    pth = meta.hf_to_meta(grown, tmp_path / "pth", num_shards=1)
    back = meta.meta_to_hf(pth, tmp_path / "back", llama_version="3.1")
    tok2 = AutoTokenizer.from_pretrained(str(back))
    ids = [tok(line).input_ids for line in LINES + tiny_lines()]
    assert [tok2(line).input_ids for line in LINES + tiny_lines()] == ids
    assert max(max(x) for x in ids) >= 1256  # the Chinese tokens after the specials are used
    assert torch.equal(_logits(grown, ids[0]), _logits(back, ids[0]))


def test_llama3_bad_input(tmp_path, bytelevel_base, llama31, capsys):
    from zhtune.cli import main
    from zhtune.tiny import build_tiny_model

    meta_dir = _llama3_download(tmp_path / "meta", bytelevel_base, tied=False)
    lines = (meta_dir / "tokenizer.model").read_text().splitlines()
    lines[7] = "not-base64!! x"
    (meta_dir / "tokenizer.model").write_text("\n".join(lines) + "\n")
    assert main(["convert", "meta", "--input", str(meta_dir), "--output", str(tmp_path / "out")]) == 2
    assert f"{meta_dir / 'tokenizer.model'}:8" in capsys.readouterr().err and not (tmp_path / "out").exists()
    # a byte-level model whose special tokens are not LLaMA-3's has no Meta layout
    smol = build_tiny_model(tmp_path / "smol", vocab_size=1003, tokenizer_dir=bytelevel_base("smollm"), arch="llama")
    with pytest.raises(ZhtuneError, match="LLaMA-3's 256 special tokens"):
        meta.hf_to_meta(smol, tmp_path / "pth", num_shards=1)
    assert not (tmp_path / "pth").exists()
