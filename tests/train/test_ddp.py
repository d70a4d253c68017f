"""More than one process: `zhtune train ... nproc_per_node=N` launches torchrun (several machines via
NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT), and DDP on CPU (gloo) with 2 processes follows the same
loss curve as 1 process with the same global batch. DeepSpeed / FSDP runs need GPUs (marked gpu)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zhtune import tiny
from zhtune.errors import ZhtuneError
from zhtune.train.launch import torchrun_command, under_launcher

ROOT = Path(__file__).resolve().parents[2]
ZH = str(tiny.asset("zh_corpus.txt"))


def test_one_machine_uses_a_standalone_rendezvous():
    cmd = torchrun_command(2, ["cfg.yaml", "nproc_per_node=2"], env={})
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert "--standalone" in cmd and cmd[-4:] == ["zhtune", "train", "cfg.yaml", "nproc_per_node=2"]
    assert "--master_port=29600" in torchrun_command(2, [], env={"MASTER_PORT": "29600"})


def test_several_machines_come_from_the_environment():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501"}
    cmd = torchrun_command(8, ["cfg.yaml"], env=env)
    assert cmd[4:8] == ["--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29501"]
    with pytest.raises(ZhtuneError, match="MASTER_ADDR") as err:
        torchrun_command(8, [], env={"NNODES": "2"})
    assert "MASTER_ADDR" in err.value.where
    with pytest.raises(ZhtuneError, match="NODE_RANK=2 but NNODES=2"):
        torchrun_command(8, [], env={**env, "NODE_RANK": "2"})
    with pytest.raises(ZhtuneError, match="not a whole number"):
        torchrun_command(8, [], env={"NNODES": "two"})
    with pytest.raises(ZhtuneError, match="nproc_per_node=0"):
        torchrun_command(0, [], env={})


def test_workers_are_not_relaunched():
    assert under_launcher({"LOCAL_RANK": "0"}) and not under_launcher({})


def _losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def _train(model: Path, out: Path, *extra: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [*(launcher or (sys.executable,)), "-m", "zhtune", "train", f"model_name_or_path={model}", "stage=pt",
           f"dataset=[{ZH}]", f"output_dir={out}", "cutoff_len=64", "max_steps=4", "learning_rate=3e-3",
           "logging_steps=1", "save_steps=1000", "lora_dropout=0", "seed=0", "lr_scheduler_type=constant", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "one"
    done = _train(tiny_model_dir, out, "per_device_train_batch_size=4")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_two_cpu_processes_follow_the_one_process_loss_curve(tiny_model_dir, one_process, tmp_path):
    two = _train(tiny_model_dir, tmp_path / "two", "per_device_train_batch_size=2", "nproc_per_node=2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "torch.distributed.run" in two.stdout          # zhtune started torchrun itself
    a, b = _losses(one_process), _losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, rel=2e-3), (a, b)          # same global batch of 4 blocks, gloo all-reduce
    assert a[-1] < a[0]
    state = json.loads((tmp_path / "two" / "trainer_state.json").read_text())
    assert state["log_history"][0]["num_input_tokens_seen"] == 4 * 64      # both ranks' tokens counted
    assert (tmp_path / "two" / "pt_lora_model" / "adapter_model.safetensors").is_file()


def test_runs_unchanged_under_accelerate_launch(tiny_model_dir, one_process, tmp_path):
    """accelerate launch starts the same program; on CPU it runs one process (multi-process CPU
    needs MPI there), which must train exactly like a plain run."""
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    done = _train(tiny_model_dir, tmp_path / "acc", "per_device_train_batch_size=4", launcher=launcher)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(tmp_path / "acc") == pytest.approx(_losses(one_process), rel=1e-5)


# --- GPU only: the engines that do not run on CPU ---------------------------------------------------

def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["deepspeed=examples/deepspeed/ds_zero2.json",
                                    "deepspeed=examples/deepspeed/ds_zero3.json",
                                    "deepspeed=examples/deepspeed/ds_zero3_offload.json",
                                    "fsdp=full_shard auto_wrap"])
def test_multi_gpu_engines_train_and_save(tiny_model_dir, tmp_path, config):
    pytest.importorskip("deepspeed") if config.startswith("deepspeed") else None
    n = _gpu_count()
    extra = [config] + (["fsdp_config=examples/fsdp/fsdp_config.json"] if config.startswith("fsdp") else [])
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    cmd = [sys.executable, "-m", "zhtune", "train", f"model_name_or_path={tiny_model_dir}", "stage=pt",
           f"dataset=[{ZH}]", f"output_dir={tmp_path / 'out'}", "cutoff_len=64", "max_steps=3", "logging_steps=1",
           "per_device_train_batch_size=2", "bf16=true", f"nproc_per_node={max(n, 1)}", *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "out" / "pt_lora_model" / "adapter_model.safetensors").is_file()
    assert len(_losses(tmp_path / "out")) == 3
