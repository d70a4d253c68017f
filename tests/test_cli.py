"""The `zhtune` command: help, version, every subcommand's --help, unknown commands, error exits."""

from __future__ import annotations

import subprocess
import sys

import pytest

from zhtune import __version__, cli


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zhtune", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for name in cli.COMMANDS:
        assert name in out.stdout
    assert "zhtune demo" in out.stdout


def test_version():
    out = run("--version")
    assert out.returncode == 0 and __version__ in out.stdout


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*name.split(), "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert f"zhtune {name}" in text
    assert "examples" in text, "each --help ends with runnable examples"


def test_unknown_command_suggests():
    out = run("vocab", "trian")
    assert out.returncode == 2
    assert "vocab train" in out.stderr


def test_console_script_installed():
    import shutil

    exe = shutil.which("zhtune")
    if exe is None:
        pytest.skip("console script not on PATH (package not pip-installed)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and __version__ in out.stdout
