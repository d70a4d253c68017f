"""Config machinery: YAML + key=value overrides, types, unknown keys with suggestions, aliases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from zhtune.config import config_help, load_config, opt, parse_overrides
from zhtune.errors import ZhtuneError


@dataclass
class Demo:
    learning_rate: float = opt(1e-4, "step size")
    max_steps: int = opt(-1, "steps")
    stage: Literal["pt", "sft"] = opt("sft", "stage")
    bf16: bool = opt(False, "bf16")
    dataset: list[str] = opt([], "files")
    columns: dict[str, str] = opt({}, "mapping")
    peft_path: Optional[str] = opt(None, "adapter")


ALIASES = {"lr": "learning_rate", "dataset_dir": "dataset"}


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 2.0e-4\nstage: pt\ndataset: [a.json, b.json]\n")
    cfg = load_config(Demo, f, ["max_steps=5", "bf16=true", "columns=prompt:instruction,response:output"])
    assert cfg.learning_rate == 2e-4 and cfg.stage == "pt" and cfg.max_steps == 5 and cfg.bf16 is True
    assert cfg.dataset == ["a.json", "b.json"]
    assert cfg.columns == {"prompt": "instruction", "response": "output"}


def test_aliases_and_comma_lists():
    cfg = load_config(Demo, None, ["lr=3e-4", "dataset_dir=x,y", "peft_path=null"], ALIASES)
    assert cfg.learning_rate == 3e-4 and cfg.dataset == ["x", "y"] and cfg.peft_path is None


def test_unknown_key_suggests_closest(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learnig_rate: 1\n")
    with pytest.raises(ZhtuneError) as exc:
        load_config(Demo, f)
    assert "learnig_rate" in str(exc.value) and "learning_rate" in exc.value.hint
    assert str(f) in exc.value.where


@pytest.mark.parametrize("item,key", [("max_steps=abc", "max_steps"), ("stage=dpo", "stage"),
                                      ("bf16=maybe", "bf16")])
def test_bad_values_name_the_key(item, key):
    with pytest.raises(ZhtuneError) as exc:
        load_config(Demo, None, [item])
    assert key in exc.value.where and "command line" in exc.value.where


def test_bad_yaml_names_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("a: 1\nb: [unclosed\nc: 2\n")
    with pytest.raises(ZhtuneError) as exc:
        load_config(Demo, f)
    assert f"{f}:" in exc.value.where


def test_override_without_equals():
    with pytest.raises(ZhtuneError):
        parse_overrides(["learning_rate"])


def test_help_lists_fields():
    text = config_help(Demo)
    assert "learning_rate" in text and "step size" in text
