"""streaming=true (stage pt): documents are read, tokenised and cut into blocks while training, nothing cached.

    zhtune train stage=pt streaming=true max_steps=100000 dataset=[/data/corpus] ...
    data = build_streaming_dataset(cfg, tokenizer)          # what train/pt.py calls

The blocks are the ones the cached path writes (BlockPacker.blocks: the same ids, labels and position_ids,
documents in the same order), except that the stream never ends: after the last document it starts the
corpus again, and training stops at max_steps. The process that iterates (rank 0; the Trainer's
accelerate dataloader sends each rank its own slice of every global batch, so no rank repeats another's
blocks) remembers where each block ended: which source, which record (line, row), how many of its tokens
were already in earlier blocks. StreamPosition writes that position for the rows consumed at a checkpoint
into trainer_state.json, and a resumed run starts reading exactly there: nothing repeated, nothing skipped.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from typing import Iterator

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from zhtune.config import TrainConfig
from zhtune.data.files import find_sources
from zhtune.data.formats import BLOCK, LINE_KINDS, Segment, Source, read_segment
from zhtune.data.pretrain import block_columns, document_text, encode_documents, pretrain_spec
from zhtune.data.sft import make_collator
from zhtune.data.prepare import DatasetBundle, prepare
from zhtune.data.readers import Record, _rename
from zhtune.errors import ZhtuneError

BATCH_DOCS = 64                      # documents tokenised per call while training
LOG_ROWS = 1 << 16                   # positions remembered for rows handed out but maybe not consumed yet


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the next block starts: record `record` (line, row or record number) of source `source`
    in pass `epoch` over the corpus, `skip` of its tokens already in earlier blocks; `taken` records of
    its `dataset` entry read before it (for max_samples); `rows` blocks handed out before."""

    epoch: int = 0
    source: int = 0
    record: int = 0
    skip: int = 0
    taken: int = 0
    rows: int = 0


def record_number(rec: Record, kind: str, ordinal: int) -> int:
    """A record's place in its source: the line (.txt, .jsonl), the row (tables), else its ordinal."""
    if kind in LINE_KINDS:
        return int(rec.source.rsplit(":", 1)[1])
    if kind in ("parquet", "arrow", "saved"):
        return int(rec.source.rsplit("row ", 1)[1])
    if kind == "hub":
        return int(rec.source.rsplit("[", 1)[1].rstrip("]"))
    return ordinal


def line_offset(path: str, line: int) -> int:
    """The byte offset where line `line` (1-based) of a plain file starts, found by counting newlines."""
    pos, seen = 0, 1
    with open(path, "rb") as handle:
        while seen < line and (block := handle.read(BLOCK)):
            count = block.count(b"\n")
            if seen + count < line:
                seen, pos = seen + count, pos + len(block)
                continue
            i = -1
            for _ in range(line - seen):
                i = block.index(b"\n", i + 1)
            return pos + i + 1
    return pos


def records_from(source: Source, start: int, fmt: str, columns: dict) -> Iterator[tuple[int, Record]]:
    """(record number, record) of a source from record number `start` on, seeking where the format allows."""
    seg = Segment(source)
    if start and source.kind in LINE_KINDS and not source.compression:
        seg = Segment(source, line_offset(source.path, start), None, start)
    elif start and source.kind in ("arrow", "saved", "hub"):
        seg = Segment(source, start)
    for ordinal, rec in enumerate(read_segment(seg, fmt, "text")):
        number = record_number(rec, source.kind, ordinal)
        if number < start:
            continue
        if not isinstance(rec.data, dict):
            raise ZhtuneError(f"record is a JSON {type(rec.data).__name__}, not an object", where=rec.source,
                              expected="one JSON object per record")
        yield number, (Record(rec.source, _rename(rec.data, columns)) if columns else rec)


class PretrainStream(torch.utils.data.IterableDataset):
    """Blocks of cutoff_len tokens made while iterating (see the module docstring); infinite."""

    def __init__(self, spec, cfg: TrainConfig):
        self.spec, self.fmt, self.columns = spec, cfg.format, dict(cfg.columns)
        self.max_samples, self.strict = cfg.max_samples, cfg.strict
        self.sources = [(i, s) for i, entry in enumerate(cfg.dataset)
                        for s in find_sources(str(entry), f"dataset[{i}]: {entry}")]
        blob = json.dumps([s.fingerprint() for _, s in self.sources] + [spec.key_parts(), spec.cutoff_len])
        self.corpus = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.start = Position()
        self.log: collections.deque = collections.deque(maxlen=LOG_ROWS)   # (rows handed out, Position)

    def documents(self, start: Position) -> Iterator[tuple[Position, str]]:
        """(position of the document's record, its text) in reading order, pass after pass."""
        epoch, first = start.epoch, True
        while True:
            entry, taken, read_any, whole = None, 0, False, not first or start == Position()
            for index, (entry_index, source) in enumerate(self.sources):
                if first and index < start.source:
                    continue
                if entry_index != entry:
                    entry, taken = entry_index, (start.taken if first else 0)
                begin = start.record if first and index == start.source else 0
                first = False
                for number, rec in records_from(source, begin, self.fmt, self.columns):
                    if self.max_samples is not None and taken >= self.max_samples:
                        break
                    text = document_text(rec, self.fmt)
                    taken += 1
                    if not text.strip():
                        if self.strict:
                            raise ZhtuneError("record skipped: empty text", where=rec.source,
                                              expected="every record usable (strict=true)")
                        continue
                    read_any = True
                    yield Position(epoch, index, number, 0, taken - 1), text
            if whole and not read_any:
                raise ZhtuneError("every document is empty", where="dataset", expected="non-empty lines or text fields")
            epoch, first = epoch + 1, False

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ZhtuneError("streaming=true reads the corpus in the training process", where="dataloader_num_workers",
                              expected="0 (the default)")
        size, start, rows = self.spec.cutoff_len, self.start, self.start.rows
        ids, pos = np.empty(0, np.int32), np.empty(0, np.int32)
        owner = np.empty(0, np.int64)                 # index into `docs` of every buffered token
        docs: list[tuple[Position, int]] = []         # (position, length) of the buffered documents
        stream, skip = self.documents(start), start.skip
        while True:
            batch = [next(stream) for _ in range(BATCH_DOCS)]
            encoded = encode_documents([text for _, text in batch], self.spec.tokenizer)
            base = len(docs)
            docs += [(where, len(doc)) for (where, _), doc in zip(batch, encoded)]
            encoded[0] = encoded[0][skip:]            # resuming mid-document: its first tokens were trained on
            lengths = np.array([len(d) for d in encoded], dtype=np.int64)
            doc_pos = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            doc_pos[:lengths[0]] += skip
            skip = 0
            ids = np.concatenate([ids] + [np.asarray(d, dtype=np.int32) for d in encoded])
            pos = np.concatenate([pos, doc_pos.astype(np.int32)])
            owner = np.concatenate([owner, np.repeat(np.arange(base, base + len(encoded)), lengths)])
            n = len(ids) // size
            block_ids, labels, position = block_columns(ids[:n * size], pos[:n * size], size)
            for k in range(n):
                rows += 1
                self.log.append((rows, self._after((k + 1) * size, ids, pos, owner, docs, rows)))
                cut = slice(k * size, (k + 1) * size)
                yield {"input_ids": block_ids[cut], "labels": labels[cut], "position_ids": position[cut]}
            ids, pos, owner = ids[n * size:], pos[n * size:], owner[n * size:]
            keep = int(owner[0]) if len(owner) else len(docs)
            docs, owner = docs[keep:], owner - keep

    @staticmethod
    def _after(end: int, ids, pos, owner, docs, rows: int) -> Position:
        """The position of the token at buffer index `end` (the next block's first), or just past the
        last buffered document when the buffer ends there."""
        if end < len(ids):
            where = docs[int(owner[end])][0]
            return dataclasses.replace(where, skip=int(pos[end]), rows=rows)
        where, length = docs[-1]
        return dataclasses.replace(where, skip=length, rows=rows)

    def position_at(self, rows: int) -> Position | None:
        for handed, where in reversed(self.log):
            if handed == rows:
                return where
            if handed < rows:
                break
        return None


class StreamPosition(TrainerCallback, ExportableState):
    """Puts the stream's position for the rows consumed so far into every checkpoint's trainer_state.json
    (stateful_callbacks), and starts a resumed run's stream there."""

    def __init__(self, stream: PretrainStream | None = None):
        self.stream = stream
        self.step = self.step0 = self.rows0 = 0
        self.rows_per_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.step = self.step0 = state.global_step
        saved = (state.stateful_callbacks or {}).get(type(self).__name__, {}).get("attributes", {})
        if state.global_step and self.stream is not None:
            if not saved.get("position"):
                raise ZhtuneError(f"the checkpoint of step {state.global_step} holds no streaming position",
                                  where="resume_from_checkpoint", expected="a checkpoint written with streaming=true",
                                  hint="resume with the settings the run started with, or start over")
            if saved.get("corpus") != self.stream.corpus:
                raise ZhtuneError("the corpus changed since the checkpoint was written (files, sizes or tokenizer)",
                                  where="dataset", expected="the same files to resume a streaming run",
                                  hint="set overwrite_output_dir=true to start over on the new corpus")
            self.stream.start = Position(**saved["position"])
        self.rows0 = self.stream.start.rows if self.stream is not None else 0

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step

    def state(self) -> dict:
        rows = self.rows0 + (self.step - self.step0) * self.rows_per_step
        where = self.stream.position_at(rows) if self.stream is not None else None
        if where is None and rows == self.rows0 and self.stream is not None:
            where = self.stream.start
        return {"args": {}, "attributes": {"position": dataclasses.asdict(where) if where else None,
                                           "corpus": self.stream.corpus if self.stream is not None else None}}


def attach(trainer, data: DatasetBundle) -> None:
    """Give the Trainer the bundle's callbacks; a stream resumes itself, so the Trainer must not skip batches."""
    for callback in data.callbacks:
        trainer.add_callback(callback)
    if isinstance(data.train, PretrainStream):
        trainer.args.ignore_data_skip = True


def build_streaming_dataset(cfg: TrainConfig, tokenizer) -> DatasetBundle:
    """The training stream (+ the eval set from val_file, prepared in the cache: it is small)."""
    spec = pretrain_spec(cfg, tokenizer)
    if not spec.packing:
        raise ZhtuneError("streaming=true with packing=false", where="packing",
                          expected="packing=true: streaming cuts the documents into blocks of cutoff_len")
    if cfg.max_steps is None or cfg.max_steps <= 0:
        raise ZhtuneError("streaming=true needs max_steps: a stream has no length to count epochs in",
                          where="max_steps", expected="a positive number of optimizer steps")
    if cfg.val_size:
        raise ZhtuneError("val_size holds out random documents, which a stream cannot do", where="val_size",
                          expected="val_file=[...] with streaming=true (or no validation)")
    if cfg.dataloader_num_workers:
        raise ZhtuneError("streaming=true reads the corpus in the training process", where="dataloader_num_workers",
                          expected="0 (the default)")
    stream = PretrainStream(spec, cfg)
    eval_ = None
    if cfg.val_file:
        eval_, _, _ = prepare(spec, dataclasses.replace(cfg, dataset=list(cfg.val_file), val_file=[], streaming=False))
    size = sum(s.size for _, s in stream.sources)
    stats = {"stage": "pt", "streaming": True, "sources": len(stream.sources), "bytes": size,
             "cutoff_len": spec.cutoff_len, "packing": True}
    print(f"数据 data (pt, streaming 流式): {len(stream.sources):,} sources, {size / 1e9:.2f} GB, read, tokenised and "
          f"cut into blocks of {spec.cutoff_len} while training; the position is saved in every checkpoint", flush=True)
    # shift_labels (a flat list of labels) cannot be cut into per-rank slices of a dispatched batch
    collator = dataclasses.replace(make_collator(tokenizer), label_logits_only=False)
    return DatasetBundle(train=stream, eval=eval_, collator=collator, stats=stats, callbacks=[StreamPosition(stream)])

