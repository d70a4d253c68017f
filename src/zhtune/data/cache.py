"""The on-disk data cache: where it lives, what names an entry, building an entry once (one process builds,
the others wait for it), and loading what was built memory-mapped.

    root = cache_root(cfg.data_cache)           # data_cache, else $ZHTUNE_DATA_CACHE, else ~/.cache/zhtune/data
    status = build_once(root / name, build)     # build(tmp_folder) runs in exactly one process per cache folder
    train = load_split(root / name / "train")   # datasets.Dataset over the arrow files, memory-mapped

Entries are folders renamed into place when complete, so nothing half-written is ever read. The builder
holds `<name>.lock` (a folder: mkdir is atomic, also on NFS) and touches a heartbeat in it; a lock whose
owner died (same machine, process gone) or whose heartbeat stopped is broken by the next run. Under a
launcher only LOCAL_RANK 0 of each machine may build; on shared storage the first one to take the lock
builds and every other process, on every machine, waits and loads the same folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import threading
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from zhtune.errors import ZhtuneError

DATA_VERSION = 2                     # bump when tokenisation/packing changes, so old caches are not reused
HEARTBEAT_S = 20                     # the builder touches its lock this often
STALE_S = 300                        # a lock not touched for this long belongs to a dead builder
TAKEOVER_S = 120                     # a rank that may not build waits this long for one that may to break a dead lock
HOST = socket.gethostname()


def cache_root(value: str | None) -> Path:
    """data_cache, else $ZHTUNE_DATA_CACHE, else $XDG_CACHE_HOME/zhtune/data (~/.cache/zhtune/data)."""
    if value:
        return Path(value).expanduser()
    if os.environ.get("ZHTUNE_DATA_CACHE"):
        return Path(os.environ["ZHTUNE_DATA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zhtune" / "data"


def cache_key(parts: dict) -> str:
    """A short stable hash of everything that decides the content of an entry."""
    def plain(o: Any) -> Any:
        return asdict(o) if is_dataclass(o) else str(o)

    blob = json.dumps({"version": DATA_VERSION, **parts}, sort_keys=True, default=plain)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def may_build() -> bool:
    """Under torchrun / accelerate only LOCAL_RANK 0 of each machine builds; the others wait for it."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


# --- temporary folders ------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tmp_name(name: str) -> str:
    return f".{name}.tmp-{HOST}-{os.getpid()}-{time.monotonic_ns() % 10**9}"


def clean_stale_tmps(parent: Path) -> int:
    """Remove temp folders of processes on this machine that are gone (a killed build); how many."""
    removed = 0
    if not parent.is_dir():
        return 0
    for entry in os.scandir(parent):
        if not (entry.name.startswith(".") and ".tmp-" in entry.name):
            continue
        host, _, rest = entry.name.rsplit(".tmp-", 1)[1].rpartition("-")[0].rpartition("-")
        if host == HOST and rest.isdigit() and not _alive(int(rest)):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """A temp folder beside `final`, renamed to it when the block ends without error (else removed).
    If another process renamed its own copy into place first, ours is dropped: both are the same."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / tmp_name(final.name)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- one builder, the others wait -----------------------------------------------------------------

class BuildLock:
    """`<entry>.lock/`: owner.json (host, pid) and a heartbeat file touched every HEARTBEAT_S seconds."""

    def __init__(self, final: Path):
        self.path = final.with_name(final.name + ".lock")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        try:
            self.path.mkdir()
        except FileExistsError:
            return False
        (self.path / "owner.json").write_text(json.dumps({"host": HOST, "pid": os.getpid()}), encoding="utf-8")
        (self.path / "heartbeat").touch()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path / "heartbeat")

    def release(self) -> None:
        self._stop.set()
        shutil.rmtree(self.path, ignore_errors=True)

    def stale(self) -> bool:
        """True when the owner is gone: a dead process on this machine, or no heartbeat for STALE_S."""
        try:
            owner = json.loads((self.path / "owner.json").read_text(encoding="utf-8"))
            beat = (self.path / "heartbeat").stat().st_mtime
        except (OSError, ValueError):        # being created right now, or already released
            return self.path.is_dir() and time.time() - self.path.stat().st_mtime > STALE_S
        if owner.get("host") == HOST and not _alive(int(owner.get("pid", 0))):
            return True
        return time.time() - beat > STALE_S

    def break_stale(self) -> None:
        trash = self.path.with_name(tmp_name(self.path.name))
        with contextlib.suppress(OSError):
            os.rename(self.path, trash)
            shutil.rmtree(trash, ignore_errors=True)


def build_once(final: Path, build: Callable[[Path], None], say: Callable[[str], None] = print) -> str:
    """Make sure `final` holds a finished entry: "hit" (it did), "built" (this process built it) or
    "waited" (another process built it while this one waited). `build(tmp)` fills a temp folder.
    If the builder fails, its lock goes and a waiting process that may build tries itself (and meets
    the same error); under a launcher the failed rank stops the others.
    """
    if (final / "stats.json").is_file():
        return "hit"
    final.parent.mkdir(parents=True, exist_ok=True)
    lock, said, stale_since = BuildLock(final), False, None
    while True:
        if may_build() and lock.acquire():
            try:
                return _build_locked(final, build)
            finally:
                lock.release()
        if (final / "stats.json").is_file():
            return "waited"
        if lock.stale():
            # a rerun after a kill finds the dead run's lock: LOCAL_RANK 0 (maybe still importing) breaks it
            stale_since = stale_since or time.monotonic()
            if not may_build() and time.monotonic() - stale_since < TAKEOVER_S:
                time.sleep(1.0)
                continue
            if not may_build():
                raise ZhtuneError(f"the process preparing the data cache {final} stopped", where="data_cache",
                                  hint="see the first process's output (LOCAL_RANK 0) for its error")
            say(f"清理 removing the lock of a stopped build: {lock.path}")
            lock.break_stale()
            continue
        stale_since = None
        if not said:
            say(f"等待 waiting for another process to prepare the data: {final}")
            said = True
        time.sleep(1.0)


def _build_locked(final: Path, build: Callable[[Path], None]) -> str:
    if (final / "stats.json").is_file():         # finished while we were taking the lock
        return "waited"
    clean_stale_tmps(final.parent)
    with atomic_folder(final) as tmp:
        build(tmp)
    return "built"


# --- reading entries back -------------------------------------------------------------------------

class DamagedCache(Exception):
    """A cache file that cannot be read (cut short, edited by hand, a disk error): `folder` is rebuilt."""

    def __init__(self, folder: Path, detail: str):
        super().__init__(f"{folder}: {detail}")
        self.folder, self.detail = Path(folder), detail


def read_json(path: Path, folder: Path) -> dict:
    """A JSON object the cache wrote, or DamagedCache naming `folder` (what to rebuild)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DamagedCache(folder, f"{Path(path).name} unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise DamagedCache(folder, f"{Path(path).name} is not a JSON object")
    return data


def discard(folder: Path) -> None:
    """Remove a damaged entry: renamed aside first, so no reader ever sees half of it."""
    trash = folder.with_name(tmp_name(folder.name))
    with contextlib.suppress(OSError):
        os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def load_split(folder: Path):
    """A datasets.Dataset over folder/data-*.arrow, memory-mapped (nothing is read into RAM up front)."""
    import datasets
    import pyarrow as pa

    files = sorted(Path(folder).glob("data-*.arrow"))
    if not files:
        raise DamagedCache(Path(folder).parent, f"no data-*.arrow files in {Path(folder).name}/")
    try:
        parts = [datasets.Dataset.from_file(str(f)) for f in files]
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DamagedCache(Path(folder).parent, f"an arrow file in {Path(folder).name}/ is unreadable ({exc})") \
            from None
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
