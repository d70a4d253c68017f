"""`zhtune chat` as a person uses it: piped stdin, a prompt file, and the interactive REPL driven through
tmux (typing Chinese, backspacing over it, /history, /clear, /system, Ctrl-C mid-answer and at the prompt)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from zhtune import tiny
from zhtune.infer.engine import GenParams

CHAT = [sys.executable, "-m", "zhtune", "chat"]
GREEDY = ["--temperature", "0", "--repetition-penalty", "1.0"]
ENV = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}


def run(args, stdin="", timeout=180):
    return subprocess.run(CHAT + args, input=stdin, capture_output=True, text=True, timeout=timeout, env=ENV)


def cli(args, capsys, monkeypatch, stdin=""):
    """Run `zhtune chat ARGS` in this process (the CLI entry point, exit code and all)."""
    import io

    from zhtune.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["chat", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_piped_stdin_answers_multi_turn(tiny_model_dir, engine, capsys, monkeypatch):
    code, out, err = cli(["--model", str(tiny_model_dir), "--max-new-tokens", "8", *GREEDY], capsys, monkeypatch,
                         stdin="你好\n\nhello\n")
    assert code == 0, err
    p = GenParams(max_new_tokens=8, temperature=0, repetition_penalty=1.0, top_p=0.9, top_k=40)
    first = "".join(d.text for d in engine.stream([{"role": "user", "content": "你好"}], p))
    second = "".join(d.text for d in engine.stream(
        [{"role": "user", "content": "你好"}, {"role": "assistant", "content": first},
         {"role": "user", "content": "hello"}], p))
    assert out == f"{first}\n{second}\n"


def test_piped_stdin_with_a_gguf(gguf_file, capsys, monkeypatch):
    code, out, err = cli(["--model", str(gguf_file), "--max-new-tokens", "6", "--threads", "1", *GREEDY],
                         capsys, monkeypatch, stdin="你好\nhello\n")
    assert code == 0, err
    assert out.count("\n") >= 2 and "Traceback" not in err


def test_piped_stdin_in_a_real_process(tiny_model_dir):
    out = run(["--model", str(tiny_model_dir), "--max-new-tokens", "4", "--single-turn"], stdin="你好\n")
    assert out.returncode == 0 and out.stdout.endswith("\n") and "Traceback" not in out.stderr


def test_prompt_file_and_bad_inputs(tmp_path, tiny_model_dir, capsys, monkeypatch):
    f = tmp_path / "chat.json"
    f.write_text(json.dumps([[{"role": "user", "content": "中国的首都是哪里？"}], "第二个问题"], ensure_ascii=False))
    code, out, err = cli(["--model", str(tiny_model_dir), "--prompt-file", str(f), "--max-new-tokens", "4"],
                         capsys, monkeypatch)
    assert code == 0, err
    assert "==== 2/2 ====" in out and "中国的首都是哪里？" in out and "第二个问题" in out
    f.write_text('{"not": "a list"}')
    bad = [(["--prompt-file", str(f)], "--prompt-file"), (["--top-p", "0"], "--top-p"),
           (["--max-new-tokens", "0"], "--max-new-tokens"), (["--template", "nope"], "--template")]
    for args, flag in bad:
        code, out, err = cli(["--model", str(tiny_model_dir), *args], capsys, monkeypatch)
        assert code == 2 and flag in err, (args, err)
    code, out, err = cli(["--model", str(tmp_path / "nope")], capsys, monkeypatch)
    assert code == 2 and "--model" in err


# --- interactive, through tmux ----------------------------------------------------------------

@pytest.fixture(scope="module")
def long_model(tmp_path_factory, base_tokenizer_dir):
    """The tiny model with a long context, so an answer runs long enough to interrupt."""
    return tiny.build_tiny_model(tmp_path_factory.mktemp("long") / "model", vocab_size=1000, seed=0,
                                 tokenizer_dir=base_tokenizer_dir, max_position=16384)


class Tmux:
    def __init__(self, command: list[str]):
        self.name = f"zhtune-chat-{uuid.uuid4().hex[:8]}"
        cmd = " ".join(f"'{c}'" for c in command) + "; echo EXITED $?; sleep 30"
        # a tmux server of its own (-L): concurrent test runs never share one server or its environment
        subprocess.run(["tmux", "-L", self.name, "-u", "new-session", "-d", "-s", self.name,
                        "-x", "160", "-y", "50", cmd], check=True, env=ENV)

    def keys(self, *keys: str, literal: bool = False) -> None:
        flags = ["-l"] if literal else []
        subprocess.run(["tmux", "-L", self.name, "send-keys", "-t", self.name, *flags, *keys], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "-L", self.name, "capture-pane", "-p", "-J", "-S", "-2000", "-t", self.name],
                              capture_output=True, text=True, check=True).stdout

    def wait(self, text: str, timeout: float = 120, count: int = 1) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            screen = self.screen()
            if screen.count(text) >= count:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} (x{count}) not on screen after {timeout}s:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.name, "kill-server"], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)")
def test_interactive_chinese_editing_commands_and_ctrl_c(long_model):
    t = Tmux([*CHAT, "--model", str(long_model), "--max-new-tokens", "12000", *GREEDY])
    try:
        t.wait(">>> ")
        # type Chinese, backspace over two wide characters, type more: the line must be 你好北京
        t.keys("你好世界", literal=True)
        t.keys("BSpace", "BSpace")
        t.keys("北京", literal=True)
        screen = t.wait(">>> 你好北京")
        assert "Traceback" not in screen
        t.keys("Enter")
        time.sleep(1.5)                       # the answer is streaming (12000 tokens: many seconds)
        t.keys("C-c")
        screen = t.wait("[已停止 stopped]", timeout=30)
        t.wait(">>> ", count=2)
        t.keys("/history", literal=True)
        t.keys("Enter")
        screen = t.wait("[user] 你好北京")
        assert "[assistant]" in screen and "Traceback" not in screen
        t.keys("/system 你是助手。", literal=True)
        t.keys("Enter")
        t.wait("系统提示 system prompt: 你是助手。")
        t.keys("/history", literal=True)
        t.keys("Enter")
        screen = t.wait("[system] 你是助手。")
        assert screen.count("[user] 你好北京") == 1       # /system cleared the conversation
        t.keys("/clear", literal=True)
        t.keys("Enter")
        t.wait("[已清空 cleared]")
        t.keys("C-c")                          # Ctrl-C at the prompt quits cleanly
        screen = t.wait("EXITED 0")
        assert "再见 bye" in screen and "Traceback" not in screen
    finally:
        t.close()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)")
def test_interactive_exit_and_ctrl_d(tiny_model_dir):
    t = Tmux([*CHAT, "--model", str(tiny_model_dir), "--max-new-tokens", "4"])
    try:
        t.wait(">>> ")
        t.keys("hello", "Enter")
        t.wait(">>> ", count=2)
        t.keys("C-d")
        screen = t.wait("EXITED 0")
        assert "Traceback" not in screen
    finally:
        t.close()
