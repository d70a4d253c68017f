"""Shared argparse helpers so every subcommand's --help has the same shape: what, flags, examples."""

from __future__ import annotations

import argparse
import difflib
import sys
import textwrap
from pathlib import Path

from zhtune.errors import ZhtuneError


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep our hand-wrapped descriptions/epilogs and show defaults next to flags."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a misspelled flag is named first, with the closest real one: argparse alone would
    report `--vocab-sise 100` as "required: --vocab-size" and never mention what the user typed."""

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        known = list(self._option_string_actions)
        for word in getattr(self, "_argv", []):
            flag = str(word).split("=", 1)[0]
            if word == "--":
                break
            if flag.startswith("--") and not any(k.startswith(flag) for k in known):
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.7)
                message = f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else "") + \
                    ("" if message.startswith("unrecognized") else f"; {message}")
                break
        super().error(message)

    def _get_value(self, action, arg_string):
        """Our argparse types raise ZhtuneError (not ValueError, which argparse would reword): name the flag."""
        try:
            return super()._get_value(action, arg_string)
        except ZhtuneError as exc:
            exc.where = exc.where or "/".join(action.option_strings) or action.dest
            raise


def make_parser(prog: str, description: str, examples: str) -> argparse.ArgumentParser:
    """A parser for `zhtune <prog>`; `examples` is shown under the flags in --help."""
    return _Parser(
        prog=f"zhtune {prog}",
        description=textwrap.dedent(description).strip(),
        epilog="examples / 示例:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=_Formatter,
    )


def existing_path(value: str) -> Path:
    """argparse type: a path that must exist (a ZhtuneError names it otherwise)."""
    path = Path(value).expanduser()
    if not path.exists():
        raise ZhtuneError(f"path does not exist: {value}", expected="an existing file or folder")
    return path


def bounded_int(flag: str, low: int, high: int):
    """argparse type: an integer in [low, high]; anything else is a ZhtuneError naming `flag` (exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ZhtuneError(f"{flag} {text!r} is not an integer", where=flag,
                              expected=f"an integer in {low}..{high}") from None
        if not low <= value <= high:
            raise ZhtuneError(f"{flag} {value} is out of range", where=flag, expected=f"an integer in {low}..{high}")
        return value

    return parse


def bounded_float(flag: str, low: float, high: float = float("inf"), low_open: bool = False):
    """argparse type: a number in [low, high] ((low, high] with low_open); anything else names `flag`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        inside = (value > low if low_open else value >= low) and value <= high   # nan is never inside
        if not inside:
            bound = f"> {low:g}" if low_open else f">= {low:g}"
            raise ZhtuneError(f"{flag} {text!r} is out of range", where=flag,
                              expected=f"a number {bound}" + (f" and <= {high:g}" if high != float("inf") else ""))
        return value

    return parse


def output_file(flag: str):
    """argparse type: a file to write; an existing folder there is named now, not after the work."""
    def parse(text: str) -> Path:
        path = Path(text).expanduser()
        if path.is_dir():
            raise ZhtuneError(f"{flag} is a folder: {path}", where=flag, expected="a file path to write")
        return path

    return parse


def parse_size(value: str) -> int:
    """'2GB', '500MB', '1.5GiB' or a plain byte count -> bytes."""
    text = value.strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "B": 1}
    for unit, factor in units.items():  # noqa: B007 - factor is read after the break
        if text.endswith(unit):
            number = text[: -len(unit)]
            break
    else:
        number, factor = text, 1
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise ZhtuneError(f"not a size: {value!r}", expected="a size like 2GB, 500MB or 1.5GiB") from None
    if size <= 0:
        raise ZhtuneError(f"size must be positive: {value!r}", expected="a size like 2GB")
    return size


def zhtune_command(*words) -> str:
    """A `zhtune ...` line for a "next:" hint that the shell runs as printed (paths with spaces quoted)."""
    import shlex

    return shlex.join(["zhtune", *(str(w) for w in words)])
