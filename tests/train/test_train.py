"""`zhtune train` pt / sft end to end on the tiny model: loss falls, the output layout, what is trained."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from zhtune import tiny
from zhtune.data.templates import get_template
from zhtune.io import read_run_yaml
from zhtune.train.run import main

ZH = str(tiny.asset("zh_corpus.txt"))
ZH_HELDOUT = str(tiny.asset("zh_heldout.txt"))
SFT = str(tiny.asset("sft_qa.jsonl"))


def train(out, model, *overrides) -> int:
    return main([f"model_name_or_path={model}", f"output_dir={out}", "seed=0", "report_to=none", *overrides])


def losses(out) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def assert_falls(values: list[float]) -> None:
    assert len(values) >= 20
    first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
    assert last < first - 0.1, (first, last)


@pytest.fixture(scope="module")
def pt_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("pt") / "out"
    assert train(out, tiny_model_dir, "stage=pt", f"dataset={ZH}", f"val_file={ZH_HELDOUT}", "cutoff_len=64",
                 "max_steps=30", "learning_rate=3e-3", "per_device_train_batch_size=4", "logging_steps=1",
                 "save_steps=15", "lora_rank=8") == 0
    return out


def test_pt_loss_falls_and_writes_the_chinese_llama_layout(pt_run, tiny_model_dir):
    assert_falls(losses(pt_run))
    for name in ("trainer_state.json", "train_results.json", "eval_results.json", "all_results.json",
                 "training_loss.png", "run.yaml", "checkpoint-15", "checkpoint-30"):
        assert (pt_run / name).exists(), name
    adapter = pt_run / "pt_lora_model"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.model", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "run.yaml"):
        assert (adapter / name).is_file(), name
    assert (pt_run / "training_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "eval_loss" in json.loads((pt_run / "eval_results.json").read_text())
    run = read_run_yaml(adapter)  # merge/chat find the base and the template from the adapter folder alone
    assert run["stage"] == "pt" and run["parents"]["model"] == str(tiny_model_dir.resolve())
    assert run["config"]["template"] == "default"
    assert not list(pt_run.glob(".*tmp*"))  # no temp folders left


def test_pt_adapter_holds_only_trained_lora_weights(pt_run):
    weights = load_file(str(pt_run / "pt_lora_model" / "adapter_model.safetensors"))
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    assert all(weights[k].abs().sum() > 0 for k in weights if "lora_B" in k)  # B starts at zero: it trained
    config = json.loads((pt_run / "pt_lora_model" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    assert not config.get("modules_to_save")  # the vocabulary did not grow


def test_saved_tokenizer_matches_the_training_one(pt_run, tiny_model_dir):
    from transformers import AutoTokenizer

    text = "中国的首都是北京。The capital of China is Beijing."
    saved = AutoTokenizer.from_pretrained(str(pt_run / "pt_lora_model"))
    source = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert saved(text).input_ids == source(text).input_ids


@pytest.fixture(scope="module")
def sft_grown_run(tmp_path_factory, tiny_model_dir, grown_tokenizer_dir):
    out = tmp_path_factory.mktemp("sft") / "out"
    assert train(out, tiny_model_dir, "stage=sft", f"tokenizer_name_or_path={grown_tokenizer_dir}",
                 f"dataset={SFT}", "template=chinese-alpaca", "cutoff_len=128", "packing=true", "max_steps=30",
                 "learning_rate=3e-3", "per_device_train_batch_size=2", "logging_steps=1", "save_steps=100",
                 "lora_rank=8") == 0
    return out


def test_sft_on_a_grown_vocabulary(sft_grown_run, grown_tokenizer_dir):
    from transformers import AutoTokenizer

    assert_falls(losses(sft_grown_run))
    adapter = sft_grown_run / "sft_lora_model"
    config = json.loads((adapter / "adapter_config.json").read_text())
    size = len(AutoTokenizer.from_pretrained(str(grown_tokenizer_dir)))
    # train_embeddings=new_rows (the default): only the added rows train (peft trainable tokens)
    assert not config.get("modules_to_save")
    new_rows = list(range(1000, size))
    assert config["trainable_token_indices"] == {"embed_tokens": new_rows, "lm_head": new_rows}
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    rows = {k: tuple(v.shape) for k, v in weights.items() if k.endswith("trainable_tokens_delta")}
    assert len(rows) == 2 and all(s == (size - 1000, 64) for s in rows.values())
    # the resized matrices (with their initialised new rows) are saved beside them, for merge
    shapes = {k: tuple(v.shape) for k, v in weights.items() if k.endswith("base_layer.weight")}
    assert shapes and all(s == (size, 64) for s in shapes.values())
    saved = AutoTokenizer.from_pretrained(str(adapter))
    assert len(saved) == size
    assert saved.chat_template == get_template("chinese-alpaca").jinja()


def test_lora_changes_the_adapter_and_not_the_base(tmp_path, tiny_model_dir):
    from zhtune.config import TRAIN_ALIASES, TrainConfig, load_config
    from zhtune.data.pretrain import build_pretrain_dataset
    from zhtune.train.common import make_trainer, prepare_model

    cfg = load_config(TrainConfig, None, [f"model_name_or_path={tiny_model_dir}", "stage=pt", f"dataset={ZH}",
                                          f"output_dir={tmp_path}", "max_steps=3", "cutoff_len=64",
                                          "learning_rate=1e-2", "save_steps=100", "report_to=none"], TRAIN_ALIASES)
    tokenizer, model, _ = prepare_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    make_trainer(cfg, model, tokenizer, build_pretrain_dataset(cfg, tokenizer), tmp_path).train()
    after = dict(model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora and all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    base = [n for n in before if "lora_" not in n]
    assert base and all(torch.equal(before[n], after[n]) for n in base)


def test_full_finetuning_writes_a_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert train(out, tiny_model_dir, "stage=sft", "finetuning_type=full", f"dataset={SFT}", "max_steps=3",
                 "cutoff_len=128", "learning_rate=1e-3", "save_steps=100") == 0
    folder = out / "sft_model"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.model").is_file() and (folder / "run.yaml").is_file()
    tuned = AutoModelForCausalLM.from_pretrained(str(folder))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_peft_path_continues_an_adapter(sft_grown_run, tmp_path, tiny_model_dir, grown_tokenizer_dir):
    first = sft_grown_run / "sft_lora_model"
    out = tmp_path / "more"
    # a learning rate of ~0: the continued adapter must come out as the one it started from
    assert train(out, tiny_model_dir, "stage=sft", f"tokenizer_name_or_path={grown_tokenizer_dir}",
                 f"peft_path={first}", f"dataset={SFT}", "template=chinese-alpaca", "cutoff_len=128",
                 "max_steps=1", "learning_rate=1e-12", "save_steps=100") == 0
    a = load_file(str(first / "adapter_model.safetensors"))
    b = load_file(str(out / "sft_lora_model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert read_run_yaml(out / "sft_lora_model")["parents"]["peft_path"] == str(first.resolve())
