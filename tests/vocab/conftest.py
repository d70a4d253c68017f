"""Vocabulary fixtures: a Chinese SentencePiece model trained by `vocab train`, and merges of it in each mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from zhtune import cli, tiny

ZH_VOCAB = 4000  # the 405-line corpus needs ~2400 pieces for its characters at coverage 0.9995

# Lines every equality check runs on besides the assets: spaces, code, digits, emoji, newlines, full width.
EDGE_LINES = [
    " lead space", "  two leading spaces", "trailing space ", "multiple   inner    spaces", " ",
    "def add(a, b):\n    return a + b  # sum", "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "1234567890 3.14159 2024-01-01 ０１２", "emoji 😀🎉👍 ok", "tab\tseparated\tvalues", "line one\nline two\n",
    "\n\nstarts with newlines", "全角ＡＢＣ１２３，。！", "中文 English 混合 mixed 123", "  前导空格的中文",
    "“引号”和‘单引号’…——《书名》", "𠀀𠀁 rare ideographs 龘", "한국어 日本語のテキスト Ελληνικά",
]

ENGLISH_AND_CODE = [
    "The quick brown fox jumps over the lazy dog.", "import numpy as np\nx = np.arange(10) ** 2",
    "SELECT id, name FROM users WHERE age > 30;", "Version 2.4.1 was released on 2023-07-15.",
    "  indented code block", "emoji 😀 and symbols ©®™ §", "https://example.com/path?q=1&r=2",
    "CamelCaseIdentifiersAndsnake_case_ones", "The price is $1,234.56 (approx.)",
]


def asset_lines(*names: str) -> list[str]:
    return [line for name in names for line in tiny.asset(name).read_text(encoding="utf-8").splitlines()]


def run_cli(*args) -> int:
    return cli.main([str(a) for a in args])


@pytest.fixture(scope="session")
def zh_sp_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zh_vocab") / "zh_vocab"
    assert run_cli("vocab", "train", "--corpus", tiny.asset("zh_corpus.txt"), "--vocab-size", ZH_VOCAB,
                   "--output", out, "--threads", 1) == 0
    return out


@pytest.fixture(scope="session")
def zh_sp_model(zh_sp_dir) -> Path:
    return zh_sp_dir / "zh_sp.model"


def _merge(tmp_path_factory, base, *args) -> Path:
    out = tmp_path_factory.mktemp("merge") / "merged"
    assert run_cli("vocab", "merge", "--base", base, "--output", out, *args) == 0
    return out


@pytest.fixture(scope="session")
def merged_preserve(tmp_path_factory, base_tokenizer_dir, zh_sp_model) -> Path:
    return _merge(tmp_path_factory, base_tokenizer_dir, "--add", zh_sp_model)


@pytest.fixture(scope="session")
def merged_all(tmp_path_factory, base_tokenizer_dir, zh_sp_model) -> Path:
    return _merge(tmp_path_factory, base_tokenizer_dir, "--add", zh_sp_model, "--mode", "all-pieces")


@pytest.fixture(scope="session")
def merged_chars(tmp_path_factory, base_tokenizer_dir) -> Path:
    return _merge(tmp_path_factory, base_tokenizer_dir, "--mode", "chars", "--chars", "4E00-9FFF")


@pytest.fixture(scope="session")
def edge_lines() -> list[str]:
    return list(EDGE_LINES)


@pytest.fixture(scope="session")
def english_and_code() -> list[str]:
    """Non-Chinese text: the English asset plus code, digits, emoji, URLs."""
    return asset_lines("en_corpus.txt") + ENGLISH_AND_CODE


@pytest.fixture(scope="session")
def all_asset_lines() -> list[str]:
    """Every line of the text assets (Chinese corpus, held-out, English), empty ones included."""
    return asset_lines("zh_corpus.txt", "zh_heldout.txt", "en_corpus.txt")


@pytest.fixture()
def cli_run():
    """cli_run(*args) -> exit code of `zhtune ...` run in this process."""
    return run_cli
