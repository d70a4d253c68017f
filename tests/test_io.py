"""Atomic writes and output folders: nothing half-written survives a failure."""

from __future__ import annotations

import json

import pytest

from zhtune.errors import ZhtuneError
from zhtune.io import atomic_output_dir, atomic_write_text, load_state_dict, read_run_yaml, write_run_yaml


def test_atomic_dir_removed_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output_dir(out) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_existing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ZhtuneError) as exc, atomic_output_dir(out):
        pass
    assert "--overwrite" in exc.value.hint
    with pytest.raises(ZhtuneError) as exc:  # "keep" is not a zhtune output's file: never deleted
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new").write_text("y")
    assert "keep" in exc.value.what
    assert sorted(p.name for p in out.iterdir()) == ["keep"]


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


# --- hardening (issue 16): one writer per output, overwrite only zhtune's files, stale temporaries, reads ---

def _hold_lock(path):
    """A second process holding output_lock(path) until killed; returns it once the lock is held."""
    import subprocess
    import sys

    code = ("import sys, time\nfrom zhtune.io import output_lock\n"
            f"with output_lock({str(path)!r}):\n    print('held', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_output_lock_refuses_a_second_process_and_is_released_when_it_dies(tmp_path):
    import signal

    from zhtune.io import output_lock

    out = tmp_path / "sub" / "out"
    holder = _hold_lock(out)
    try:
        with pytest.raises(ZhtuneError) as exc:
            with output_lock(out):
                pass
        assert str(out) in exc.value.what and f"pid {holder.pid}" in exc.value.what
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the OS drops the flock
        holder.wait()
    with output_lock(out):  # free again
        assert (tmp_path / "sub" / ".out.lock").is_file()
    assert not (tmp_path / "sub" / ".out.lock").exists()  # removed on release


def test_output_lock_is_reentrant_and_leaves_no_folders_it_made(tmp_path):
    from zhtune.io import output_lock

    with output_lock(tmp_path / "a" / "b" / "out"):
        with output_lock(tmp_path / "a" / "b" / "out"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_the_same_output_are_removed_and_reported(tmp_path, capsys):
    from zhtune.io import atomic_output_dir

    (tmp_path / ".out.ab12cd34.tmp").mkdir()                 # a killed run's folder
    (tmp_path / ".out.ab12cd34.tmp" / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / ".out.old-4242").mkdir()
    (tmp_path / ".out.gguf.zz12cd34.tmp").write_bytes(b"x")  # another output's temporary: kept
    (tmp_path / ".notes.tmp").write_text("the user's")
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
    err = capsys.readouterr().err
    assert "removed a stale temporary" in err and ".out.ab12cd34.tmp" in err and ".out.old-4242" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", ".out.gguf.zz12cd34.tmp", "out"]


def test_overwrite_replaces_only_a_zhtune_output(tmp_path):
    from zhtune.io import MANIFEST, atomic_output_dir

    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_text("1")
    assert json.loads((out / MANIFEST).read_text())["files"] == ["sub/w.bin"]
    with atomic_output_dir(out, overwrite=True) as tmp:   # an earlier zhtune output: replaced
        (tmp / "v2.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "v2.txt"]
    (out / "my_notes.md").write_text("mine")               # the user adds a file: now refused, named
    with pytest.raises(ZhtuneError) as exc:
        with atomic_output_dir(out, overwrite=True):
            pass
    assert "my_notes.md" in exc.value.what and "v2.txt" not in exc.value.what
    assert (out / "my_notes.md").read_text() == "mine" and (out / "v2.txt").is_file()


def test_read_json_names_the_file_and_the_problem(tmp_path):
    from zhtune.io import read_json

    bad = tmp_path / "adapter_config.json"
    bad.write_text('{"r": 8,\n  "lora_alpha": }')
    with pytest.raises(ZhtuneError) as exc:
        read_json(bad)
    assert exc.value.where == f"{bad}:2:17" and "not valid JSON" in exc.value.what
    bad.write_text("[1, 2]")
    with pytest.raises(ZhtuneError) as exc:
        read_json(bad)
    assert "JSON list, not a JSON object" in exc.value.what


def test_truncated_safetensors_and_code_pickles_are_named(tmp_path):

    import torch
    from safetensors.torch import save_file

    from zhtune.io import UNSAFE_PICKLE, check_safetensors

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(64, 64)}, str(path))
    check_safetensors(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ZhtuneError) as exc:
        load_state_dict(path)
    assert "truncated" in exc.value.what

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "adapter_model.bin"
    torch.save({"w": Evil()}, str(bad))
    with pytest.raises(ZhtuneError) as exc:
        load_state_dict(bad)
    assert UNSAFE_PICKLE in exc.value.what


def test_outputs_get_the_usual_permissions(tmp_path):
    """mkdtemp/mkstemp make 0700/0600: a merged model must not become unreadable to the rest of a team."""
    import os

    mask = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            atomic_write_text(tmp / "config.json", "{}")
    finally:
        os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "config.json").stat().st_mode & 0o777 == 0o644


def test_an_output_under_a_file_is_named_not_a_traceback(tmp_path):
    from zhtune.io import output_lock

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ZhtuneError) as exc:
        with output_lock(tmp_path / "notes.txt" / "out"):
            pass
    assert "cannot write in" in exc.value.what and str(tmp_path / "notes.txt") in exc.value.what
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
