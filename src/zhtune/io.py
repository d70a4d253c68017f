"""Safe file I/O: atomic writes (temp + rename), output-folder checks, run.yaml, safe weight loading."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import yaml

from zhtune.errors import ZhtuneError

RUN_FILE = "run.yaml"
ASSETS = Path(__file__).parent / "assets"


def asset(name: str) -> Path:
    """Path of a text asset shipped with the package (see zhtune/assets/README.md)."""
    return ASSETS / name


def asset_lines(name: str) -> list[str]:
    """The non-empty lines of a shipped text asset."""
    return [line for line in asset(name).read_text(encoding="utf-8").splitlines() if line.strip()]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temp file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def check_output_dir(path: str | os.PathLike, overwrite: bool = False, *, flag: str = "--overwrite") -> Path:
    """Refuse an output folder that exists and is not empty, unless overwriting was asked for."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ZhtuneError(f"output path is a file, not a folder: {path}", expected="a new folder path")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ZhtuneError(f"output folder already exists and is not empty: {path}",
                          expected="a new folder", hint=f"choose another path or pass {flag}")
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False,
                      flag: str = "--overwrite") -> Iterator[Path]:
    """Build a folder under a temp name beside `path` and rename it into place only on success.

    On any exception the temp folder is removed, so a failed run leaves nothing half-written.
    """
    final = check_output_dir(path, overwrite, flag=flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_run_yaml(folder: str | os.PathLike, stage: str, config: dict[str, Any],
                   parents: dict[str, str] | None = None) -> Path:
    """run.yaml beside a stage's outputs: what ran, with which resolved config, from which folders."""
    from zhtune import __version__

    record = {
        "stage": stage,
        "zhtune_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parents": {k: str(Path(v).resolve()) for k, v in (parents or {}).items() if v},
        "config": config,
    }
    text = yaml.safe_dump(record, allow_unicode=True, sort_keys=False)
    return atomic_write_text(Path(folder) / RUN_FILE, text)


def read_run_yaml(folder: str | os.PathLike) -> dict[str, Any]:
    """The run.yaml a stage wrote in `folder` (or an empty dict if there is none)."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ZhtuneError(f"cannot parse {path}: {exc}", where=str(path), expected="valid YAML") from None
    return data if isinstance(data, dict) else {}


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Tensors from .safetensors, or from a torch pickle with weights_only=True (never arbitrary code)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ZhtuneError(f"weights file not found: {path}", expected="a .safetensors, .bin or .pth file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        try:  # mmap keeps peak memory low; old (non-zip) checkpoints cannot be mmapped
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickles that need code are refused rather than executed
        raise ZhtuneError(f"cannot load {path} safely: {exc}", where=str(path),
                          expected="a tensor-only checkpoint (safetensors or weights_only torch.save)") from None
