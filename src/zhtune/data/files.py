"""Where training records come from: files, folders, compressed files, parquet / arrow, `save_to_disk` folders
and Hub names -> sources, cut into units of work (data/formats.py reads them).

    sources = find_sources("corpus/", "dataset[0]")          # every readable file under the folder, sorted
    units = plan_units(["corpus/"], "dataset", max_samples=None)

Used by readers.read_records (one entry after another) and data/prepare.py (units read in parallel).
Line files (.txt, .jsonl) are read in blocks and split at line boundaries into byte ranges, so a big file is
tokenised by several processes and a killed preparation keeps the ranges it finished. Compressed files,
.json files and Hub datasets are read whole, one after another; parquet files are cut at row groups, arrow
files and `save_to_disk` folders at rows. Memory never depends on a file's size, only on its longest record.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from zhtune.data.formats import BLOCK, LINE_KINDS, Segment, Source, count_rows, parquet_file
from zhtune.errors import ZhtuneError

TEXT_KINDS = ("txt", "jsonl", "json")
COMPRESSIONS = {".gz": "gz", ".zst": "zst", ".zstd": "zst", ".bz2": "bz2", ".xz": "xz"}
READABLE = ".txt .jsonl .json (each also .gz .zst .bz2 .xz), .parquet, .arrow, or a save_to_disk folder"
MIN_CHUNK, MAX_CHUNK = 1 << 20, 256 << 20   # a line file is cut into ~64 ranges of a power of two in between
SMALL_GROUP = 16                     # files under MIN_CHUNK are read 16 to a unit


@dataclass
class Unit:
    """A piece of work: segments read in order, at most `limit` records (max_samples), from entry `entry`."""

    entry: int
    segments: list[Segment]
    limit: int | None = None
    nbytes: int = 0                  # input bytes, for progress and ETA
    key: str = ""                    # set by the planner: what names its cache folder

    def describe(self) -> str:
        first, last = self.segments[0], self.segments[-1]
        if len(self.segments) > 1:
            return f"{first.source.path} … {last.source.path} ({len(self.segments)} files)"
        if first.start or first.stop is not None:
            unit = "bytes" if first.source.kind in LINE_KINDS else "rows"
            return f"{first.source.path} ({unit} {first.start}-{'' if first.stop is None else first.stop})"
        return first.source.path


# --- finding sources -------------------------------------------------------------------------------

def classify(path: Path) -> tuple[str, str | None] | None:
    """(kind, compression) from a file name, or None for files we do not read."""
    name = path.name.lower()
    compression = None
    for suffix, comp in COMPRESSIONS.items():
        if name.endswith(suffix):
            name, compression = name[: -len(suffix)], comp
            break
    for kind in TEXT_KINDS:
        if name.endswith("." + kind):
            return kind, compression
    if compression is None and name.endswith((".parquet", ".arrow")):
        return name.rsplit(".", 1)[1], None
    return None


def _saved_dataset(folder: Path, where: str) -> Path | None:
    """The folder holding a `save_to_disk` dataset (a DatasetDict's train split), or None."""
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return folder
    dict_file = folder / "dataset_dict.json"
    if not dict_file.is_file():
        return None
    try:
        splits = json.loads(dict_file.read_text(encoding="utf-8")).get("splits", [])
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ZhtuneError("malformed dataset_dict.json", where=str(dict_file),
                          expected="a folder written by DatasetDict.save_to_disk") from None
    if "train" not in splits:
        raise ZhtuneError(f"the DatasetDict in {folder} has no train split (splits: {splits})", where=where,
                          expected="a saved DatasetDict with a 'train' split, or the folder of one split")
    return _saved_dataset(folder / "train", where)


def _file_source(path: Path, kind: str, compression: str | None) -> Source:
    stat = path.stat()
    return Source(str(path.resolve()), kind, compression, stat.st_size, str(stat.st_mtime_ns))


def _saved_source(folder: Path) -> Source:
    files = sorted(folder.glob("*.arrow"))
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    stamp = str(state.get("_fingerprint")) + str(max((f.stat().st_mtime_ns for f in files), default=0))
    return Source(str(folder.resolve()), "saved", None, sum(f.stat().st_size for f in files), stamp)


def _walk(folder: Path, where: str) -> list[Source]:
    """Every readable file under `folder` in sorted order (hidden ones skipped); saved datasets as one source."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(root)
        saved = _saved_dataset(here, where) if here != folder else None
        if saved is not None:
            out.append(_saved_source(saved))
            dirs[:] = []
            continue
        for name in sorted(files):
            kind = classify(here / name)
            if kind and not name.startswith("."):
                out.append(_file_source(here / name, *kind))
    return out


def looks_like_hub_id(entry: str) -> bool:
    """owner/name, and not a path: no data suffix, nothing starting with ./ ../ / ~, no first part that is a
    local folder (data/train when data/ exists): those would cost a Hub timeout with no network."""
    from zhtune.io import looks_like_local_path

    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", entry)) and classify(Path(entry)) is None \
        and not looks_like_local_path(entry)


def find_sources(entry: str, where: str) -> list[Source]:
    """A `dataset` entry -> its sources (a folder recursively, sorted), or a Hub dataset."""
    path = Path(entry).expanduser()
    if path.is_file():
        kind = classify(path)
        if kind is None:
            raise ZhtuneError(f"unsupported data file type: {path}", where=where, expected=READABLE)
        return [_file_source(path, *kind)]
    if path.is_dir():
        saved = _saved_dataset(path, where)
        sources = [_saved_source(saved)] if saved else _walk(path, where)
        if not sources:
            raise ZhtuneError(f"no readable data files in folder {path}", where=where,
                              expected=f"a folder holding training files: {READABLE}")
        return sources
    if looks_like_hub_id(entry):
        return [Source(entry, "hub")]
    raise ZhtuneError(f"dataset path not found: {entry}", where=where,
                      expected=f"an existing file or folder ({READABLE}) or a Hub dataset name like owner/name")


# --- cutting sources into units ----------------------------------------------------------------------

def chunk_bytes(size: int) -> int:
    """Range size for a line file: a power of two near size/64, between MIN_CHUNK and MAX_CHUNK."""
    target = max(1, size // 64)
    return min(MAX_CHUNK, max(MIN_CHUNK, 1 << (target.bit_length() - 1)))


def line_ranges(source: Source) -> list[Segment]:
    """Cut a plain line file at line boundaries into ranges of ~chunk_bytes, counting lines on the way."""
    step = chunk_bytes(source.size)
    if source.compression or source.size < 2 * step:
        return [Segment(source)]
    bounds, pos, lines, target = [(0, 1)], 0, 1, step
    with open(source.path, "rb") as handle:
        while block := handle.read(BLOCK):
            while target < pos + len(block):
                i = block.find(b"\n", max(0, target - pos))
                if i < 0:
                    break
                bounds.append((pos + i + 1, lines + block.count(b"\n", 0, i + 1)))
                target = pos + i + 1 + step
            lines += block.count(b"\n")
            pos += len(block)
    bounds = [b for b in bounds if b[0] < pos]
    stops = [b[0] for b in bounds[1:]] + [None]
    return [Segment(source, start, stop, line) for (start, line), stop in zip(bounds, stops)]


def table_ranges(source: Source) -> list[Segment]:
    """Parquet: row-group ranges of ~chunk_bytes; arrow files and saved datasets: row ranges."""
    step = chunk_bytes(source.size)
    if source.kind == "parquet":
        meta = parquet_file(source.path).metadata
        sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
        out, start, acc = [], 0, 0
        for i, size in enumerate(sizes):
            acc += size
            if acc >= step and i + 1 < len(sizes):
                out.append(Segment(source, start, i + 1))
                start, acc = i + 1, 0
        return out + [Segment(source, start, None)]
    rows = count_rows(source)
    if source.size < 2 * step or rows < 2:
        return [Segment(source)]
    per = max(1, rows * step // max(1, source.size))
    return [Segment(source, a, min(a + per, rows) if a + per < rows else None) for a in range(0, rows, per)]


def cached_line_ranges(source: Source, plans: Path | None) -> list[Segment]:
    """line_ranges, remembered in `plans`/ by the file's identity: a 100 GB file is scanned for newlines once,
    not again by every resumed preparation."""
    if plans is None or source.compression or source.size < 2 * chunk_bytes(source.size):
        return line_ranges(source)
    name = hashlib.sha256(json.dumps([source.fingerprint(), MIN_CHUNK, MAX_CHUNK]).encode()).hexdigest()[:20]
    path = plans / f"{name}.json"
    try:
        bounds = json.loads(path.read_text(encoding="utf-8"))
        if _valid_plan(bounds, source.size):
            return [Segment(source, *b) for b in bounds]
    except (OSError, ValueError):
        pass                                 # none yet, or unreadable: scan again and rewrite it
    segments = line_ranges(source)
    try:
        plans.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps([[s.start, s.stop, s.first_line] for s in segments]), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass                                 # a read-only cache: the plan is only a shortcut
    return segments


def _valid_plan(bounds, size: int) -> bool:
    """A remembered plan: [[start, stop, first_line], ...] covering the file from 0 to its end."""
    def whole(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not (isinstance(bounds, list) and bounds and all(isinstance(b, list) and len(b) == 3 for b in bounds)):
        return False
    return (all(whole(b[0]) and whole(b[2]) and (b[1] is None or whole(b[1])) for b in bounds)
            and bounds[0][0] == 0 and bounds[-1][1] is None
            and all(a[1] == b[0] and 0 < b[0] < size for a, b in zip(bounds, bounds[1:])))


def plan_units(entries: list[str], key: str, max_samples: int | None, plans: Path | None = None) -> list[Unit]:
    """Every entry of `dataset` (or val_file) -> units of work, in reading order (`plans`: where the line
    ranges of big files are remembered)."""
    units: list[Unit] = []
    for i, entry in enumerate(entries):
        sources = find_sources(str(entry), f"{key}[{i}]: {entry}")
        if max_samples is not None:          # the first N records of the entry: read in order, one unit
            units.append(Unit(i, [Segment(s) for s in sources], max_samples, sum(s.size for s in sources)))
            continue
        small: list[Segment] = []
        for source in sources:
            if source.kind not in ("hub", "saved") and source.size < MIN_CHUNK and source.kind != "parquet":
                small.append(Segment(source))
                if len(small) == SMALL_GROUP:
                    units.append(Unit(i, small, None, sum(s.source.size for s in small)))
                    small = []
                continue
            if small:
                units.append(Unit(i, small, None, sum(s.source.size for s in small)))
                small = []
            if source.kind in LINE_KINDS:
                segments = cached_line_ranges(source, plans)
            elif source.kind in ("parquet", "arrow", "saved"):
                segments = table_ranges(source)
            else:
                segments = [Segment(source)]
            for seg in segments:
                units.append(Unit(i, [seg], None, _segment_bytes(seg)))
        if small:
            units.append(Unit(i, small, None, sum(s.source.size for s in small)))
    return units


def _segment_bytes(seg: Segment) -> int:
    if seg.source.kind in LINE_KINDS and not seg.source.compression:
        return (seg.source.size if seg.stop is None else seg.stop) - seg.start
    return seg.source.size if seg.start == 0 and seg.stop is None else max(1, seg.source.size // 64)
