"""Every shipped recipe in examples/ validates; the tiny ones point at files that exist and really run."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from zhtune.config import TRAIN_ALIASES, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(ROOT.glob("examples/*.yaml")) + sorted(ROOT.glob("examples/tiny/*.yaml"))
TINY = sorted(ROOT.glob("examples/tiny/*.yaml"))


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_there_are_recipes():
    names = {_name(p) for p in RECIPES}
    for want in ("examples/chinese_llama_pt_lora.yaml", "examples/chinese_alpaca_sft_lora.yaml",
                 "examples/qlora_sft_24gb.yaml", "examples/multiturn_sft.yaml", "examples/tiny/pt.yaml",
                 "examples/tiny/sft.yaml", "examples/tiny/sft_multiturn.yaml", "examples/tiny/qlora.yaml"):
        assert want in names


@pytest.mark.parametrize("path", RECIPES, ids=_name)
def test_recipe_validates_and_names_its_command(path):
    cfg = load_config(TrainConfig, path, [], TRAIN_ALIASES)
    assert cfg.output_dir and cfg.model_name_or_path and cfg.dataset
    header = "".join(itertools.takewhile(lambda line: line.startswith("#"), path.read_text("utf-8").splitlines(True)))
    assert re.search(rf"zhtune train {re.escape(_name(path))}\b", header), "the first comment gives the command"


def test_chinese_llama_pt_recipe_mirrors_run_pt():
    cfg = load_config(TrainConfig, ROOT / "examples/chinese_llama_pt_lora.yaml", [], TRAIN_ALIASES)
    assert (cfg.stage, cfg.lora_rank, cfg.lora_alpha, cfg.cutoff_len) == ("pt", 64, 128, 512)
    assert cfg.lora_target == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert cfg.modules_to_save == ["embed_tokens", "lm_head"]


@pytest.mark.parametrize("path", TINY, ids=_name)
def test_tiny_recipe_files_exist(path):
    cfg = load_config(TrainConfig, path, [], TRAIN_ALIASES)
    assert cfg.model_name_or_path == "tiny/base"  # made by: python -m zhtune.tiny tiny/base
    for entry in [*cfg.dataset, *cfg.val_file, *filter(None, [cfg.deepspeed, cfg.peft_path])]:
        assert (ROOT / entry).exists(), f"{_name(path)}: {entry} does not exist (relative to the repo root)"


@pytest.fixture()
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds contention on a busy machine
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("path", TINY, ids=_name)
def test_tiny_recipe_runs(path, tmp_path, tiny_model_dir, monkeypatch, _one_thread):
    from zhtune.io import read_run_yaml
    from zhtune.train.run import main

    monkeypatch.chdir(ROOT)  # the recipes use paths relative to the repository root
    out = tmp_path / "out"
    assert main([str(path), f"model_name_or_path={tiny_model_dir}", f"output_dir={out}", "max_steps=2",
                 "save_steps=2", "val_size=0", "val_file=[]", "report_to=none"]) == 0
    cfg = load_config(TrainConfig, path, [], TRAIN_ALIASES)
    folder = out / (f"{cfg.stage}_lora_model" if cfg.finetuning_type != "full" else f"{cfg.stage}_model")
    assert (folder / "run.yaml").is_file() and read_run_yaml(folder)["stage"] == cfg.stage
    assert (out / "checkpoint-2").is_dir() and (out / "train_results.json").is_file()
