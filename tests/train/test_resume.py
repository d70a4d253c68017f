"""kill -9 mid-run, re-run the same command: it resumes and ends with the very same adapter;
an output_dir holding another run is refused; bad config keys and templates are named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from zhtune import tiny
from zhtune.errors import ZhtuneError
from zhtune.train.run import main

SFT = str(tiny.asset("sft_qa.jsonl"))


def _args(model, out, *extra):
    # lora_dropout > 0: the resumed run must also restore the RNG, not only weights and optimizer
    return [f"model_name_or_path={model}", f"output_dir={out}", "stage=sft", f"dataset={SFT}", "cutoff_len=128",
            "max_steps=24", "save_steps=4", "per_device_train_batch_size=2", "learning_rate=2e-3", "lora_dropout=0.1",
            "seed=3", "logging_steps=1", "report_to=none", *extra]


def _cli(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return [sys.executable, "-m", "zhtune", "train", *args], env


@pytest.mark.slow  # three processes: ~40 s on an idle 2-core machine
def test_killed_run_resumes_to_the_same_adapter(tmp_path, tiny_model_dir):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    command, env = _cli(_args(tiny_model_dir, whole))
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)

    command, env = _cli(_args(tiny_model_dir, killed))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-8" / "trainer_state.json").exists():  # two checkpoints written
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "sft_lora_model").exists()  # it really died mid-run

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stdout
    a = load_file(str(whole / "sft_lora_model" / "adapter_model.safetensors"))
    b = load_file(str(killed / "sft_lora_model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key  # bit-identical


def test_output_dir_of_another_run_is_refused(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    assert main(_args(tiny_model_dir, out, "max_steps=2", "save_steps=100")) == 0
    with pytest.raises(ZhtuneError) as exc:
        main(_args(tiny_model_dir, out, "max_steps=2", "learning_rate=1e-4"))
    assert exc.value.where == "output_dir" and "learning_rate" in str(exc.value)
    # the same command again is the same run: accepted (nothing left to train)
    assert main(_args(tiny_model_dir, out, "max_steps=2", "save_steps=100")) == 0
    # overwrite_output_dir starts over
    assert main(_args(tiny_model_dir, out, "max_steps=2", "learning_rate=1e-4", "overwrite_output_dir=true")) == 0


def test_foreign_files_in_output_dir_are_refused(tmp_path, tiny_model_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("not a training run")
    with pytest.raises(ZhtuneError) as exc:
        main(_args(tiny_model_dir, out, "max_steps=1"))
    assert exc.value.where == "output_dir" and "thesis.tex" in str(exc.value)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]  # nothing written


def test_bad_keys_and_templates_are_named(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    with pytest.raises(ZhtuneError) as exc:
        main(_args(tiny_model_dir, out, "learnig_rate=1e-4"))
    assert "learning_rate" in exc.value.hint
    with pytest.raises(ZhtuneError) as exc:
        main(_args(tiny_model_dir, out, "template=chinese-alpacca"))
    assert "chinese-alpaca" in (exc.value.hint or "") and exc.value.where == "template"
    with pytest.raises(ZhtuneError) as exc:
        main(_args(tiny_model_dir, out, "training_args={warmup_ratioo: 0.1}"))
    assert exc.value.where == "training_args.warmup_ratioo"
    with pytest.raises(ZhtuneError) as exc:
        main(_args(tmp_path / "missing-model", out))
    assert exc.value.where == "model_name_or_path"
    assert not out.exists()  # nothing half-written


def test_help_lists_examples_config_and_templates(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "examples/tiny/pt.yaml" in capsys.readouterr().out
    assert main(["--help-config"]) == 0
    text = capsys.readouterr().out
    assert "lora_target" in text and "pretrained_model -> model_name_or_path" in text
    assert main(["--help-templates"]) == 0
    assert "llama2-zh" in capsys.readouterr().out


def test_resume_skips_a_checkpoint_cut_off_while_being_written(tmp_path):
    from zhtune.train.common import _last_complete_checkpoint

    for step, complete in ((4, True), (8, True), (12, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert _last_complete_checkpoint(tmp_path).name == "checkpoint-8"
