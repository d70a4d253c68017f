"""Issue 16's defects in chat / serve / webui: a truncated or pickled adapter and a bad config.json are named
before anything loads (no library traceback, not "does not fit the base"); a busy port is named before the
model loads; train's "next:" hint runs as printed."""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

from zhtune.cli import main
from zhtune.io import UNSAFE_PICKLE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_truncated_adapter_is_named(tmp_path, tiny_model_dir, lora_dir, capsys, command):
    if command == "serve":
        pytest.importorskip("uvicorn")
    bad = shutil.copytree(lora_dir, tmp_path / "cut")
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    extra = ["--single-turn"] if command == "chat" else ["--port", str(_free_port())]
    assert main([command, "--model", str(tiny_model_dir), "--lora", str(bad), *extra]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.safetensors is truncated" in err and "does not fit" not in err and "Traceback" not in err


def test_pickled_adapter_holding_code_is_refused_by_name(tmp_path, tiny_model_dir, lora_dir, capsys):
    import torch
    from safetensors.torch import load_file

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    bad = shutil.copytree(lora_dir, tmp_path / "pickled")
    state = load_file(str(bad / "adapter_model.safetensors"))
    (bad / "adapter_model.safetensors").unlink()
    torch.save({**state, "x": Payload()}, str(bad / "adapter_model.bin"))
    assert main(["chat", "--model", str(tiny_model_dir), "--lora", str(bad), "--single-turn"]) == 2
    captured = capsys.readouterr()
    assert UNSAFE_PICKLE in captured.err and "this ran" not in captured.out + captured.err


@pytest.mark.parametrize("text,said", [("{not json", "config.json is not valid JSON"),
                                        ("[]", "config.json holds a JSON list")])
def test_bad_config_json_is_not_blamed_on_the_tokenizer(tmp_path, tiny_model_dir, capsys, text, said):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "config.json").write_text(text)
    assert main(["chat", "--model", str(model), "--single-turn"]) == 2
    err = capsys.readouterr().err
    assert said in err and "tokenizer" not in err.split("\n")[0]
    from zhtune.config import TrainConfig, load_config
    from zhtune.errors import ZhtuneError
    from zhtune.train.common import prepare_tokenizer

    cfg = load_config(TrainConfig, None, [f"model_name_or_path={model}", f"output_dir={tmp_path / 'o'}"])
    with pytest.raises(ZhtuneError) as exc:  # training says the same, not "cannot load a tokenizer"
        prepare_tokenizer(cfg)
    assert said in exc.value.what


def test_broken_adapter_config_is_named(tmp_path, tiny_model_dir, lora_dir, capsys):
    bad = shutil.copytree(lora_dir, tmp_path / "badcfg")
    (bad / "adapter_config.json").write_text(json.dumps(["r", 4]))
    assert main(["chat", "--model", str(tiny_model_dir), "--lora", str(bad), "--single-turn"]) == 2
    assert "adapter_config.json holds a JSON list" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "webui"])
def test_busy_port_is_named_before_the_model_loads(tmp_path, command):
    pytest.importorskip("uvicorn" if command == "serve" else "gradio")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        # the model path does not exist: the port must be refused before the model is even looked at
        done = subprocess.run([sys.executable, "-m", "zhtune", command, "--model", str(tmp_path / "missing"),
                               "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"port {port} is in use" in done.stderr and "serving" not in done.stdout and "Traceback" not in done.stderr


def test_train_next_hint_runs_as_printed(tmp_path):
    from zhtune.infer.chat import build_parser
    from zhtune.train.callbacks import describe_outputs

    out = tmp_path / "我的 输出"
    folder = out / "sft_lora_model"
    text = describe_outputs(out, folder, {"train": {"train_loss": 1.0, "train_runtime": 1.0}})
    hint = next(line for line in text.splitlines() if line.startswith("下一步 next:"))
    chat, merge = (shlex.split(p) for p in hint.removeprefix("下一步 next:").split("   ·   "))
    assert chat[:2] == ["zhtune", "chat"] and build_parser().parse_args(chat[2:]).model == str(folder)
    assert merge[:4] == ["zhtune", "merge", "--lora", str(folder)]
