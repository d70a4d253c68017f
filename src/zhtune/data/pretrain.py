"""Continued pre-training data: plain-text documents -> token blocks of cutoff_len, EOS between documents.

Called by `zhtune train stage=pt` as `build_pretrain_dataset(cfg, tokenizer)`. Documents are a line of
a .txt file or the `text` field of a record. With packing (the default for pt) the documents are
concatenated and cut into blocks of exactly cutoff_len tokens (the last may be shorter); position_ids
restart at every document start, so a document never attends to the one before it in the block, and
the first token of every document has no label. Without packing each document is its own row (long ones
split into cutoff_len pieces).

The corpus streams from disk (data/prepare.py): documents are tokenised in parallel into the cache, then
cut into blocks in one ordered pass that carries the unfinished block from batch to batch (BlockPacker).
With streaming=true nothing is cached: data/streaming.py tokenises and packs while training, the same way
(train/pt.py picks one or the other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from zhtune.config import TrainConfig
from zhtune.data.prepare import IGNORE, Counts, DatasetBundle, prepare
from zhtune.data.readers import Record, detect_format, to_text, tokenizer_fingerprint
from zhtune.data.sft import check_split_options, make_collator
from zhtune.errors import ZhtuneError

BATCH_DOCS = 1000                    # documents tokenised per call, at most
BATCH_CHARS = 1 << 18                # ... and about this many characters (a batch's ids are Python lists)


def encode_documents(texts: list[str], tokenizer) -> list[list[int]]:
    """text -> ids with BOS as the tokenizer adds it and EOS at the end."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=True, return_attention_mask=False)["input_ids"]
    if eos is not None:
        ids = [x if x and x[-1] == eos else x + [eos] for x in ids]
    return ids


def document_text(rec: Record, fmt: str) -> str:
    """The text of a pre-training record; instruction data is refused here, with its file:line."""
    kind = detect_format(rec, fmt)
    if kind != "text":
        raise ZhtuneError(f"a {kind} record in pre-training data", where=rec.source,
                          expected="plain text: .txt lines or {\"text\": ...} records",
                          hint="stage=sft trains on instruction data; "
                               "or map your text field with columns={text: yours}")
    return to_text(rec)


def block_columns(ids: np.ndarray, pos: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens starting at a block boundary (ids, and each token's index in its document) -> flat input_ids,
    labels (-100 on a document's first token: it is not predicted from the document before) and
    position_ids = min(index in its document, index in its block): its document began in this block or before."""
    labels = np.where(pos == 0, IGNORE, ids).astype(np.int32)
    position = np.minimum(pos, np.arange(len(ids)) % size).astype(np.int32)
    return ids.astype(np.int32, copy=False), labels, position


class BlockPacker:
    """Tokenised documents, batch after batch -> rows of input_ids, labels (-100 on each document's first
    token) and position_ids (the index in the document, restarting at every document and at the block start).

    packing: blocks of exactly `size` tokens across documents; the unfinished block is carried to the next
    batch and flush() returns it (shorter) at the end. Without packing: each document cut into pieces.
    Memory: one batch and one block of carry; everything is vectorised with numpy.
    """

    def __init__(self, size: int, packing: bool = True):
        self.size, self.packing = size, packing
        self.ids = np.empty(0, np.int32)         # carried tokens (fewer than size)
        self.pos = np.empty(0, np.int32)         # their index within their document

    def add(self, table) -> Any:
        if table is None or table.num_rows == 0:
            return None
        col = table.column("input_ids").combine_chunks()
        lengths = col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
        starts = np.cumsum(lengths) - lengths
        doc_pos = (np.arange(len(flat)) - np.repeat(starts, lengths)).astype(np.int32)
        if not self.packing:
            return self._pieces(flat, doc_pos, lengths, starts)
        ids, pos = np.concatenate([self.ids, flat]), np.concatenate([self.pos, doc_pos])
        cut = len(ids) // self.size * self.size
        self.ids, self.pos = ids[cut:], pos[cut:]
        return self.blocks(ids[:cut], pos[:cut])

    def flush(self) -> Any:
        if not len(self.ids):
            return None
        out = self.blocks(self.ids, self.pos)
        self.ids, self.pos = np.empty(0, np.int32), np.empty(0, np.int32)
        return out

    def blocks(self, ids: np.ndarray, pos: np.ndarray):
        """Tokens starting at a block boundary -> a table of block rows (see block_columns)."""
        import pyarrow as pa

        ids, labels, position = block_columns(ids, pos, self.size)
        offsets = pa.array(np.append(np.arange(0, len(ids), self.size), len(ids)).astype(np.int32))
        return pa.table({name: pa.ListArray.from_arrays(offsets, pa.array(values)) for name, values in
                         (("input_ids", ids), ("labels", labels), ("position_ids", position))})

    def _pieces(self, flat, doc_pos, lengths, starts):
        import pyarrow as pa

        pieces = -(-lengths // self.size)                                    # ceil: pieces per document
        within = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        row_starts = np.repeat(starts, pieces) + within * self.size
        offsets = pa.array(np.append(row_starts, len(flat)).astype(np.int32))
        labels = np.where(doc_pos == 0, IGNORE, flat).astype(np.int32)
        return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(flat)),
                         "labels": pa.ListArray.from_arrays(offsets, pa.array(labels))})

    def stats(self) -> dict:
        return {}


@dataclass
class PretrainSpec:
    """What stage pt does with records (see data/prepare.py for the protocol)."""

    tokenizer: Any
    fmt: str
    columns: dict
    cutoff_len: int
    packing: bool
    name: str = "pt"

    def __post_init__(self):
        import datasets

        ints = datasets.List(datasets.Value("int32"))
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.features = datasets.Features({"input_ids": ints})
        final = {"input_ids": ints, "labels": ints, **({"position_ids": ints} if self.packing else {})}
        self.final_features = datasets.Features(final)

    def key_parts(self) -> dict:
        return {"stage": "pt-documents", "tokenizer": self.fingerprint, "format": self.fmt, "columns": self.columns}

    def final_key_parts(self) -> dict:
        return {"cutoff_len": self.cutoff_len, "packing": self.packing}

    def tokenise(self, records: Iterator[Record], counts: Counts) -> Iterator[dict]:
        """Records -> {"input_ids": [...]} batches; blank documents are skipped and counted."""
        texts: list[str] = []
        chars = 0
        for rec in records:
            text = document_text(rec, self.fmt)
            counts.records += 1
            if not text.strip():
                counts.skip("empty text", rec.source)
                continue
            texts.append(text)
            chars += len(text)
            if len(texts) == BATCH_DOCS or chars >= BATCH_CHARS:
                yield self._encode(texts, counts)
                texts, chars = [], 0
        if texts:
            yield self._encode(texts, counts)

    def _encode(self, texts: list[str], counts: Counts) -> dict:
        ids = encode_documents(texts, self.tokenizer)
        counts.rows += len(ids)
        counts.tokens += sum(map(len, ids))
        return {"input_ids": ids}

    def finisher(self) -> BlockPacker:
        return BlockPacker(self.cutoff_len, self.packing)

    def check(self, counts: Counts, where: str) -> None:
        if counts.rows == 0:
            raise ZhtuneError("every document is empty", where=where, expected="non-empty lines or text fields")

    def describe_counts(self, counts: Counts) -> dict:
        return {"records": counts.records, "packing": self.packing, "cutoff_len": self.cutoff_len}

    def describe_split(self, n_train: int, n_eval: int) -> dict:
        return {"documents": n_train, "eval_documents": n_eval}

    def describe_flow(self, stats: dict) -> str:
        what = f"blocks of {self.cutoff_len}" if self.packing else f"rows (documents cut at {self.cutoff_len})"
        held = f" (+{stats['eval_documents']:,} documents → {stats['eval'].get('rows', 0):,} eval rows)" \
            if stats.get("eval_documents") else ""
        return (f"{stats['records']:,} records → {stats['documents']:,} documents → {stats['tokens']:,} tokens "
                f"→ {stats['rows']:,} {what}{held}")


def pretrain_spec(cfg: TrainConfig, tokenizer) -> PretrainSpec:
    check_split_options(cfg)
    packing = True if cfg.packing is None else bool(cfg.packing)
    return PretrainSpec(tokenizer, cfg.format, dict(cfg.columns), cfg.cutoff_len, packing)


def build_pretrain_dataset(cfg: TrainConfig, tokenizer) -> DatasetBundle:
    """cfg.dataset (+ val_file / val_size, split by document) -> blocks of cutoff_len tokens, prepared in the
    cache (streaming=true is data/streaming.py's build_streaming_dataset)."""
    spec = pretrain_spec(cfg, tokenizer)
    train, eval_, stats = prepare(spec, cfg)
    return DatasetBundle(train=train, eval=eval_, collator=make_collator(tokenizer), stats=stats)
