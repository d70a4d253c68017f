"""How each file format is read: a segment of a source (a byte range of a line file, row groups of a parquet
file, rows of an arrow file or saved dataset, or all of it) -> records that name their file:line (or file:row).

    for rec in read_segment(Segment(source), fmt="auto", text_field="text"):
        print(rec.source, rec.data)

Line files (.txt, .jsonl) are read in blocks and split at newlines; .json files are parsed a value at a
time from a sliding buffer (a JSON list needs no more memory than its largest record); .gz .zst .bz2 .xz are
decompressed as they are read; parquet and arrow files are memory-mapped batch by batch. data/files.py finds
the sources and cuts them into segments.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from zhtune.errors import ZhtuneError

LINE_KINDS = ("txt", "jsonl")
BLOCK = 4 << 20                      # bytes read at a time
MAX_RECORD = 256 << 20               # a .json record larger than this is reported, not read further



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
class Record:
    source: str                      # "file:line", "file:row N" (tables) or "name[index]" (Hub)
    data: dict = field(default_factory=dict)


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


def parquet_file(path: str):
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
        pf = parquet_file(src.path)
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
