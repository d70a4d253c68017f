"""Atomic writes and output folders: nothing half-written survives a failure."""

from __future__ import annotations

import pytest

from zhtune.errors import ZhtuneError
from zhtune.io import atomic_output_dir, atomic_write_text, load_state_dict, read_run_yaml, write_run_yaml


def test_atomic_dir_removed_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_existing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ZhtuneError) as exc:
        with atomic_output_dir(out):
            pass
    assert "--overwrite" in exc.value.hint
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["new"]


def test_run_yaml_roundtrip(tmp_path):
    write_run_yaml(tmp_path, "sft", {"lr": 1e-4, "名": "中文"}, {"model": str(tmp_path)})
    data = read_run_yaml(tmp_path)
    assert data["stage"] == "sft" and data["config"]["名"] == "中文"
    assert data["parents"]["model"] == str(tmp_path.resolve())


def test_atomic_write_text(tmp_path):
    p = atomic_write_text(tmp_path / "a" / "b.txt", "你好")
    assert p.read_text(encoding="utf-8") == "你好"


def test_torch_load_is_weights_only(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad.bin"
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ZhtuneError):
        load_state_dict(bad)
