"""streaming=true: `zhtune train stage=pt` tokenises and packs while training; a run killed with -9 resumes from
the data position in its checkpoint and ends with the very adapter of an uninterrupted run (nothing repeated,
nothing skipped, also across the end of the corpus); two DDP processes see the one-process run's data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from zhtune import tiny


def _cli(model: Path, out: Path, corpus: Path, *extra: str, launcher: tuple[str, ...] = ()) -> list[str]:
    return [*(launcher or (sys.executable,)), "-m", "zhtune", "train", "stage=pt", "streaming=true",
            f"model_name_or_path={model}", f"output_dir={out}", f"dataset=[{corpus}]", "cutoff_len=32",
            "max_steps=12", "save_steps=4", "learning_rate=3e-3", "lora_dropout=0", "seed=3", "logging_steps=1",
            "lr_scheduler_type=constant", "report_to=none", *extra]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


def _losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Eight short documents, ~400 tokens: 12 steps of 2 blocks of 32 go round the corpus twice."""
    path = tmp_path_factory.mktemp("stream") / "c.txt"
    path.write_text("\n".join(x[:15] for x in tiny.asset_lines("zh_corpus.txt")[:8]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def whole(tiny_model_dir, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream") / "whole"
    done = subprocess.run(_cli(tiny_model_dir, out, corpus, "per_device_train_batch_size=2"), env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "streaming" in done.stdout
    return out


def test_killed_streaming_run_resumes_to_the_same_adapter(whole, tiny_model_dir, corpus, tmp_path):
    killed = tmp_path / "killed"
    command = _cli(tiny_model_dir, killed, corpus, "per_device_train_batch_size=2")
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-8" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "pt_lora_model").exists()
    state = json.loads((killed / "checkpoint-8" / "trainer_state.json").read_text())
    position = state["stateful_callbacks"]["StreamPosition"]["attributes"]["position"]
    assert position["rows"] == 8 * 2 and position["epoch"] == 1        # 16 blocks: past the end of the corpus

    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout
    a = load_file(str(whole / "pt_lora_model" / "adapter_model.safetensors"))
    b = load_file(str(killed / "pt_lora_model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)   # bit-identical: the same data, in order
    assert _losses(killed)[-4:] == _losses(whole)[-4:]


@pytest.mark.slow  # three processes: ~40 s on an idle 2-core machine
def test_two_ddp_processes_share_the_stream(whole, tiny_model_dir, corpus, tmp_path):
    """Rank 0 reads the stream and every rank gets its own slice of each global batch: with the same global
    batch, two processes follow the one-process loss curve (any repeated or missing block would show)."""
    two = tmp_path / "two"
    done = subprocess.run(_cli(tiny_model_dir, two, corpus, "per_device_train_batch_size=1", "nproc_per_node=2"),
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(two) == pytest.approx(_losses(whole), rel=2e-3)
    state = json.loads((two / "trainer_state.json").read_text())
    assert state["log_history"][0]["num_input_tokens_seen"] == 2 * 32
