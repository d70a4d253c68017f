"""Safe file I/O: atomic writes (temp + rename), output-folder checks, run.yaml, safe weight loading."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import sys
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
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: the file gets the mode open() would give it
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


# --- output folders and files: one writer at a time, overwrite only what zhtune wrote ------------------
MANIFEST = ".zhtune-output.json"   # written into every folder atomic_output_dir produces: the files it holds
_HELD: dict[Path, list] = {}         # locks this process holds: lock file -> [fd, depth]


def _lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


def _read_holder(lock: Path) -> str:
    with contextlib.suppress(OSError):
        return lock.read_text(encoding="utf-8").strip().replace("\n", ", ")
    return "unknown"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, where: str = "--output", log: Any = None) -> Iterator[Path]:
    """Hold an exclusive lock on the output `path` (a folder or a file) for the whole block.

    A second zhtune writing the same output at the same time is refused by name. The lock is flock(2) on
    `.NAME.lock` beside the output (the output may not exist yet, and atomic outputs are replaced by a
    rename): the OS drops it when the process dies, however it dies. Once it is held, temporaries that an
    interrupted run of the same output left behind are removed (and said so). Re-entrant in one process.
    """
    import fcntl

    output = Path(path).expanduser().absolute()
    lock = _lock_path(output)
    if lock in _HELD:
        _HELD[lock][1] += 1
        try:
            yield output
        finally:
            _HELD[lock][1] -= 1
        return
    created = [d for d in (output.parent, *output.parent.parents) if not d.exists()]
    while True:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only folder, a file where a folder should be, ...
            _remove_empty(created)
            raise ZhtuneError(f"cannot write in {output.parent}: {exc.strerror or exc}", where=where,
                              expected="an output path in a folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            _remove_empty(created)
            raise ZhtuneError(f"{output} is being written by another zhtune run ({_read_holder(lock)})",
                              where=where, expected="one run per output at a time",
                              hint="wait for that run to finish, or choose another output path") from None
        try:  # the holder before us may have unlinked the file we opened: lock the one on disk
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}, started {datetime.now().isoformat(timespec='seconds')}: "
                 f"{' '.join(['zhtune', *sys.argv[1:]])}\n".encode())
    _HELD[lock] = [fd, 1]
    try:
        clean_stale_temporaries(output, log)
        yield output
    finally:
        del _HELD[lock]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:  # deepest first: only what this run created, only if still empty
        with contextlib.suppress(OSError):
            d.rmdir()


def clean_stale_temporaries(output: str | os.PathLike, log: Any = None) -> list[Path]:
    """Remove `.NAME.*.tmp` / `.NAME.old-*` beside `output`: what a run of the same output left when it was
    killed (kill -9, power loss). Call it only while holding output_lock(output)."""
    output = Path(output)
    say = log or (lambda msg: print(msg, file=sys.stderr))
    # tempfile's names: .NAME. + 8 random characters (+ .f32 for gguf's intermediate) + .tmp; exact, so the
    # temporaries of another output whose name starts the same (model vs model.gguf) are never touched
    pattern = re.compile(rf"\.{re.escape(output.name)}\.([a-z0-9_]{{8}}(\.[a-z0-9]+)?\.tmp|old-\d+)")
    stale = sorted(p for p in output.parent.glob(".*") if pattern.fullmatch(p.name))
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        say(f"已清理 removed a stale temporary left by an interrupted run: {p}")
    return stale


def _files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def write_manifest(folder: str | os.PathLike) -> Path:
    """List every file of a finished output folder in its MANIFEST: what a later --overwrite may replace."""
    from zhtune import __version__

    folder = Path(folder)
    files = [f for f in _files_under(folder) if f != MANIFEST]
    return atomic_write_json(folder / MANIFEST, {"written_by": f"zhtune {__version__}", "files": files})


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """Files in `folder` that no zhtune output wrote (not listed in its MANIFEST): all of them without one."""
    folder = Path(folder)
    listed: set[str] = set()
    with contextlib.suppress(OSError, ValueError, TypeError):
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        listed = {str(f) for f in data.get("files", [])} | {MANIFEST}
    return [f for f in _files_under(folder) if f not in listed]


def check_output_dir(path: str | os.PathLike, overwrite: bool = False, *, flag: str = "--overwrite",
                     where: str = "--output") -> Path:
    """Refuse an output folder that exists and is not empty, unless overwriting was asked for; even then,
    refuse one holding files an earlier zhtune output did not write (naming them): those are the user's."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ZhtuneError(f"output path is a file, not a folder: {path}", where=where, expected="a new folder path")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise ZhtuneError(f"output folder already exists and is not empty: {path}", where=where,
                              expected="a new folder", hint=f"choose another path or pass {flag}")
        foreign = foreign_files(path)
        if foreign:
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            raise ZhtuneError(f"{flag} would delete files that no zhtune output wrote in {path}: "
                              f"{', '.join(foreign[:5])}{more}", where=where,
                              expected=f"a new folder, or one an earlier zhtune run wrote (listed in its {MANIFEST})",
                              hint="move those files away or choose another output path"
                              + ("" if (path / MANIFEST).is_file() else f" (this folder has no {MANIFEST}: "
                                 "an output of an older zhtune, or not an output at all; delete it yourself)"))
    return path


def check_output_file(path: Path, overwrite: bool, magic: bytes, what: str, where: str = "--output") -> None:
    """Before the work: a new file path, or (with --overwrite) a file of the kind zhtune writes there (it
    starts with `magic`); a folder, or anything else in the way, is the user's and is never replaced."""
    if path.is_dir():  # a rename onto a folder would fail only at the very end
        raise ZhtuneError(f"output path is a folder: {path}", where=where, expected=f"a {what} file path")
    if path.exists() and not overwrite:
        raise ZhtuneError(f"output file exists: {path}", where=where, expected="a new file path",
                          hint="choose another path or pass --overwrite")
    if path.exists():
        with open(path, "rb") as fh:
            if fh.read(len(magic)) != magic:
                raise ZhtuneError(f"--overwrite would replace {path}, which is not a {what} zhtune wrote", where=where,
                                  expected=f"a new path, or a {what} an earlier zhtune run wrote",
                                  hint="move that file away or choose another output path")


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False, flag: str = "--overwrite",
                      owned: bool = False, log: Any = None) -> Iterator[Path]:
    """Build a folder under a temp name beside `path` and rename it into place only on success.

    Holds output_lock(path) throughout. On any exception (Ctrl-C and SIGTERM included) the temp folder is
    removed, so a failed run leaves nothing half-written; a killed one's is removed by the next run.
    `owned`: the caller has already checked that everything in `path` is its own (train's adapter folder).
    """
    with output_lock(path, log=log) as final:
        if not owned:
            check_output_dir(final, overwrite, flag=flag)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700: others on a shared machine could not read the model
        try:
            yield tmp
            write_manifest(tmp)
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
    except UnicodeDecodeError:
        raise ZhtuneError(f"{path} is not UTF-8 text", where=str(path), expected="a run.yaml zhtune wrote") from None
    except yaml.YAMLError as exc:
        raise ZhtuneError(f"cannot parse {path}: {exc}", where=str(path), expected="valid YAML") from None
    return data if isinstance(data, dict) else {}


def looks_like_local_path(value: str) -> bool:
    """A path, not a Hub id: absolute, ~, ./ or ../, a backslash, or a first part that is a local folder."""
    value = str(value)
    if value.startswith(("/", "~", "./", "../", ".\\")) or "\\" in value or value in (".", ".."):
        return True
    head = value.split("/", 1)[0]
    return "/" in value and Path(head).expanduser().is_dir()


def read_json(path: str | os.PathLike, what: str | None = None, where: str | None = None,
              kind: type = dict) -> Any:
    """A JSON file that must hold a `kind` (an object by default): unreadable, malformed or another type is
    a ZhtuneError naming the file (and the line of a syntax error), never a traceback."""
    path = Path(path)
    what = what or path.name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ZhtuneError(f"{what} not found: {path}", where=where or str(path), expected=f"a {what} file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ZhtuneError(f"cannot read {what} {path}: {exc}", where=where or str(path),
                          expected="a readable UTF-8 JSON file") from None
    except json.JSONDecodeError as exc:
        raise ZhtuneError(f"{what} is not valid JSON: {exc.msg}", where=f"{path}:{exc.lineno}:{exc.colno}",
                          expected=f"a {what} in JSON") from None
    if not isinstance(data, kind):
        raise ZhtuneError(f"{what} holds a JSON {type(data).__name__}, not a JSON "
                          f"{'object' if kind is dict else kind.__name__}", where=where or str(path),
                          expected=f"a {what} ({'{...}' if kind is dict else kind.__name__})")
    return data


def check_safetensors(path: str | os.PathLike, where: str | None = None) -> dict[str, Any]:
    """The header of a .safetensors file, after checking the file holds every byte the header promises
    (a copy cut short is named here, not by a SafetensorError from deep inside a library)."""
    import struct

    path = Path(path)
    where = where or str(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ZhtuneError(f"{path.name} is not a complete safetensors file ({size} bytes)", where=where,
                              expected="a safetensors file written to the end", hint="copy or download it again")
        try:
            header = json.loads(fh.read(n))
            end = max((int(e["data_offsets"][1]) for k, e in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ZhtuneError(f"{path.name} has a corrupt safetensors header", where=where,
                              expected="a safetensors file", hint="copy or download it again") from None
    if 8 + n + end > size:
        raise ZhtuneError(f"{path.name} is truncated: {size} bytes, its header needs {8 + n + end}", where=where,
                          expected="a safetensors file written to the end", hint="copy or download it again")
    return header


def check_torch_file(path: str | os.PathLike, where: str | None = None) -> None:
    """A torch.save file (zip format) whose end is intact: a truncated one has lost its zip directory."""
    import zipfile

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ZhtuneError(f"{path.name} is truncated or corrupt ({path.stat().st_size} bytes: {exc})",
                          where=where or str(path), expected="a complete torch.save file") from None


UNSAFE_PICKLE = "refused: unsafe pickle (it needs code to load), use safetensors"


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Tensors from .safetensors, or from a torch pickle with weights_only=True (never arbitrary code)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ZhtuneError(f"weights file not found: {path}", expected="a .safetensors, .bin or .pth file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        check_safetensors(path)
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - SafetensorError and friends: a damaged file
            raise ZhtuneError(f"cannot read {path}: {exc}", where=str(path),
                              expected="a valid safetensors file") from None
    try:
        try:  # mmap keeps peak memory low; old (non-zip) checkpoints cannot be mmapped
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only: a pickle that needs code is refused, never run
        raise ZhtuneError(f"{UNSAFE_PICKLE}: {path}", where=str(path),
                          expected="tensors only: .safetensors (or a weights_only torch.save)",
                          hint="convert it to safetensors where you trust its origin") from None
    except Exception as exc:  # noqa: BLE001 - anything else torch.load raises on a damaged file
        raise ZhtuneError(f"cannot load {path} safely: {exc}", where=str(path),
                          expected="a tensor-only checkpoint (safetensors or weights_only torch.save)") from None
