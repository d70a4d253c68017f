"""Where training records come from: files, folders, compressed files, parquet / arrow, `save_to_disk` folders
and Hub names -> sources, cut into units of work, read back as records that name their file:line (or file:row).

    sources = find_sources("corpus/", "dataset[0]")          # every readable file under the folder, sorted
    for rec in read_segment(Segment(sources[0]), fmt="auto", text_field="text"):
        print(rec.source, rec.data)

Used by readers.read_records (one entry after another) and data/prepare.py (units read in parallel).
Line files (.txt, .jsonl) are read in blocks and split at line boundaries into byte ranges, so a big file is
tokenised by several processes and a killed preparation keeps the ranges it finished. Compressed files,
.json files and Hub datasets are read whole, one after another; parquet files are cut at row groups, arrow
files and `save_to_disk` folders at rows. Memory never depends on a file's size, only on its longest record.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import lzma
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from zhtune.errors import ZhtuneError

LINE_KINDS = ("txt", "jsonl")
TEXT_KINDS = ("txt", "jsonl", "json")
COMPRESSIONS = {".gz": "gz", ".zst": "zst", ".zstd": "zst", ".bz2": "bz2", ".xz": "xz"}
READABLE = ".txt .jsonl .json (each also .gz .zst .bz2 .xz), .parquet, .arrow, or a save_to_disk folder"
BLOCK = 4 << 20                      # bytes read at a time
MIN_CHUNK, MAX_CHUNK = 1 << 20, 256 << 20   # a line file is cut into ~64 ranges of a power of two in between
MAX_RECORD = 256 << 20               # a .json record larger than this is reported, not read further
SMALL_GROUP = 16                     # files under MIN_CHUNK are read 16 to a unit


@dataclass(frozen=True)
class Source:
    """One thing to read: a file, a `save_to_disk` folder, or a Hub dataset name."""

    path: str
    kind: str                        # txt | jsonl | json | parquet | arrow | saved | hub
    compression: str | None = None   # gz | zst | bz2 | xz
    size: int = 0                    # bytes on disk
    stamp: str = ""                  # what changes when the content changes (mtime, a dataset fingerprint)

    def fingerprint(self) -> list:
        return [self.path, self.kind, self.compression, self.size, self.stamp]


@dataclass(frozen=True)
class Segment:
    """Part of a source: a byte range of a line file, a row-group / row range of a table, or all of it."""

    source: Source
    start: int = 0                   # byte offset (line files), row group (parquet) or row (arrow, saved, hub)
    stop: int | None = None          # exclusive; None = to the end
    first_line: int = 1              # the line number at `start` (line files)

    def fingerprint(self) -> list:
        return [*self.source.fingerprint(), self.start, self.stop]


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


@dataclass
class Record:
    source: str                      # "file:line", "file:row N" (tables) or "name[index]" (Hub)
    data: dict = field(default_factory=dict)


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
        meta = _parquet(source.path).metadata
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


def plan_units(entries: list[str], key: str, max_samples: int | None) -> list[Unit]:
    """Every entry of `dataset` (or val_file) -> units of work, in reading order."""
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
                segments = line_ranges(source)
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


# --- reading -------------------------------------------------------------------------------------------

def _open_binary(source: Source):
    path = source.path
    if source.compression == "gz":
        return gzip.open(path, "rb")
    if source.compression == "bz2":
        return bz2.open(path, "rb")
    if source.compression == "xz":
        return lzma.open(path, "rb")
    if source.compression == "zst":
        try:
            import zstandard
        except ImportError:
            raise ZhtuneError(f"{path} is zstd-compressed, and the zstandard package is not installed",
                              where=path, expected="pip install zstandard") from None
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
    return open(path, "rb")


def _blocks(seg: Segment) -> Iterator[bytes]:
    """The segment's bytes (decompressed), BLOCK at a time; a damaged compressed file is a named error."""
    with _open_binary(seg.source) as handle:
        if seg.start:
            handle.seek(seg.start)
        left = None if seg.stop is None else seg.stop - seg.start
        while left is None or left > 0:
            try:
                block = handle.read(BLOCK if left is None else min(BLOCK, left))
            except (OSError, EOFError, lzma.LZMAError, ValueError) as exc:
                raise ZhtuneError(f"cannot read {seg.source.compression or ''} file: {exc}".replace("  ", " "),
                                  where=seg.source.path, expected="an intact file") from None
            except Exception as exc:  # noqa: BLE001 - zstandard.ZstdError is not an OSError; others re-raised
                if type(exc).__module__.startswith("zstandard") or "zstd" in type(exc).__name__.lower():
                    raise ZhtuneError(f"cannot read zst file: {exc}", where=seg.source.path,
                                      expected="an intact file") from None
                raise
            if not block:
                return
            if left is not None:
                left -= len(block)
            yield block


def _decode(data: bytes, path: str, lineno: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = lineno + data.count(b"\n", 0, exc.start)
        raise ZhtuneError(f"not UTF-8 text ({exc.reason})", where=f"{path}:{line}",
                          expected="UTF-8 encoded text") from None


def iter_lines(seg: Segment) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of a line file's segment, decoded as UTF-8 a block at a time."""
    path, lineno, tail = seg.source.path, seg.first_line, b""
    for block in _blocks(seg):
        data = tail + block
        cut = data.rfind(b"\n") + 1
        if not cut:
            tail = data
            continue
        lines = _decode(data[:cut], path, lineno).split("\n")
        lines.pop()                               # the empty string after the last newline
        if lineno == 1 and lines:
            lines[0] = lines[0].lstrip("\ufeff")
        for line in lines:
            yield lineno, line.rstrip("\r")
            lineno += 1
        tail = data[cut:]
    if tail:
        text = _decode(tail, path, lineno)
        yield lineno, (text.lstrip("\ufeff") if lineno == 1 else text).rstrip("\r")


def _iter_txt(seg: Segment, text_field: str) -> Iterator[Record]:
    path = seg.source.path
    for lineno, line in iter_lines(seg):
        yield Record(f"{path}:{lineno}", {text_field: line})


def _iter_jsonl(seg: Segment) -> Iterator[Record]:
    path = seg.source.path
    for lineno, line in iter_lines(seg):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ZhtuneError(f"malformed JSON: {exc.msg} (column {exc.colno})", where=f"{path}:{lineno}",
                              expected="one JSON object per line") from None
        yield Record(f"{path}:{lineno}", obj)


def _text_blocks(seg: Segment) -> Iterator[str]:
    decoder, path, lineno = codecs.getincrementaldecoder("utf-8")(), seg.source.path, 1
    for block in _blocks(seg):
        try:
            text = decoder.decode(block)
        except UnicodeDecodeError as exc:
            line = lineno + block.count(b"\n", 0, max(0, exc.start))
            raise ZhtuneError(f"not UTF-8 text ({exc.reason})", where=f"{path}:{line}",
                              expected="UTF-8 encoded text") from None
        lineno += block.count(b"\n")
        yield text
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise ZhtuneError(f"not UTF-8 text ({exc.reason})", where=f"{path}:{lineno}",
                          expected="UTF-8 encoded text") from None


class _JsonStream:
    """Top-level JSON values of a .json file read a block at a time: a list's items, or objects one after
    another (one object, or JSON lines named .json), each with the line it starts on."""

    def __init__(self, seg: Segment):
        self.path, self.blocks = seg.source.path, _text_blocks(seg)
        self.buf, self.pos, self.line, self.counted, self.eof = "", 0, 1, 0, False
        self.decoder = json.JSONDecoder()

    def more(self) -> bool:
        """Append the next block (dropping what was read); False at the end of the file."""
        if self.eof:
            return False
        self.line += self.buf.count("\n", self.counted, self.pos)
        self.buf, self.counted, self.pos = self.buf[self.pos:], 0, 0
        block = next(self.blocks, None)
        if block is None:
            self.eof = True
            return False
        self.buf += block
        return True

    def line_at(self, pos: int) -> int:
        self.line += self.buf.count("\n", self.counted, pos)
        self.counted = pos
        return self.line

    def skip(self, chars: str) -> str | None:
        """Move past `chars`; the next character, or None at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in chars:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return None

    def value(self, expected: str) -> Record:
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:   # malformed, or cut by the block's end: read on and retry
                if not self.eof and len(self.buf) - self.pos < MAX_RECORD:
                    self.more()                     # the retry's error (if any) is about the new buffer
                    continue
                raise ZhtuneError(f"malformed JSON: {exc.msg} (column {exc.colno})",
                                  where=f"{self.path}:{self.line_at(exc.pos)}", expected=expected) from None
            if end < len(self.buf) or self.eof:    # a value ending at the block's end may go on (a number)
                break
            self.more()
        rec = Record(f"{self.path}:{self.line_at(self.pos)}", obj)
        self.pos = end
        return rec

    def __iter__(self) -> Iterator[Record]:
        first = self.skip(" \t\r\n\ufeff")
        if first != "[":
            while first is not None:
                yield self.value("a JSON list of objects, or one object per line")
                first = self.skip(" \t\r\n")
            return
        self.pos += 1
        while True:
            nxt = self.skip(" \t\r\n,")
            if nxt is None:
                raise ZhtuneError("malformed JSON: the list is not closed with ']'",
                                  where=f"{self.path}:{self.line_at(self.pos)}", expected="a JSON list of objects")
            if nxt == "]":
                return
            yield self.value("a JSON list of objects")


def _parquet(path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ZhtuneError(f"cannot read parquet file: {exc}", where=path, expected="an intact .parquet file") from None


def _arrow_batches(path: str) -> Iterator:
    """Record batches of an arrow file, IPC stream (datasets' cache files) or IPC file (Feather v2) format."""
    import pyarrow as pa

    try:
        source = pa.memory_map(path)
        try:
            reader = pa.ipc.open_stream(source)
            yield from reader
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
    except (pa.ArrowException, OSError) as exc:
        raise ZhtuneError(f"cannot read arrow file: {exc}", where=path,
                          expected="an intact .arrow file (IPC stream or file format)") from None


def _load_table_dataset(source: Source):
    import datasets

    if source.kind == "saved":
        return datasets.load_from_disk(source.path)
    try:
        return datasets.load_dataset(source.path, split="train")
    except Exception as exc:  # noqa: BLE001 - offline, private, misspelt: all the user's to fix
        raise ZhtuneError(f"dataset {source.path!r} is not a local path and could not be loaded from the Hub: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", where=source.path,
                          expected="an existing file or folder, or a Hub dataset name (needs network)") from None


def count_rows(source: Source) -> int:
    if source.kind == "arrow":
        return sum(b.num_rows for b in _arrow_batches(source.path))
    return len(_load_table_dataset(source))


def _table_batches(seg: Segment) -> Iterator[tuple[int, Any]]:
    """(row index of the batch's first row, record batch) over the segment's rows."""
    src = seg.source
    if src.kind == "parquet":
        pf = _parquet(src.path)
        stop = pf.metadata.num_row_groups if seg.stop is None else seg.stop
        row = sum(pf.metadata.row_group(i).num_rows for i in range(seg.start))
        for group in range(seg.start, stop):
            for batch in pf.iter_batches(batch_size=1024, row_groups=[group]):
                yield row, batch
                row += batch.num_rows
        return
    if src.kind == "arrow":
        row = 0
        for batch in _arrow_batches(src.path):
            lo = max(seg.start - row, 0)
            hi = batch.num_rows if seg.stop is None else min(seg.stop - row, batch.num_rows)
            if hi > lo:
                yield row + lo, batch.slice(lo, hi - lo)
            row += batch.num_rows
            if seg.stop is not None and row >= seg.stop:
                return
        return
    ds = _load_table_dataset(src).with_format("arrow")
    stop = len(ds) if seg.stop is None else seg.stop
    for row in range(seg.start, stop, 1024):
        yield row, ds[row:min(row + 1024, stop)]


def _iter_table(seg: Segment) -> Iterator[Record]:
    name = seg.source.path
    for row, batch in _table_batches(seg):
        for j, obj in enumerate(batch.to_pylist()):
            yield Record(f"{name}[{row + j}]" if seg.source.kind == "hub" else f"{name}:row {row + j}", obj)


def read_segment(seg: Segment, fmt: str, text_field: str) -> Iterator[Record]:
    """The records of one segment; .txt lines become {text_field: line}."""
    kind = seg.source.kind
    if kind == "txt":
        if fmt not in ("auto", "text"):
            raise ZhtuneError(f"a .txt file holds plain text, but format={fmt}", where=seg.source.path,
                              expected="format=text (or auto) for .txt, or a .json/.jsonl file for " + fmt)
        return _iter_txt(seg, text_field)
    if kind == "jsonl":
        return _iter_jsonl(seg)
    if kind == "json":
        return iter(_JsonStream(seg))
    return _iter_table(seg)
