"""Issue 16's defects in `zhtune train`: out-of-range values are refused by name, two runs into one
output_dir cannot mix, a damaged checkpoint names the one before, starting over never deletes the user's
files, data errors come before the model loads, a path-looking dataset is never sent to the Hub."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from zhtune import tiny
from zhtune.config import TRAIN_ALIASES, TrainConfig, load_config
from zhtune.errors import ZhtuneError
from zhtune.train.run import main

SFT = str(tiny.asset("sft_qa.jsonl"))


def _args(model, out, *extra):
    return [f"model_name_or_path={model}", f"output_dir={out}", "stage=sft", f"dataset={SFT}", "cutoff_len=128",
            "per_device_train_batch_size=2", "logging_steps=1", "report_to=none", "max_samples=8", *extra]


# --- defect 7 and the rest of the value checks --------------------------------------------------------------

@pytest.mark.parametrize("item,key", [("max_steps=-5", "max_steps"), ("max_steps=0", "max_steps"),
                                      ("warmup_ratio=10", "warmup_ratio"), ("warmup_ratio=-0.1", "warmup_ratio"),
                                      ("num_train_epochs=0", "num_train_epochs"), ("lora_dropout=1", "lora_dropout"),
                                      ("weight_decay=-1", "weight_decay"), ("val_size=2.5", "val_size"),
                                      ("save_total_limit=0", "save_total_limit"), ("eval_steps=0", "eval_steps"),
                                      ("learning_rate=nan", "learning_rate"), ("pref_beta=0", "pref_beta")])
def test_out_of_range_values_are_refused_by_name(item, key):
    with pytest.raises(ZhtuneError) as exc:
        load_config(TrainConfig, None, ["output_dir=o", item], TRAIN_ALIASES)
    assert exc.value.where == key


def test_in_range_values_pass():
    cfg = load_config(TrainConfig, None, ["output_dir=o", "max_steps=-1", "warmup_ratio=0.03", "val_size=20",
                                          "lora_dropout=0"], TRAIN_ALIASES)
    assert cfg.max_steps == -1 and cfg.warmup_ratio == 0.03 and cfg.val_size == 20


# --- defect 1: two trainings into one output_dir ---------------------------------------------------------

def _cli(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return [sys.executable, "-m", "zhtune", "train", *args], env


@pytest.mark.slow  # two training processes, the first one killed with SIGTERM: ~25 s
def test_a_second_run_into_the_same_output_dir_is_refused(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    command, env = _cli(_args(tiny_model_dir, out, "max_steps=100000", "save_steps=100000"))
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "run.yaml").exists():  # written just before training starts
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr
    assert "being written by another zhtune run" in second.stderr and str(out) in second.stderr
    assert f"pid {first.pid}" in second.stderr and "output_dir" in second.stderr
    first.send_signal(signal.SIGTERM)  # like Ctrl-C: unwinds, releases the lock
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143 and "Traceback" not in err
    assert not (tmp_path / ".out.lock").exists() and not list(out.glob("checkpoint-*"))


# --- defect 14: a truncated optimizer.pt when resuming ------------------------------------------------------

def test_damaged_checkpoint_names_the_one_before(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    args = _args(tiny_model_dir, out, "max_steps=2", "save_steps=1")
    assert main(args) == 0
    optimizer = out / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    with pytest.raises(ZhtuneError) as exc:
        main(args)  # the same command: resumes from the last checkpoint, which is damaged
    assert exc.value.where == "resume_from_checkpoint"
    assert str(out / "checkpoint-2") in exc.value.what and "optimizer.pt is truncated" in exc.value.what
    assert f"resume_from_checkpoint={out / 'checkpoint-1'}" in exc.value.hint
    capsys.readouterr()
    assert main([*args, f"resume_from_checkpoint={out / 'checkpoint-1'}"]) == 0  # the offer works
    assert "resuming" in capsys.readouterr().out
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2


# --- defect 2 for train: starting over deletes only what a training run wrote -------------------------

def test_overwrite_output_dir_refuses_foreign_files_and_clears_its_own(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    assert main(_args(tiny_model_dir, out, "max_steps=1", "save_steps=1")) == 0
    assert (out / "checkpoint-1").is_dir() and (out / "sft_lora_model").is_dir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ZhtuneError) as exc:
        main(_args(tiny_model_dir, out, "max_steps=1", "learning_rate=1e-3", "overwrite_output_dir=true"))
    assert exc.value.where == "output_dir" and "notes.txt" in exc.value.what
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint-1").is_dir()
    (out / "notes.txt").unlink()
    (out / ".sft_lora_model.k3j4h5g6.tmp").mkdir()  # what a run killed while saving leaves
    (out / "checkpoint-1" / "old-run").write_text("")
    assert main(_args(tiny_model_dir, out, "max_steps=1", "learning_rate=1e-3", "overwrite_output_dir=true")) == 0
    assert not (out / "checkpoint-1" / "old-run").exists() and not list(out.glob(".*.tmp"))  # the old run's went


# --- data before the model; a path is never a Hub id; "output": null ------------------------------------

def test_data_errors_come_before_the_model_loads(tmp_path, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])  # loading the model would fail
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "你好", "output": "你好！"}\n{"instruction": "再见", "output": null}\n',
                    encoding="utf-8")
    with pytest.raises(ZhtuneError) as exc:
        main(_args(model, tmp_path / "out", f"dataset={data}", "max_samples=null", "max_steps=1"))
    assert exc.value.where == f"{data}:2" and "'output' is null" in exc.value.what
    assert not (tmp_path / "out").exists()


def test_a_path_looking_dataset_is_never_a_hub_id(tmp_path, monkeypatch):
    from zhtune.data.files import find_sources

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for entry in ("data/train", "./train", "/no/such/dir", "~/no-such-zhtune-dir/x"):
        with pytest.raises(ZhtuneError, match="dataset path not found"):
            find_sources(entry, "dataset")
    assert [s.kind for s in find_sources("someone/chinese-corpus", "dataset")] == ["hub"]


def test_estimate_names_malformed_json(tmp_path, capsys):
    from zhtune.cli import main as cli

    ds = tmp_path / "ds.json"
    ds.write_text("[1, 2]")
    assert cli(["estimate", "model_name_or_path=chinese-llama-2-7b", f"deepspeed={ds}"]) == 2
    assert "DeepSpeed config holds a JSON list" in capsys.readouterr().err
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": {"vocab": ')
    assert cli(["estimate", "model_name_or_path=chinese-llama-2-7b", f"tokenizer_name_or_path={tok}"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json is not valid JSON" in err and "Traceback" not in err
