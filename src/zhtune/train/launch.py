"""Start `zhtune train` under torchrun for the user: `zhtune train CONFIG.yaml nproc_per_node=N`.

    zhtune train examples/llama7b_lora_8gpu_zero2.yaml nproc_per_node=8
    NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 zhtune train CONFIG.yaml nproc_per_node=8

run.py calls `launch_torchrun` when nproc_per_node is set and the process is not already one of a
launcher's workers; each worker runs the same `zhtune train` command. Several machines are described
by the environment variables LLaMA-Factory also uses: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
(run the same command on every machine, with its own NODE_RANK).
"""

from __future__ import annotations

import os
import subprocess
import sys

from zhtune.errors import ZhtuneError

LAUNCHER_VARS = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")   # set by torchrun / accelerate launch in every worker


def under_launcher(env: dict | None = None) -> bool:
    """True inside a worker started by torchrun, accelerate launch or deepspeed."""
    env = os.environ if env is None else env
    return any(v in env for v in LAUNCHER_VARS)


def _int_env(env: dict, name: str, default: int, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ZhtuneError(f"{name}={raw!r} is not a whole number", where=f"environment variable {name}",
                          expected=f"an integer >= {minimum}") from None
    if value < minimum:
        raise ZhtuneError(f"{name}={value} is too small", where=f"environment variable {name}",
                          expected=f"an integer >= {minimum}")
    return value


def torchrun_command(nproc_per_node: int, argv: list[str], env: dict | None = None) -> list[str]:
    """The torchrun command line that runs `zhtune train argv` on this machine's share of the job."""
    env = dict(os.environ if env is None else env)
    if nproc_per_node < 1:
        raise ZhtuneError(f"nproc_per_node={nproc_per_node}", where="nproc_per_node", expected="at least 1")
    nnodes = _int_env(env, "NNODES", 1, 1)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    if nnodes > 1:
        node_rank = _int_env(env, "NODE_RANK", 0, 0)
        if node_rank >= nnodes:
            raise ZhtuneError(f"NODE_RANK={node_rank} but NNODES={nnodes}", where="environment variable NODE_RANK",
                              expected=f"0 on the main machine, up to {nnodes - 1} on the others")
        master = env.get("MASTER_ADDR")
        if not master:
            raise ZhtuneError(f"NNODES={nnodes} needs the main machine's address",
                              where="environment variable MASTER_ADDR",
                              expected="MASTER_ADDR=<IP or host name of the NODE_RANK=0 machine>")
        port = _int_env(env, "MASTER_PORT", 29500, 1)
        command += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master}",
                    f"--master_port={port}"]
    elif env.get("MASTER_PORT"):
        command += [f"--master_port={_int_env(env, 'MASTER_PORT', 29500, 1)}"]
    else:
        command += ["--standalone"]          # one machine: rendezvous on a free local port
    return command + ["-m", "zhtune", "train", *argv]


def check_devices(nproc_per_node: int) -> None:
    """On a GPU machine, one process per visible GPU at most (CPU runs use gloo and may use several)."""
    import torch

    if torch.cuda.is_available() and nproc_per_node > torch.cuda.device_count():
        raise ZhtuneError(f"nproc_per_node={nproc_per_node} but only {torch.cuda.device_count()} GPU(s) are visible",
                          where="nproc_per_node", expected=f"at most {torch.cuda.device_count()}",
                          hint="check CUDA_VISIBLE_DEVICES")


def launch_torchrun(nproc_per_node: int, argv: list[str]) -> int:
    """Run `zhtune train argv` with torchrun; returns torchrun's exit code."""
    check_devices(nproc_per_node)
    command = torchrun_command(nproc_per_node, argv)
    print("启动 launching: " + " ".join(command), flush=True)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:             # torchrun forwards the signal to its workers and exits
        return 130
