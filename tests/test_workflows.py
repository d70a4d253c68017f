"""Every `zhtune ...` line in examples/workflows/*.sh and README.md names a real command, real flags,
real config keys and shipped recipe files (so the docs cannot drift from the code)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from zhtune import cli
from zhtune.config import TRAIN_ALIASES, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TRAIN_KEYS = {f for f in TrainConfig.__dataclass_fields__} | set(TRAIN_ALIASES)


def command_lines(text: str) -> list[str]:
    """`zhtune ...` commands (continuation lines joined, comments dropped)."""
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split(" #")[0].strip().lstrip("# ").strip()
        found = re.search(r"(?:^|&& )(zhtune (?:[a-z]+)(?: .*)?)$", line)
        if found:
            out.append(found.group(1).split(" && ")[0])
    return out


def help_text(name: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        cli.main([*name.split(), "--help"])
    return buf.getvalue()


def check(command: str) -> None:
    words = shlex.split(command.replace('"$', "$").replace('"', ""))[1:]
    name = " ".join(words[:2]) if " ".join(words[:2]) in cli.COMMANDS else words[0]
    assert name in cli.COMMANDS, f"unknown command in: {command}"
    usage = help_text(name)
    for word in words[len(name.split()):]:
        if word.startswith("--"):
            flag = word.split("=")[0]
            assert re.search(rf"{re.escape(flag)}\b", usage), f"{flag} is not a flag of zhtune {name}: {command}"
        elif name in ("train", "estimate") and "=" in word:
            assert word.split("=")[0] in TRAIN_KEYS, f"unknown train key in: {command}"
        elif word.endswith((".yaml", ".json")) and word.startswith("examples/"):
            assert (ROOT / word).is_file(), f"missing recipe {word}"


SOURCES = sorted((ROOT / "examples" / "workflows").glob("*.sh")) + [ROOT / "README.md"]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_documented_commands_exist(source):
    commands = command_lines(source.read_text(encoding="utf-8"))
    assert commands, f"no zhtune commands found in {source}"
    for command in commands:
        check(command)
