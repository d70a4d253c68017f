"""The trainer arguments: built once from the config into the class the stage trains with
(TrainingArguments, or TRL's DPOConfig / ORPOConfig / CPOConfig), training_args checked against it."""

from __future__ import annotations

import pytest

from zhtune.config import TRAIN_ALIASES, TrainConfig, load_config
from zhtune.errors import ZhtuneError
from zhtune.train.common import training_arguments
from zhtune.train.dpo import preference_arguments


def _cfg(tmp_path, *items: str) -> TrainConfig:
    return load_config(TrainConfig, None, ["model_name_or_path=m", f"output_dir={tmp_path}", "learning_rate=3e-4",
                                           "max_steps=7", "warmup_ratio=0.25", "seed=5", *items], TRAIN_ALIASES)


@pytest.mark.parametrize("loss, cls", [("sigmoid", "DPOConfig"), ("ipo", "DPOConfig"), ("orpo", "ORPOConfig"),
                                       ("simpo", "CPOConfig")])
def test_preference_arguments_are_the_stage_class_built_once(tmp_path, loss, cls):
    cfg = _cfg(tmp_path, "stage=dpo", f"pref_loss={loss}", "pref_beta=0.3", "cutoff_len=96")
    args = preference_arguments(cfg, tmp_path, has_eval=False)
    assert type(args).__name__ == cls
    # the settings every stage shares arrive unchanged, with the loss settings on top
    assert (args.learning_rate, args.max_steps, args.seed, args.beta, args.max_length) == (3e-4, 7, 5, 0.3, 96)
    assert args.warmup_steps == 0.25 and args.output_dir == str(tmp_path)


def test_training_args_may_name_any_field_of_the_stage_class(tmp_path):
    cfg = _cfg(tmp_path, "stage=dpo", "training_args={label_smoothing: 0.1, adam_beta2: 0.95}")
    args = preference_arguments(cfg, tmp_path, has_eval=False)
    assert args.label_smoothing == 0.1 and args.adam_beta2 == 0.95
    # ... but a DPO-only field is not a TrainingArguments field: sft names it
    with pytest.raises(ZhtuneError) as exc:
        training_arguments(_cfg(tmp_path, "training_args={label_smoothing: 0.1}"), tmp_path, has_eval=False)
    assert exc.value.where == "training_args.label_smoothing" and "TrainingArguments" in str(exc.value)
    with pytest.raises(ZhtuneError) as exc:
        preference_arguments(_cfg(tmp_path, "stage=dpo", "training_args={label_smothing: 0.1}"), tmp_path, False)
    assert exc.value.where == "training_args.label_smothing" and "label_smoothing" in exc.value.hint
