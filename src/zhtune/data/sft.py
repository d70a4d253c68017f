"""Instruction-tuning data: conversations -> token ids with the loss on answers only, optionally packed.

Called by `zhtune train stage=sft` as `build_sft_dataset(cfg, tokenizer, template)`. Every record
format becomes [{role, content}] messages and goes through `template.encode_pairs` (the one prompt
formatter). Packing puts several samples in one row with position_ids restarting at 0 per sample
and no attention_mask, so transformers builds a block-diagonal causal mask: no sample sees another,
and the loss of a packed sample equals its loss alone (tests/data/test_packing.py).

The records stream from disk through data/prepare.py: tokenised in parallel into the cache, then packed
(best-fit decreasing) window by window in one ordered pass, so memory does not grow with the dataset.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from zhtune.config import TrainConfig
from zhtune.data.prepare import IGNORE, Counts, DatasetBundle, prepare
from zhtune.data.readers import Record, detect_format, to_messages, tokenizer_fingerprint
from zhtune.errors import ZhtuneError

BATCH_SAMPLES = 256                  # conversations tokenised per call
WINDOW_TOKENS = 4 << 20              # packing looks at this many tokens at a time (best fit within the window)


# --- reading and tokenising ---------------------------------------------------------------------

def source_file(source: str) -> str:
    """The file (or Hub name) part of a record's source: "a.jsonl:12" -> "a.jsonl", "x.parquet:row 3" -> ..."""
    if source.endswith("]") and "[" in source:
        return source.rsplit("[", 1)[0]
    return source.rsplit(":", 1)[0] if ":" in source else source


def conversation(rec: Record, fmt: str) -> list[dict]:
    """A record's messages; plain text and preference pairs are refused with their file:line."""
    if fmt in ("text", "preference"):
        raise ZhtuneError(f"{'plain text' if fmt == 'text' else 'preference pairs'} cannot be used for "
                          "instruction tuning", where=rec.source, expected="alpaca, sharegpt or messages records",
                          hint="stage=pt trains on plain text; preference pairs are for stage=dpo")
    return to_messages(rec, fmt)


def tokenise_conversations(batch: dict, tokenizer, template, cutoff_len: int, train_on_prompt: bool) -> dict:
    """datasets.map (batched): messages -> input_ids, labels (-100 on prompts), truncated, n_labels.

    Prompt and answer of each turn are tokenised separately, as encode_pairs splits them, so an answer
    starts on a token boundary; the template writes BOS/EOS as the tokenizer's special-token strings.
    """
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    segments, counts = [], []
    for msgs in batch["messages"]:
        pairs = template.encode_pairs([{"role": m["role"], "content": m["content"]} for m in msgs], bos, eos)
        segments += [text for pair in pairs for text in pair]
        counts.append(2 * len(pairs))
    encoded = tokenizer(segments, add_special_tokens=False)["input_ids"]   # one fast batched call
    out = {"input_ids": [], "labels": [], "truncated": [], "n_labels": []}
    pos = 0
    for count in counts:
        ids, labels = [], []
        for k in range(pos, pos + count):
            ids += encoded[k]
            # even k: prompt (no loss unless train_on_prompt); odd k: the answer
            labels += encoded[k] if (k - pos) % 2 or train_on_prompt else [IGNORE] * len(encoded[k])
        pos += count
        if labels:
            labels[0] = IGNORE   # a sample's first token is never predicted (nor, packed, from the previous sample)
        out["truncated"].append(len(ids) > cutoff_len)
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["n_labels"].append(sum(1 for x in labels if x != IGNORE))
    return out


# --- packing ------------------------------------------------------------------------------------

def best_fit_bins(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each sample (longest first) into the fullest row it still fits in."""
    space: list[tuple[int, int]] = []   # sorted (room left, row index)
    bins: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        need = int(lengths[i])
        j = bisect.bisect_left(space, (need, -1))
        if j < len(space):
            room, row = space.pop(j)
        else:
            room, row = capacity, len(bins)
            bins.append([])
        bins[row].append(i)
        if room - need > 0:
            bisect.insort(space, (room - need, row))
    return bins


def pack_rows(table, groups: list[list[int]], columns: tuple[str, ...] = ("input_ids", "labels")):
    """Concatenate the samples of each group into one row, with position_ids restarting per sample.

    table: a pyarrow Table of variable-length lists (flattened with numpy here: no Python loop over tokens).
    groups: the sample indices of each output row.
    """
    import pyarrow as pa

    cols = {c: table.column(c).combine_chunks() for c in columns}
    lengths = cols[columns[0]].value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    order = np.concatenate([np.asarray(g, dtype=np.int64) for g in groups])
    lens = lengths[order]
    new_start = np.concatenate([[0], np.cumsum(lens)[:-1]])          # where each sample lands
    total = int(lens.sum())
    take = np.arange(total) + np.repeat(offsets[order] - new_start, lens)   # (total,) gather index
    position = np.arange(total) - np.repeat(new_start, lens)
    ends = np.cumsum([len(g) for g in groups])                        # samples per row -> token offsets
    row_offsets = pa.array(np.concatenate([[0], np.cumsum(lens)[ends - 1]]).astype(np.int32))
    out = {}
    for c in columns:
        values = cols[c].flatten().to_numpy(zero_copy_only=False)[take]
        out[c] = pa.ListArray.from_arrays(row_offsets, pa.array(values.astype(np.int32)))
    out["position_ids"] = pa.ListArray.from_arrays(row_offsets, pa.array(position.astype(np.int32)))
    return pa.table(out)


class WindowPacker:
    """Samples, batch after batch -> packed rows of up to `size` tokens: best-fit decreasing over windows of
    WINDOW_TOKENS tokens (one window = the whole dataset for all but large ones), no sample split."""

    def __init__(self, size: int, packing: bool = True):
        self.size, self.packing = size, packing
        self.window: list = []
        self.window_tokens = self.rows = self.tokens = 0

    def add(self, table) -> Any:
        if table is None or table.num_rows == 0:
            return None
        table = table.select(["input_ids", "labels"])
        if not self.packing:
            return table
        import pyarrow.compute as pc

        self.window.append(table)
        self.window_tokens += int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)
        return self.flush() if self.window_tokens >= WINDOW_TOKENS else None

    def flush(self) -> Any:
        if not self.window:
            return None
        import pyarrow as pa

        table = pa.concat_tables(self.window)
        self.window, self.window_tokens = [], 0
        lengths = table.column("input_ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        packed = pack_rows(table, best_fit_bins(lengths, self.size))
        self.rows += packed.num_rows
        self.tokens += int(lengths.sum())
        return packed

    def stats(self) -> dict:
        if not self.packing or not self.rows:
            return {}
        return {"packing_efficiency": round(self.tokens / (self.rows * self.size), 4)}


# --- batching -----------------------------------------------------------------------------------

@dataclass
class Collator:
    """Pads a batch to its longest row -> input_ids, labels (-100 on padding) and either
    attention_mask (unpacked rows) or position_ids (packed rows; padding gets its own run of
    positions, a separate 'sample' at the end that nothing real attends to).

    label_logits_only: also emit `logits_to_keep` (bool, B x T: the positions whose next token has
    a label) and `shift_labels` (those labels, flattened), so the model projects only those
    positions onto the vocabulary. With a 50k vocabulary the output layer and its softmax are about
    half of a small model's work, and in SFT most positions are prompt: this skips that waste.
    The loss is the same number (tests/data/test_packing.py).
    """

    pad_id: int
    pad_to_multiple_of: int | None = None
    label_logits_only: bool = True

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in features[0]
        shape = (len(features), width)
        ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        extra = torch.arange(width).repeat(len(features), 1) if packed else torch.zeros(shape, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"])
            labels[i, :n] = torch.as_tensor(f["labels"])
            if packed:
                extra[i, :n] = torch.as_tensor(f["position_ids"])
                extra[i, n:] -= n        # padding restarts at 0: its own block in the mask
            else:
                extra[i, :n] = 1
        batch = {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}
        if self.label_logits_only:
            keep = torch.zeros(shape, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != IGNORE          # position t predicts label t+1
            batch["logits_to_keep"] = keep
            batch["shift_labels"] = labels[:, 1:][keep[:, :-1]]   # (number of labels,), row-major like keep
        return batch


def make_collator(tokenizer) -> Collator:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return Collator(pad_id=int(pad))


# --- the builder --------------------------------------------------------------------------------

def check_split_options(cfg: TrainConfig) -> None:
    if cfg.val_file and cfg.val_size:
        raise ZhtuneError("both val_file and val_size are set", where="val_file / val_size",
                          expected="one of them: a validation file, or a fraction/count to hold out")
    if cfg.cutoff_len < 2:
        raise ZhtuneError(f"cutoff_len={cfg.cutoff_len}", where="cutoff_len", expected="at least 2 tokens")


@dataclass
class SftSpec:
    """What stage sft does with records (see data/prepare.py for the protocol)."""

    tokenizer: Any
    template: Any
    fmt: str
    columns: dict
    cutoff_len: int
    train_on_prompt: bool
    packing: bool
    name: str = "sft"

    def __post_init__(self):
        import datasets

        ints = datasets.List(datasets.Value("int32"))
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.features = datasets.Features({"input_ids": ints, "labels": ints})
        self.final_features = datasets.Features({"input_ids": ints, "labels": ints,
                                                 **({"position_ids": ints} if self.packing else {})})

    def key_parts(self) -> dict:
        return {"stage": "sft-samples", "tokenizer": self.fingerprint, "template": self.template, "format": self.fmt,
                "columns": self.columns, "cutoff_len": self.cutoff_len, "train_on_prompt": self.train_on_prompt}

    def final_key_parts(self) -> dict:
        return {"packing": self.packing}

    def tokenise(self, records: Iterator[Record], counts: Counts) -> Iterator[dict]:
        """Records -> {"input_ids", "labels"} batches. Empty answers, and samples with no answer token left
        within cutoff_len, are skipped and counted; longer samples are cut and counted."""
        formats: dict[str, str] = {}
        messages, sources = [], []
        for rec in records:
            file = source_file(rec.source)
            fmt = formats.get(file) or formats.setdefault(file, detect_format(rec, self.fmt))
            msgs = conversation(rec, fmt)
            counts.records += 1
            if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
                counts.skip("empty response", rec.source)
                continue
            messages.append(msgs)
            sources.append(rec.source)
            if len(messages) == BATCH_SAMPLES:
                yield self._encode(messages, sources, counts)
                messages, sources = [], []
        if messages:
            yield self._encode(messages, sources, counts)
        counts.formats = sorted(set(counts.formats) | set(formats.values()))

    def _encode(self, messages: list, sources: list[str], counts: Counts) -> dict:
        out = tokenise_conversations({"messages": messages}, self.tokenizer, self.template, self.cutoff_len,
                                     self.train_on_prompt)
        keep: dict[str, list] = {"input_ids": [], "labels": []}
        for ids, labels, cut, n_labels, source in zip(out["input_ids"], out["labels"], out["truncated"],
                                                       out["n_labels"], sources):
            counts.extra["tokenised"] = counts.extra.get("tokenised", 0) + 1
            counts.extra["longer"] = counts.extra.get("longer", 0) + int(cut)
            if n_labels == 0:
                counts.skip(f"no answer tokens within cutoff_len={self.cutoff_len}", source)
                continue
            if cut:
                counts.truncate(source)
            keep["input_ids"].append(ids)
            keep["labels"].append(labels)
            counts.rows += 1
            counts.tokens += len(ids)
        return keep

    def finisher(self) -> WindowPacker:
        return WindowPacker(self.cutoff_len, self.packing)

    def check(self, counts: Counts, where: str) -> None:
        tokenised = counts.extra.get("tokenised", 0)
        if tokenised and counts.extra.get("longer", 0) == tokenised:
            first = counts.truncated_first or next(iter(counts.skipped.values()), {}).get("first")
            raise ZhtuneError(f"all {tokenised} records are longer than cutoff_len={self.cutoff_len} tokens",
                              where=f"{where} (first: {first})", expected="samples that fit in cutoff_len",
                              hint="raise cutoff_len (alias max_seq_length)")
        if counts.rows == 0:
            raise ZhtuneError("every record was skipped: " + counts.describe_skips(), where=where,
                              expected="records with non-empty answers that fit in cutoff_len")

    def describe_counts(self, counts: Counts) -> dict:
        return {"records": counts.records, "formats": counts.formats, "packing": self.packing,
                "cutoff_len": self.cutoff_len}

    def describe_split(self, n_train: int, n_eval: int) -> dict:
        return {"samples": n_train, "eval_samples": n_eval}

    def describe_flow(self, stats: dict) -> str:
        rows = f"{stats['rows']:,} packed rows ({stats.get('packing_efficiency', 0):.0%} full)" if self.packing \
            else f"{stats['rows']:,} rows"
        held = f" (+{stats['eval_samples']:,} eval samples)" if stats.get("eval_samples") else ""
        return (f"{stats['records']:,} records → {stats['samples']:,} samples → {stats['tokens']:,} tokens "
                f"({stats['label_tokens']:,} with a label) → {rows}{held}")


def build_sft_dataset(cfg: TrainConfig, tokenizer, template) -> DatasetBundle:
    """cfg.dataset (+ val_file / val_size) -> tokenised, label-masked, optionally packed datasets."""
    check_split_options(cfg)
    spec = SftSpec(tokenizer, template, cfg.format, dict(cfg.columns), cfg.cutoff_len, cfg.train_on_prompt,
                   bool(cfg.packing))            # default (None) is off for sft
    train, eval_, stats = prepare(spec, cfg)
    return DatasetBundle(train=train, eval=eval_, collator=make_collator(tokenizer), stats=stats)
