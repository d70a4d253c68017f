"""The `zhtune serve` command: --help, a real server process, flag errors, the vLLM launch line,
and (on a CUDA machine with vLLM) the vllm backend behind the same API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from zhtune.cli import main as cli_main
from zhtune.data.templates import get_template
from zhtune.errors import ZhtuneError
from zhtune.serve.api import main as serve_main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_shows_flags_and_examples(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["serve", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--lora", "--backend", "--host", "--port", "--api-key", "--served-model-name",
                 "--max-concurrency", "--max-model-len", "--max-body-bytes", "--print-vllm-command", "--threads",
                 "--threads-batch", "examples"):
        assert flag in out


@pytest.mark.parametrize("argv,where", [
    (["--max-concurrency", "0"], "--max-concurrency"),
    (["--port", "70000"], "--port"),
    (["--threads", "0"], "--threads"),
    (["--threads-batch", "-1"], "--threads-batch"),
    (["--backend", "hf", "--template", "nope"], "--template"),
])
def test_bad_flags_are_zhtune_errors(tiny_model_dir, argv, where):
    with pytest.raises(ZhtuneError) as err:
        serve_main(["--model", str(tiny_model_dir), *argv])
    assert err.value.where == where


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ZhtuneError) as err:
        serve_main(["--model", str(tmp_path / "nothing")])
    assert err.value.where == "--model"


def test_vllm_backend_without_gpu_is_a_clear_error(tiny_model_dir):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the gpu test below covers vllm")
    with pytest.raises(ZhtuneError) as err:
        serve_main(["--model", str(tiny_model_dir), "--backend", "vllm"])
    assert "vllm" in err.value.where and ("GPU" in err.value.what or "vLLM" in err.value.what)


def test_print_vllm_command_writes_our_template(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert serve_main(["--model", str(tiny_model_dir), "--port", "8123", "--max-model-len", "256",
                       "--print-vllm-command"]) == 0
    out = capsys.readouterr().out
    command = out.strip().splitlines()[-1]
    assert command.startswith("python -m vllm.entrypoints.openai.api_server --model ")
    assert "--port 8123" in command and "--max-model-len 256" in command
    written = tmp_path / "zhtune-default.chat_template.jinja"
    assert f"--chat-template {written}" in command
    # the file is the registry's template, so vLLM builds prompts exactly as training did
    assert written.read_text(encoding="utf-8") == get_template("default").jinja()


def _start_server(args: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "zhtune", "serve", *args, "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def test_serve_process_end_to_end(tiny_model_dir):
    env = {**os.environ, "ZHTUNE_API_KEY": "sk-env", "HF_HUB_OFFLINE": "1"}
    proc, url = _start_server(["--model", str(tiny_model_dir), "--served-model-name", "tiny-zh",
                               "--max-concurrency", "2"], env)
    try:
        body = {"model": "tiny-zh", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 3}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 401
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-env"},
                       timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "tiny-zh"
        health = httpx.get(f"{url}/health").json()
        assert health["max_concurrency"] == 2 and health["backend"] == "hf"
    finally:
        out = _stop(proc)
    assert proc.returncode in (0, -signal.SIGINT, 130), out
    assert "127.0.0.1" in out   # the banner says where it listens (loopback by default)


@pytest.mark.gpu
def test_vllm_backend_behind_the_same_api(tiny_model_dir):
    pytest.importorskip("vllm")
    openai = pytest.importorskip("openai")
    proc, url = _start_server(["--model", str(tiny_model_dir), "--backend", "vllm", "--served-model-name", "tiny",
                               "--max-model-len", "256"], dict(os.environ))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "hello"}]
        whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices)
        assert streamed == whole.choices[0].message.content
        assert whole.usage.completion_tokens >= 1
    finally:
        _stop(proc)
