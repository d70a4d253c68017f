"""House rules for vocab/ and tiny.py: no import circle, no arrow up to tiny.py, `--help` prints help."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import zhtune

SRC = Path(zhtune.__file__).parent


def _imports(module: Path) -> set[str]:
    """Every zhtune module a file imports (at the top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zhtune"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("zhtune")}
    return found


def test_vocab_modules_form_no_circle_and_never_import_tiny():
    graph = {f"zhtune.vocab.{p.stem}": _imports(p) for p in (SRC / "vocab").glob("*.py")}
    for name, deps in graph.items():
        assert "zhtune.tiny" not in deps, f"{name} imports zhtune.tiny (an arrow running up)"
        for dep in deps & graph.keys():
            assert name not in graph[dep], f"import circle: {name} <-> {dep}"
    assert "zhtune.vocab.merge" not in graph["zhtune.vocab.stats"]


def test_cjk_helpers_live_in_their_own_module():
    from zhtune.io import asset
    from zhtune.vocab import cjk

    assert cjk.han_count("中文，ok ㄅ") == 2 and cjk.has_cjk("，") and not cjk.has_cjk("plain ascii")
    assert asset("zh_corpus.txt").is_file()


def test_tiny_help_prints_help_and_builds_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "zhtune.tiny", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "usage: python -m zhtune.tiny" in out.stdout
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("x")
    out = subprocess.run([sys.executable, "-m", "zhtune.tiny", "taken"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "taken" in out.stderr
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]
