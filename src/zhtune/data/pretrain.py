"""Continued pre-training data: plain-text documents -> token blocks of cutoff_len, EOS between documents.

Called by `zhtune train stage=pt` as `build_pretrain_dataset(cfg, tokenizer)`. Documents are a line of
a .txt file or the `text` field of a .json/.jsonl record. With packing (the default for pt) the
documents are concatenated and cut into blocks of exactly cutoff_len tokens; position_ids restart
at every document start, so a document never attends to the one before it in the block.
Without packing each document is its own row (long ones split into cutoff_len pieces).
"""

from __future__ import annotations

import numpy as np

from zhtune.config import TrainConfig
from zhtune.data.readers import (
    DatasetBundle, SkipCounter, cache_key, cached_build, detect_format, fingerprint_entries, read_records,
    split_validation, to_text, tokenizer_fingerprint,
)
from zhtune.data.sft import IGNORE, check_split_options, data_stats, make_collator, _num_proc
from zhtune.errors import ZhtuneError


def load_documents(entries: list[str], cfg: TrainConfig, skips: SkipCounter, where: str) -> tuple[list[str], int]:
    """Records -> document texts; blank documents are skipped and counted."""
    texts, n_read = [], 0
    for rec in read_records(entries, cfg.format, cfg.columns, max_samples=cfg.max_samples, key=where):
        fmt = detect_format(rec, cfg.format)
        if fmt != "text":
            raise ZhtuneError(f"a {fmt} record in pre-training data", where=rec.source,
                              expected="plain text: .txt lines or {\"text\": ...} records",
                              hint="stage=sft trains on instruction data; "
                                   "or map your text field with columns={text: yours}")
        text = to_text(rec)
        n_read += 1
        if not text.strip():
            skips.add("empty text", rec.source)
            continue
        texts.append(text)
    if not texts:
        raise ZhtuneError("every document is empty", where=where, expected="non-empty lines or text fields")
    return texts, n_read


def tokenise_documents(batch: dict, tokenizer) -> dict:
    """datasets.map (batched): text -> ids with BOS as the tokenizer adds it and EOS at the end."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(batch["text"], add_special_tokens=True)["input_ids"]
    if eos is not None:
        ids = [x if x and x[-1] == eos else x + [eos] for x in ids]
    return {"input_ids": ids}


def make_blocks(ds, cutoff_len: int, packing: bool):
    """Tokenised documents -> rows (input_ids, labels[, position_ids]), vectorised with numpy.

    The first token of every document gets label -100: it is not predicted from the previous
    document's EOS, so a packed block trains exactly what the documents would train alone.
    """
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    col = ds.with_format("arrow")[:].column("input_ids").combine_chunks()
    flat = col.flatten().to_numpy().astype(np.int32)                      # (total,)
    lengths = np.asarray(col.value_lengths(), dtype=np.int64)             # (docs,)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    total = int(lengths.sum())
    labels = flat.copy()
    labels[starts] = IGNORE
    doc_start = np.repeat(starts, lengths)                                # (total,) start of each token's doc
    if packing:
        row_starts = np.arange(0, total, cutoff_len)
        block_start = np.arange(total) // cutoff_len * cutoff_len
        position = np.arange(total) - np.maximum(doc_start, block_start)
    else:
        pieces = -(-lengths // cutoff_len)                                 # ceil: pieces per document
        within = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        row_starts = np.repeat(starts, pieces) + within * cutoff_len
    offsets = pa.array(np.concatenate([row_starts, [total]]).astype(np.int32))
    out = {"input_ids": pa.ListArray.from_arrays(offsets, pa.array(flat)),
           "labels": pa.ListArray.from_arrays(offsets, pa.array(labels))}
    if packing:
        out["position_ids"] = pa.ListArray.from_arrays(offsets, pa.array(position.astype(np.int32)))
    return datasets.Dataset(InMemoryTable(pa.table(out)))


def tokenise_corpus(entries: list[str], cfg: TrainConfig, tokenizer, skips: SkipCounter, where: str):
    import datasets

    texts, n_read = load_documents(entries, cfg, skips, where)
    raw = datasets.Dataset.from_dict({"text": texts})
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
    ds = raw.map(tokenise_documents, batched=True, batch_size=512, remove_columns=["text"], features=features,
                 num_proc=_num_proc(cfg, len(raw)), fn_kwargs={"tokenizer": tokenizer}, desc="tokenising 分词")
    return ds, n_read


def build_pretrain_dataset(cfg: TrainConfig, tokenizer) -> DatasetBundle:
    """cfg.dataset (+ val_file / val_size, split by document) -> blocks of cutoff_len tokens."""
    check_split_options(cfg)
    packing = True if cfg.packing is None else bool(cfg.packing)
    key = cache_key({
        "stage": "pt", "data": fingerprint_entries(cfg.dataset, "dataset"),
        "val": fingerprint_entries(cfg.val_file, "val_file") if cfg.val_file else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        **{k: getattr(cfg, k) for k in ("format", "columns", "max_samples", "cutoff_len", "val_size", "seed")},
        "packing": packing,
    })

    def build():
        skips = SkipCounter()
        train, n_read = tokenise_corpus(cfg.dataset, cfg, tokenizer, skips, "dataset")
        if cfg.val_file:
            eval_, _ = tokenise_corpus(cfg.val_file, cfg, tokenizer, SkipCounter(), "val_file")
        else:
            train, eval_ = split_validation(train, cfg.val_size, cfg.seed)
        docs = {"documents": len(train), "eval_documents": len(eval_) if eval_ is not None else 0}
        train = make_blocks(train, cfg.cutoff_len, packing)
        eval_ = make_blocks(eval_, cfg.cutoff_len, packing) if eval_ is not None else None
        stats = {"stage": "pt", "records": n_read, "skipped": skips.skipped, "truncated": 0, **docs,
                 "packing": packing, "cutoff_len": cfg.cutoff_len, **data_stats(train), "eval": data_stats(eval_)}
        return train, eval_, stats

    train, eval_, stats = cached_build(cfg.data_cache, f"pt-{key}", build)
    return DatasetBundle(train=train, eval=eval_, collator=make_collator(tokenizer), stats=stats)
