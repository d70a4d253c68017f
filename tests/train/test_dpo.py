"""stage=dpo: learns held-out preferences, the reference is never a second model, works on top of an
SFT adapter and for full fine-tuning, every pref_loss runs and logs rewards/*, bad input is named."""

from __future__ import annotations

import gc
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from zhtune.config import TRAIN_ALIASES, TrainConfig, load_config
from zhtune.errors import ZhtuneError
from zhtune.tiny import write_jsonl
from zhtune.train.run import main as train_main

NOUNS = ["river", "garden", "house", "teacher", "window", "market", "engine", "letter", "forest", "kitchen",
         "bridge", "doctor", "village", "camera", "library", "museum", "station", "island", "bottle", "mountain",
         "student", "castle", "bicycle", "harbor", "painter", "farmer", "desert", "orchard", "planet", "violin"]


def synthetic_pairs(nouns: list[str], seed: int) -> list[dict]:
    """A learnable rule: the preferred answer is kind, the rejected one rude, whatever the topic."""
    rng = random.Random(seed)
    kind = ["It is a good and helpful {n}.", "The {n} is kind and good.", "A good {n}, thank you."]
    rude = ["I hate the {n}, go away.", "Stupid {n}, do not ask.", "Go away, the {n} is stupid."]
    return [{"prompt": f"Tell me about the {n}.", "chosen": rng.choice(kind).format(n=n),
             "rejected": rng.choice(rude).format(n=n)} for n in nouns]


@pytest.fixture(scope="module")
def pref_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pref")
    train = write_jsonl(folder / "train.jsonl", synthetic_pairs(NOUNS[:22], 0))
    heldout = write_jsonl(folder / "heldout.jsonl", synthetic_pairs(NOUNS[22:], 1))   # unseen topics
    return train, heldout


def args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model_name_or_path={model}", "stage=dpo", f"dataset=[{data}]", f"output_dir={out}", "template=default",
            "cutoff_len=64", "per_device_train_batch_size=8", "logging_steps=1", "save_steps=1000",
            "learning_rate=5e-3", "lora_rank=8", "lora_alpha=16", "lr_scheduler_type=constant", *extra]


def results(out: Path, split: str = "train") -> dict:
    return json.loads((out / f"{split}_results.json").read_text())


def test_dpo_lora_learns_heldout_preferences(tiny_model_dir, pref_files, tmp_path):
    train, heldout = pref_files
    out = tmp_path / "dpo"
    assert train_main(args(tiny_model_dir, train, out, "max_steps=24", f"val_file=[{heldout}]", "pref_beta=0.1")) == 0
    ev = results(out, "eval")
    assert ev["eval_rewards/accuracies"] >= 0.8, ev        # 8 unseen topics, chance is 0.5
    assert ev["eval_rewards/margins"] > 0
    tr = results(out)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(tr)
    folder = out / "dpo_lora_model"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert (folder / "run.yaml").is_file() and not (folder / "ref").exists()
    for name in ("trainer_state.json", "all_results.json", "training_loss.png", "run.yaml"):
        assert (out / name).is_file(), name
    assert not (out / "README.md").exists()
    # the loss fell
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert losses[-1] < losses[0]


def _trainer(cfg_args: list[str]):
    from zhtune.data.preference import build_preference_dataset
    from zhtune.data.templates import get_template
    from zhtune.train.dpo import make_preference_trainer, prepare_policy

    cfg = load_config(TrainConfig, None, cfg_args, TRAIN_ALIASES)
    template = get_template(cfg.template)
    tokenizer, model, _, peft_config = prepare_policy(cfg, template)
    data = build_preference_dataset(cfg, tokenizer, template)
    return make_preference_trainer(cfg, model, tokenizer, data, Path(cfg.output_dir), peft_config), tokenizer


def _causal_lms() -> int:
    from transformers import LlamaForCausalLM

    gc.collect()
    return sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects())


def _ref_logps(trainer):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    return torch.cat(trainer.compute_ref_log_probs(trainer.model, batch)), batch


def _logps(model, batch):
    """Summed log-probs of the completion tokens (chosen rows then rejected rows)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logp * batch["completion_mask"][:, 1:]).sum(-1)


def test_reference_is_the_base_with_the_adapter_disabled(tiny_model_dir, pref_files, tmp_path):
    from transformers import AutoModelForCausalLM

    before = _causal_lms()
    trainer, _ = _trainer(args(tiny_model_dir, pref_files[0], tmp_path / "o"))
    assert trainer.ref_model is None
    assert _causal_lms() - before == 1                      # one model in memory, not two
    model = trainer.model
    assert "ref" not in model.peft_config                   # no copy of the adapter either
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    ref_params = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert base_params == sum(p.numel() for p in ref_params.parameters())
    # the reference log-probs are the untouched base model's, even after the adapter has moved
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    ref, batch = _ref_logps(trainer)
    assert torch.allclose(ref, _logps(ref_params, batch), atol=1e-4)
    assert not torch.allclose(_logps(model, batch), ref, atol=1e-2)


def test_dpo_loss_never_builds_full_logits(tiny_model_dir, pref_files, tmp_path):
    """stage=dpo computes the policy's and the reference's log-probs through TRL's fused head (labelled positions
    only, in tiles): the lm_head module itself never runs, so no [rows, T, V] logits exist."""
    trainer, _ = _trainer(args(tiny_model_dir, pref_files[0], tmp_path / "o"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings()
    calls: list[tuple] = []
    head.register_forward_hook(lambda module, inputs, out: calls.append(tuple(out.shape)))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert torch.isfinite(loss) and calls == []
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainer.model.named_parameters()
               if "lora_" in n)


def test_dpo_continues_an_sft_adapter_whose_model_is_the_reference(tiny_model_dir, pref_files, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    # an "SFT adapter" whose weights are not zero, so the SFT model differs from the base
    torch.manual_seed(0)
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                         LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    sft.save_pretrained(str(tmp_path / "sft_lora_model"))
    peft_path = f"peft_path={tmp_path / 'sft_lora_model'}"
    trainer, _ = _trainer(args(tiny_model_dir, pref_files[0], tmp_path / "o", peft_path))
    assert trainer.ref_model is None and "ref" in trainer.model.peft_config
    sft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                                          str(tmp_path / "sft_lora_model"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ref, batch = _ref_logps(trainer)
    assert torch.allclose(ref, _logps(sft_model, batch), atol=1e-4)    # reference = the SFT model
    assert not torch.allclose(ref, _logps(base, batch), atol=1e-3)


def test_dpo_on_sft_adapter_end_to_end(tiny_model_dir, pref_files, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                         LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    sft.save_pretrained(str(tmp_path / "sft_lora_model"))
    out = tmp_path / "dpo"
    assert train_main(args(tiny_model_dir, pref_files[0], out, "max_steps=2",
                           f"peft_path={tmp_path / 'sft_lora_model'}")) == 0
    saved = load_file(str(out / "dpo_lora_model" / "adapter_model.safetensors"))
    start = load_file(str(tmp_path / "sft_lora_model" / "adapter_model.safetensors"))
    assert set(saved) == set(start)                          # the continued adapter, without the 'ref' copy
    assert any(not torch.equal(saved[k], start[k]) for k in saved)


def test_full_finetuning_precomputes_the_reference(tiny_model_dir, pref_files, tmp_path):
    before = _causal_lms()
    out = tmp_path / "full"
    trainer, _ = _trainer(args(tiny_model_dir, pref_files[0], out, "finetuning_type=full", "max_steps=2",
                               "learning_rate=1e-4"))
    assert trainer.ref_model is None and trainer.args.precompute_ref_log_probs
    assert _causal_lms() - before == 1
    del trainer
    assert train_main(args(tiny_model_dir, pref_files[0], out, "finetuning_type=full", "max_steps=2",
                           "learning_rate=1e-4", "overwrite_output_dir=true")) == 0
    assert (out / "dpo_model" / "config.json").is_file()
    assert "rewards/accuracies" in results(out)


@pytest.mark.parametrize("loss", ["ipo", "hinge", "orpo", "simpo"])
def test_every_preference_loss_trains_and_logs_rewards(tiny_model_dir, pref_files, tmp_path, loss):
    out = tmp_path / loss
    assert train_main(args(tiny_model_dir, pref_files[0], out, "max_steps=2", f"pref_loss={loss}")) == 0
    tr = results(out)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(tr), tr
    assert (out / "dpo_lora_model" / "adapter_model.safetensors").is_file()
    assert not (out / "README.md").exists()


def test_bad_preference_input_is_refused_with_its_line(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "q", "output": "a"}])
    with pytest.raises(ZhtuneError, match="cannot be used for preference tuning") as err:
        train_main(args(tiny_model_dir, data, tmp_path / "o", "max_steps=1"))
    assert err.value.where == f"{data}:1"
    assert not (tmp_path / "o" / "run.yaml").exists()
    with pytest.raises(ZhtuneError, match="pref_loss"):
        load_config(TrainConfig, None, ["pref_loss=kto"], TRAIN_ALIASES)


@pytest.mark.parametrize("recipe", sorted(Path(__file__).resolve().parents[2].glob("examples/**/dpo*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_dpo_recipes_load(recipe):
    cfg = load_config(TrainConfig, recipe, [], TRAIN_ALIASES)
    assert cfg.stage == "dpo" and cfg.output_dir
    assert recipe.read_text(encoding="utf-8").startswith("# zhtune train examples/")


def test_a_killed_dpo_run_resumes_to_the_same_adapter(tiny_model_dir, pref_files, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "res"
    run = args(tiny_model_dir, pref_files[0], out, "max_steps=3", "save_steps=2", "lora_dropout=0")
    assert train_main(run) == 0
    whole = load_file(str(out / "dpo_lora_model" / "adapter_model.safetensors"))
    # as if killed after checkpoint-2: only run.yaml and that checkpoint are left
    for p in out.iterdir():
        if p.name not in ("run.yaml", "checkpoint-2"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert train_main(run) == 0
    resumed = load_file(str(out / "dpo_lora_model" / "adapter_model.safetensors"))
    assert set(resumed) == set(whole)
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_qlora_dpo_trains_the_adapter_on_a_4bit_base(tiny_model_dir, pref_files, tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    out = tmp_path / "q"
    assert train_main(args(tiny_model_dir, pref_files[0], out, "max_steps=2", "finetuning_type=qlora")) == 0
    saved = load_file(str(out / "dpo_lora_model" / "adapter_model.safetensors"))
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)       # B starts at zero: it moved
    assert "rewards/accuracies" in results(out)
