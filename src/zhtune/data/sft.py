"""Instruction-tuning data: conversations -> token ids with the loss on answers only, optionally packed.

Called by `zhtune train stage=sft` as `build_sft_dataset(cfg, tokenizer, template)`. Every record
format becomes [{role, content}] messages and goes through `template.encode_pairs` (the one prompt
formatter). Packing puts several samples in one row with position_ids restarting at 0 per sample
and no attention_mask, so transformers builds a block-diagonal causal mask: no sample sees another,
and the loss of a packed sample equals its loss alone (tests/data/test_packing.py).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from zhtune.config import TrainConfig
from zhtune.data.readers import (
    DatasetBundle, SkipCounter, cache_key, cached_build, detect_format, fingerprint_entries, read_records,
    split_validation, to_messages, tokenizer_fingerprint,
)
from zhtune.errors import ZhtuneError

IGNORE = -100


# --- reading and tokenising ---------------------------------------------------------------------

def load_conversations(entries: list[str], cfg: TrainConfig, skips: SkipCounter, where: str = "dataset"):
    """Records -> (messages per sample, source per sample); structural problems raise, empty answers skip."""
    messages, sources, formats, n_read = [], [], {}, 0
    for rec in read_records(entries, cfg.format, cfg.columns, max_samples=cfg.max_samples, key=where):
        file = rec.source.rsplit(":", 1)[0] if ":" in rec.source else rec.source
        fmt = formats.get(file) or formats.setdefault(file, detect_format(rec, cfg.format))
        if fmt in ("text", "preference"):
            raise ZhtuneError(f"{'plain text' if fmt == 'text' else 'preference pairs'} cannot be used for "
                              "instruction tuning", where=rec.source,
                              expected="alpaca, sharegpt or messages records",
                              hint="stage=pt trains on plain text; preference pairs are for stage=dpo")
        msgs = to_messages(rec, fmt)
        n_read += 1
        if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
            skips.add("empty response", rec.source)
            continue
        messages.append(msgs)
        sources.append(rec.source)
    if not messages:
        raise ZhtuneError("every record was skipped: " + skips.describe(), where=where,
                          expected="records with non-empty answers")
    return messages, sources, {"records": n_read, "formats": sorted(set(formats.values()))}


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


def tokenise_samples(entries: list[str], cfg: TrainConfig, tokenizer, template, skips: SkipCounter, where: str):
    """Files -> a tokenised datasets.Dataset (input_ids, labels, source) and its counts."""
    import datasets

    messages, sources, counts = load_conversations(entries, cfg, skips, where)
    raw = datasets.Dataset.from_dict({"messages": messages, "source": sources})
    ints = datasets.List(datasets.Value("int32"))
    features = datasets.Features({"source": datasets.Value("string"), "input_ids": ints, "labels": ints,
                                  "truncated": datasets.Value("bool"), "n_labels": datasets.Value("int32")})
    ds = raw.map(tokenise_conversations, batched=True, batch_size=256, remove_columns=["messages"],
                 features=features, num_proc=_num_proc(cfg, len(raw)), desc="tokenising 分词",
                 fn_kwargs={"tokenizer": tokenizer, "template": template, "cutoff_len": cfg.cutoff_len,
                            "train_on_prompt": cfg.train_on_prompt})
    truncated = ds.data.column("truncated").to_numpy(zero_copy_only=False)
    n_labels = ds.data.column("n_labels").to_numpy(zero_copy_only=False)
    if truncated.all():
        raise ZhtuneError(f"all {len(ds)} records are longer than cutoff_len={cfg.cutoff_len} tokens",
                          where=f"{where} (first: {sources[0]})", expected="samples that fit in cutoff_len",
                          hint="raise cutoff_len (alias max_seq_length)")
    empty = np.flatnonzero(n_labels == 0)
    if len(empty):
        skips.add(f"no answer tokens within cutoff_len={cfg.cutoff_len}", sources[empty[0]], len(empty))
        ds = ds.select(np.flatnonzero(n_labels > 0))
        if len(ds) == 0:
            raise ZhtuneError("every record was skipped: " + skips.describe(), where=where,
                              expected="samples whose prompt fits in cutoff_len")
    counts["truncated"] = int(truncated[n_labels > 0].sum())
    return ds, counts


def _num_proc(cfg: TrainConfig, n: int) -> int | None:
    workers = cfg.preprocessing_num_workers
    # a worker pool costs seconds to start: only worth it for real datasets
    return workers if workers and workers > 1 and n >= 1000 * workers else None


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


def pack_rows(ds, groups: list[list[int]], columns: tuple[str, ...] = ("input_ids", "labels")):
    """Concatenate the samples of each group into one row, with position_ids restarting per sample.

    ds rows: variable-length lists (flattened with numpy here: no Python loop over tokens).
    groups: the sample indices of each output row.
    """
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    table = ds.with_format("arrow")[:]
    cols = {c: table.column(c).combine_chunks() for c in columns}
    first = cols[columns[0]]
    offsets = first.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    order = np.concatenate([np.asarray(g, dtype=np.int64) for g in groups])
    lens = lengths[order]
    new_start = np.concatenate([[0], np.cumsum(lens)[:-1]])          # where each sample lands
    total = int(lens.sum())
    take = np.arange(total) + np.repeat(offsets[order] - offsets[0] - new_start, lens)   # (total,) gather index
    position = np.arange(total) - np.repeat(new_start, lens)
    ends = np.cumsum([len(g) for g in groups])                        # samples per row -> token offsets
    row_offsets = pa.array(np.concatenate([[0], np.cumsum(lens)[ends - 1]]).astype(np.int32))
    out = {}
    for c in columns:
        values = cols[c].flatten().to_numpy()[take]
        out[c] = pa.ListArray.from_arrays(row_offsets, pa.array(values.astype(np.int32)))
    out["position_ids"] = pa.ListArray.from_arrays(row_offsets, pa.array(position.astype(np.int32)))
    return datasets.Dataset(InMemoryTable(pa.table(out)))


def pack_samples(ds, cutoff_len: int):
    """Samples -> rows of up to cutoff_len tokens (best-fit decreasing), no sample split."""
    lengths = np.asarray(ds.with_format("arrow")[:].column("input_ids").combine_chunks().value_lengths())
    return pack_rows(ds, best_fit_bins(lengths, cutoff_len))


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

def data_stats(ds) -> dict:
    """Token and label counts of a finished dataset (labels that are not -100 = what the loss sees)."""
    if ds is None:
        return {}
    table = ds.with_format("arrow")[:]
    labels = table.column("labels").combine_chunks().flatten().to_numpy()
    return {"rows": len(ds), "tokens": int(len(labels)), "label_tokens": int((labels != IGNORE).sum())}


def check_split_options(cfg: TrainConfig) -> None:
    if cfg.val_file and cfg.val_size:
        raise ZhtuneError("both val_file and val_size are set", where="val_file / val_size",
                          expected="one of them: a validation file, or a fraction/count to hold out")
    if cfg.cutoff_len < 2:
        raise ZhtuneError(f"cutoff_len={cfg.cutoff_len}", where="cutoff_len", expected="at least 2 tokens")


def build_sft_dataset(cfg: TrainConfig, tokenizer, template) -> DatasetBundle:
    """cfg.dataset (+ val_file / val_size) -> tokenised, label-masked, optionally packed datasets."""
    check_split_options(cfg)
    packing = bool(cfg.packing)          # default (None) is off for sft
    key = cache_key({
        "stage": "sft", "data": fingerprint_entries(cfg.dataset, "dataset"),
        "val": fingerprint_entries(cfg.val_file, "val_file") if cfg.val_file else None,
        "tokenizer": tokenizer_fingerprint(tokenizer), "template": template,
        **{k: getattr(cfg, k) for k in ("format", "columns", "max_samples", "cutoff_len", "train_on_prompt",
                                       "val_size", "seed")}, "packing": packing,
    })

    def build():
        skips = SkipCounter()
        train, counts = tokenise_samples(cfg.dataset, cfg, tokenizer, template, skips, "dataset")
        if cfg.val_file:
            eval_, _ = tokenise_samples(cfg.val_file, cfg, tokenizer, template, SkipCounter(), "val_file")
        else:
            train, eval_ = split_validation(train, cfg.val_size, cfg.seed)
        samples = {"samples": len(train), "eval_samples": len(eval_) if eval_ is not None else 0}
        train, eval_ = (None if d is None else d.select_columns(["input_ids", "labels"]) for d in (train, eval_))
        if packing:
            train = pack_samples(train, cfg.cutoff_len)
            eval_ = pack_samples(eval_, cfg.cutoff_len) if eval_ is not None else None
        stats = {"stage": "sft", **counts, "skipped": skips.skipped, **samples, "packing": packing,
                 "cutoff_len": cfg.cutoff_len, **data_stats(train),
                 "eval": data_stats(eval_)}
        if packing:
            stats["packing_efficiency"] = round(stats["tokens"] / (stats["rows"] * cfg.cutoff_len), 4)
        return train, eval_, stats

    train, eval_, stats = cached_build(cfg.data_cache, f"sft-{key}", build)
    return DatasetBundle(train=train, eval=eval_, collator=make_collator(tokenizer), stats=stats)
