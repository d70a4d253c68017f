"""Every shipped multi-device config is valid: DeepSpeed JSONs resolve through transformers' "auto"
filling and pass DeepSpeed's own schema (when deepspeed is installed); the FSDP files are accepted by
TrainingArguments and by `accelerate launch`. Running them needs GPUs (tests/train/test_ddp_gpu.py)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DS_CONFIGS = sorted((ROOT / "examples" / "deepspeed").glob("*.json"))
# DeepSpeed's documented top-level keys that our configs may use (its schema only checks nested blocks)
DS_TOP_LEVEL = {"bf16", "fp16", "zero_optimization", "gradient_accumulation_steps", "gradient_clipping",
                "train_batch_size", "train_micro_batch_size_per_gpu", "steps_per_print", "wall_clock_breakdown",
                "optimizer", "scheduler", "zero_allow_untested_optimizer", "activation_checkpointing"}


def test_the_three_zero_configs_are_shipped():
    names = {p.name for p in DS_CONFIGS}
    assert {"ds_zero2.json", "ds_zero3.json", "ds_zero3_offload.json"} <= names


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_config_resolves_and_validates(path, tmp_path):
    from transformers import LlamaConfig, TrainingArguments

    raw = json.loads(path.read_text(encoding="utf-8"))
    assert set(raw) <= DS_TOP_LEVEL, set(raw) - DS_TOP_LEVEL
    # transformers resolves a DeepSpeed config only with deepspeed installed (CI installs it: `ci` extra)
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'zhtune[gpu]')")
    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(path), use_cpu=True, bf16=True,
                             per_device_train_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=1.0)
    hf = args.hf_deepspeed_config
    # fill the model-dependent "auto" values the way Trainer does for a 7B LLaMA (hidden 4096)
    hf.trainer_config_finalize(args, types.SimpleNamespace(config=LlamaConfig(hidden_size=4096)), 1000)
    resolved = hf.config
    assert "auto" not in json.dumps(resolved)
    assert resolved["train_batch_size"] == 8 and resolved["gradient_clipping"] == 1.0
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:
        return  # deepspeed is a GPU extra; transformers' resolution above still ran
    ds = DeepSpeedConfig(dict(resolved))        # pydantic schema: unknown nested keys are errors
    assert ds.zero_optimization_stage == raw["zero_optimization"]["stage"]
    if "offload" in path.name:
        assert ds.zero_config.offload_optimizer.device == "cpu" and ds.zero_config.offload_param.device == "cpu"


def test_deepspeed_schema_rejects_a_misspelt_key():
    ds = pytest.importorskip("deepspeed.runtime.config")
    with pytest.raises(Exception, match="overlap_comms"):
        ds.DeepSpeedConfig({"train_batch_size": 8, "zero_optimization": {"stage": 2, "overlap_comms": True}})


def test_fsdp_config_json_is_accepted_by_training_arguments(tmp_path):
    from transformers import TrainingArguments

    path = ROOT / "examples" / "fsdp" / "fsdp_config.json"
    args = TrainingArguments(output_dir=str(tmp_path), fsdp="full_shard auto_wrap", fsdp_config=str(path),
                             use_cpu=True)
    assert args.fsdp and args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert args.fsdp_config["version"] == 2


def test_accelerate_fsdp_yaml_is_accepted_by_accelerate_launch():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    path = ROOT / "examples" / "fsdp" / "accelerate_fsdp.yaml"
    cfg = ClusterConfig.from_yaml_file(str(path))      # unknown top-level keys raise here
    assert str(cfg.distributed_type).endswith("FSDP")
    known = {a.dest for a in launch_command_parser()._actions}
    unknown = [k for k in yaml.safe_load(path.read_text())["fsdp_config"] if k not in known]
    assert not unknown, f"accelerate launch does not know {unknown}"


def test_shipped_yaml_recipes_point_at_shipped_configs():
    """The 7B multi-GPU / multi-node recipes load as TrainConfigs and name configs that exist."""
    from zhtune.config import TRAIN_ALIASES, TrainConfig, load_config

    recipes = sorted((ROOT / "examples").glob("*7b*gpu*.yaml")) + sorted((ROOT / "examples").glob("*nodes*.yaml"))
    assert len(recipes) >= 2, recipes
    for recipe in recipes:
        cfg = load_config(TrainConfig, recipe, [], TRAIN_ALIASES)
        for key in ("deepspeed", "fsdp_config"):
            value = getattr(cfg, key)
            if value:
                assert (ROOT / value).is_file(), f"{recipe.name}: {key}={value} does not exist"
        assert cfg.deepspeed or cfg.fsdp, recipe.name
