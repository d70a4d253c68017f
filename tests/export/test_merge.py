"""zhtune merge: streaming merge of 1..n adapters equals base + adapters through peft; refusals."""

from __future__ import annotations

import json

import pytest
import torch

from zhtune.errors import ZhtuneError
from zhtune.export import merge as M
from zhtune.export.parity import verify_merge
from zhtune.export.weights import WeightReader


def test_merge_two_adapters_matches_peft(tmp_path, tiny_model_dir, pt_adapter, sft_adapter, big_tokenizer_dir):
    out = M.merge(tiny_model_dir, [pt_adapter, sft_adapter], tmp_path / "m", log=lambda *_: None)
    result = verify_merge(tiny_model_dir, [pt_adapter, sft_adapter], out, log=print)
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 1040
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 1040
    assert (out / "tokenizer.model").read_bytes() == (big_tokenizer_dir / "tokenizer.model").read_bytes()
    # the chat template is the training template's (sft run.yaml says alpaca)
    from zhtune.data.templates import get_template

    msgs = [{"role": "user", "content": "你好"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == get_template("alpaca").render(msgs, "<s>", "</s>")


def _tensors(folder):
    r = WeightReader(folder)
    return {n: r.get(n) for n in r.names()}


def test_base_from_run_yaml_sharded_output_and_negative_control(tmp_path, tiny_model_dir, pt_adapter, sft_adapter):
    from zhtune.cli import main
    from zhtune.io import read_run_yaml

    out = tmp_path / "m"
    assert main(["merge", "--lora", str(pt_adapter.parent), "--lora", str(sft_adapter), "--output", str(out),
                 "--max-shard-size", "100KB", "--verify"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    run = read_run_yaml(out)
    assert run["stage"] == "merge" and run["config"]["template"] == "alpaca"
    assert run["parents"]["base"] == str(tiny_model_dir.resolve())
    # the check can fail: leaving out the second adapter is visibly different
    only_pt = M.merge(tiny_model_dir, [pt_adapter], tmp_path / "pt_only", log=lambda *_: None)
    with pytest.raises(ZhtuneError, match="does not match"):
        verify_merge(tiny_model_dir, [pt_adapter, sft_adapter], only_pt, log=lambda *_: None)


def test_bin_sharded_base_and_half_precision(tmp_path, tiny_model_dir, pt_adapter, sft_adapter):
    state = _tensors(tiny_model_dir)
    base = tmp_path / "bin_base"
    base.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (base / f.name).write_bytes(f.read_bytes())
    names = list(state)
    weight_map = {}
    for i, part in enumerate([names[: len(names) // 2], names[len(names) // 2:]]):
        fname = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: state[n] for n in part}, base / fname)
        weight_map.update({n: fname for n in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (base / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    a = _tensors(M.merge(base, [pt_adapter, sft_adapter], tmp_path / "a", log=lambda *_: None))
    b = _tensors(M.merge(tiny_model_dir, [pt_adapter, sft_adapter], tmp_path / "b", log=lambda *_: None))
    assert all(torch.equal(a[n], b[n]) for n in b)
    half = M.merge(base, [pt_adapter, sft_adapter], tmp_path / "h", dtype="bfloat16", verify=True, log=print)
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in _tensors(half).values())


def test_pth_format_round_trips(tmp_path, tiny_model_dir, pt_adapter, sft_adapter):
    from zhtune.export.meta import meta_to_hf

    hf = M.merge(tiny_model_dir, [pt_adapter, sft_adapter], tmp_path / "hf", log=lambda *_: None)
    pth = M.merge(tiny_model_dir, [pt_adapter, sft_adapter], tmp_path / "pth", fmt="pth", num_shards=2,
                  log=lambda *_: None)
    assert sorted(p.name for p in pth.iterdir()) == [".zhtune-output.json", "consolidated.00.pth",
                                                     "consolidated.01.pth", "params.json", "run.yaml",
                                                     "tokenizer.model"]
    assert json.loads((pth / "params.json").read_text())["vocab_size"] == 1040
    back = _tensors(meta_to_hf(pth, tmp_path / "back"))
    want = _tensors(hf)
    assert all(torch.equal(back[n], want[n]) for n in want)


def test_trainable_tokens_adapter(tmp_path, tiny_model_dir, tokens_adapter):
    out = M.merge(tiny_model_dir, [tokens_adapter], tmp_path / "m", log=lambda *_: None)
    result = verify_merge(tiny_model_dir, [tokens_adapter], out, log=lambda *_: None)
    assert result.max_abs_diff <= 1e-4
    emb, base = _tensors(out)["model.embed_tokens.weight"], _tensors(tiny_model_dir)["model.embed_tokens.weight"]
    changed = (emb != base).any(dim=1).nonzero().flatten().tolist()
    assert changed == [5, 17, 900]


# ---- refusals: clear message, nothing written ----------------------------------------------------
def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _refused(tmp_path, base, loras, match):
    out = tmp_path / "refused"
    with pytest.raises(ZhtuneError, match=match):
        M.merge(base, loras, out, log=lambda *_: None)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".refused")]


def test_refusals(tmp_path, tiny_model_dir, pt_adapter, sft_adapter, tokens_adapter, copy_of, big_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    from zhtune.tiny import build_tiny_model

    # output exists
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(ZhtuneError, match="already exists"):
        M.merge(tiny_model_dir, [pt_adapter], tmp_path / "taken")
    # missing adapter weights
    broken = copy_of(pt_adapter)
    (broken / "adapter_model.safetensors").unlink()
    _refused(tmp_path, tiny_model_dir, [broken], "adapter weights missing")
    # another architecture
    arch = copy_of(sft_adapter)
    arch.rename(tmp_path / "arch")
    _edit_config(tmp_path / "arch", auto_mapping={"base_model_class": "Qwen2ForCausalLM"})
    _refused(tmp_path, tiny_model_dir, [pt_adapter, tmp_path / "arch"], "trained on Qwen2ForCausalLM")
    # another hidden size
    wide = build_tiny_model(tmp_path / "wide", vocab_size=1000, hidden_size=96, num_heads=4, num_kv_heads=2)
    _refused(tmp_path, wide, [tokens_adapter], "different hidden size")
    # target modules the base lacks (a 1-layer base for a 2-layer adapter)
    short = build_tiny_model(tmp_path / "short", vocab_size=1000, num_layers=1)
    _refused(tmp_path, short, [tokens_adapter], "which the base does not have")
    # adapter vocabulary that does not match its tokenizer
    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    for f in pt_adapter.iterdir():
        (mismatch / f.name).write_bytes(f.read_bytes())
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special")):
            (mismatch / f.name).write_bytes(f.read_bytes())  # the 1000-token base tokenizer
    _refused(tmp_path, tiny_model_dir, [mismatch], "1040 rows but its tokenizer has 1000")
    # shrinking: a 1040-row adapter, then one carrying the base's 1000 rows
    small = copy_of(tokens_adapter)
    small.rename(tmp_path / "small")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "small" / "adapter_model.safetensors"))
    sd["base_model.model.model.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
    sd["base_model.model.lm_head.weight"] = model.lm_head.weight.detach().clone()
    sd = {k: v for k, v in sd.items() if "token_adapter" not in k}
    save_file(sd, str(tmp_path / "small" / "adapter_model.safetensors"))
    _refused(tmp_path, tiny_model_dir, [pt_adapter, tmp_path / "small"], "shrink the vocabulary from 1040 to 1000")
    # an adapter whose tokenizer is bigger than the model, without resized embeddings
    lora_only = copy_of(sft_adapter)
    lora_only.rename(tmp_path / "lora_only")
    sd = load_file(str(tmp_path / "lora_only" / "adapter_model.safetensors"))
    save_file({k: v for k, v in sd.items() if "lora_" in k}, str(tmp_path / "lora_only" / "adapter_model.safetensors"))
    _refused(tmp_path, tiny_model_dir, [tmp_path / "lora_only"],
             "tokenizer has 1040 tokens but the model has 1000 rows")
    # an adapter trained from another (peft_path) already contains it
    from zhtune.io import write_run_yaml

    chained = copy_of(tokens_adapter)
    chained.rename(tmp_path / "chained")
    write_run_yaml(tmp_path / "chained", "sft",
                   {"peft_path": str(pt_adapter), "model_name_or_path": str(tiny_model_dir)})
    _refused(tmp_path, tiny_model_dir, [pt_adapter, tmp_path / "chained"], "already contains it")
    # not an adapter folder
    _refused(tmp_path, tiny_model_dir, [tmp_path / "wide"], "no adapter_config.json")
    # the CLI prints it and exits 2
    from zhtune.cli import main

    assert main(["merge", "--base", str(tiny_model_dir), "--lora", str(broken), "--output", str(tmp_path / "o")]) == 2


def test_lora_on_embeddings(tmp_path, tiny_model_dir, base_tokenizer_dir):
    """LoRA on embed_tokens (lora_embedding_A/B, base_layer saved) merges like peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "o_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft.save_pretrained(str(tmp_path / "emb"))
    out = M.merge(tiny_model_dir, [tmp_path / "emb"], tmp_path / "m", log=lambda *_: None)
    assert verify_merge(tiny_model_dir, [tmp_path / "emb"], out, log=lambda *_: None).max_abs_diff <= 1e-4
    assert not torch.equal(_tensors(out)["model.embed_tokens.weight"],
                           _tensors(tiny_model_dir)["model.embed_tokens.weight"])


def test_trainable_tokens_grow_the_vocabulary(tmp_path, tiny_model_dir, big_tokenizer_dir):
    """Vocabulary grown with peft trainable tokens (new rows of embed_tokens and lm_head) instead
    of modules_to_save: the merge takes the resized weights and the trained rows."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.resize_token_embeddings(1040)
    new = list(range(1000, 1040))
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["v_proj"],
                                            trainable_token_indices={"embed_tokens": new, "lm_head": new}))
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    peft.save_pretrained(str(tmp_path / "tt"))
    for f in big_tokenizer_dir.iterdir():
        shutil.copy2(f, tmp_path / "tt" / f.name)
    out = M.merge(tiny_model_dir, [tmp_path / "tt"], tmp_path / "m", log=lambda *_: None)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 1040
    assert verify_merge(tiny_model_dir, [tmp_path / "tt"], out, log=lambda *_: None).max_abs_diff <= 1e-4
