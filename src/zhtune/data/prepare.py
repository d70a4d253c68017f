"""Preparing a stage's data at corpus scale: sources -> units tokenised in parallel into the cache (datasets.map
with num_proc, one arrow file per unit), then one ordered pass that holds out the validation rows and writes
the final rows (pt blocks, sft samples or packed rows, dpo pairs); progress with ETA and tokens/s; a summary.

Called by pretrain.py / sft.py / preference.py as `prepare(spec, cfg)`; a `spec` says what a stage does:

    spec.name                  "pt" | "sft" | "dpo"
    spec.key_parts()           what decides a unit's rows (tokenizer, template, cutoff_len, ...)
    spec.features              the unit rows (datasets.Features)
    spec.tokenise(records, counts) -> batches (dict of lists) of unit rows; counts skips and truncation
    spec.finisher()            -> object with add(table) / flush() -> final pa.Tables, and stats() -> dict
    spec.check(counts, where)  stage rules on the totals (e.g. every record longer than cutoff_len)

Memory: a worker holds one batch of records and its tokens; the ordered pass holds one arrow batch (and sft
packing one window); nothing is as long as the corpus. A unit that finished is kept in the cache, so a
killed or failed preparation redoes only the units it had not finished.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from zhtune.config import TrainConfig
from zhtune.data.cache import (TAKEOVER_S, DamagedCache, atomic_folder, build_once, cache_key, cache_root,
                               clean_stale_tmps, discard, folder_bytes, human_bytes, load_split, may_build, read_json)
from zhtune.data.files import Unit, find_sources, plan_units
from zhtune.data.readers import unit_records
from zhtune.errors import ZhtuneError

IGNORE = -100
SHARD_TOKENS = 256 << 20             # a final arrow file holds at most this many tokens (~3 GB for pt blocks)


@dataclass
class DatasetBundle:
    """What a builder hands the Trainer.

    train / eval rows hold `input_ids` and `labels` (-100 = no loss), plus `position_ids` when
    packed. The collator pads a batch: packed rows get position_ids that restart at 0 for every
    sample and NO attention_mask, so transformers builds a block-diagonal causal mask (samples
    never attend to each other). That detection is skipped when the model makes a KV cache, so
    train with `model.config.use_cache = False` (or gradient checkpointing, which forces it).
    train is a memory-mapped datasets.Dataset, or with streaming=true a torch IterableDataset
    (data/streaming.py) whose `callbacks` keep its position in the checkpoints.
    """

    train: Any
    eval: Any                        # datasets.Dataset | None
    collator: Callable[[list[dict]], dict] | None
    stats: dict = field(default_factory=dict)
    callbacks: list = field(default_factory=list)


@dataclass
class Counts:
    """What reading and tokenising found, per unit and in total (kept in each unit's meta.json)."""

    records: int = 0
    rows: int = 0
    tokens: int = 0
    skipped: dict = field(default_factory=dict)        # reason -> {"count": n, "first": "file:line"}
    truncated: int = 0
    truncated_first: str | None = None
    formats: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)          # stage-specific totals (summed)
    strict: bool = False

    def skip(self, reason: str, source: str, n: int = 1) -> None:
        if self.strict:
            raise ZhtuneError(f"record skipped: {reason}", where=source,
                              expected="every record usable (strict=true turns skipped records into errors)",
                              hint="fix or remove the record, or set strict=false to skip and count such records")
        entry = self.skipped.setdefault(reason, {"count": 0, "first": source})
        entry["count"] += n

    def truncate(self, source: str, n: int = 1) -> None:
        self.truncated += n
        self.truncated_first = self.truncated_first or source

    def add(self, other: "Counts") -> None:
        self.records += other.records
        self.rows += other.rows
        self.tokens += other.tokens
        for reason, entry in other.skipped.items():
            mine = self.skipped.setdefault(reason, {"count": 0, "first": entry["first"]})
            mine["count"] += entry["count"]
        self.truncated += other.truncated
        self.truncated_first = self.truncated_first or other.truncated_first
        self.formats = sorted(set(self.formats) | set(other.formats))
        for key, value in other.extra.items():
            self.extra[key] = self.extra.get(key, 0) + value

    def describe_skips(self) -> str:
        return "; ".join(f"{k}: {v['count']} (first at {v['first']})" for k, v in self.skipped.items())

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("strict")
        return out


# --- units: read + tokenise, in parallel, each into its own cache folder --------------------------------

def _unit_folder(units_dir: Path, unit: Unit) -> Path:
    return units_dir / unit.key


def unit_counts(folder: Path) -> Counts:
    """A finished unit's Counts (its meta.json), or DamagedCache naming the unit's folder."""
    try:
        return Counts(**read_json(folder / "meta.json", folder))
    except TypeError as exc:                       # keys that are not Counts' fields
        raise DamagedCache(folder, f"meta.json has other fields ({exc})") from None


def build_unit(unit: Unit, spec, cfg: TrainConfig, units_dir: Path) -> Counts:
    """Read and tokenise one unit into units_dir/<key>/ (data.arrow + meta.json); the cached one if done."""
    from datasets.arrow_writer import ArrowWriter

    final = _unit_folder(units_dir, unit)
    if (final / "meta.json").is_file():
        return unit_counts(final)
    counts = Counts(strict=cfg.strict)
    with atomic_folder(final) as tmp:
        writer = ArrowWriter(features=spec.features, path=str(tmp / "data.arrow"))
        records = unit_records(unit, cfg.format, cfg.columns)
        last = time.monotonic()
        for batch in spec.tokenise(records, counts):
            writer.write_batch(batch)
            if time.monotonic() - last > 1:            # for the progress line of the main process
                (tmp / "progress").write_text(str(counts.tokens))
                last = time.monotonic()
        writer.finalize()
        (tmp / "meta.json").write_text(json.dumps(counts.to_json(), ensure_ascii=False), encoding="utf-8")
    return counts


def _build_batch(batch: dict, units: list[Unit], spec, cfg: TrainConfig, units_dir: str) -> dict:
    for i in batch["unit"]:
        build_unit(units[i], spec, cfg, Path(units_dir))
    return {}


def build_units(units: list[Unit], spec, cfg: TrainConfig, units_dir: Path, say: Callable[[str], None]) -> int:
    """Every unit not in the cache yet, through datasets.map with num_proc (a unit per call); the number
    of tokens this made."""
    import datasets

    todo = [u for u in units if not (_unit_folder(units_dir, u) / "meta.json").is_file()]
    reused = len(units) - len(todo)
    if reused and todo:
        say(f"续做 resuming: {reused} of {len(units)} parts are already in the cache")
    if not todo:
        return 0
    num_proc = min(cfg.preprocessing_num_workers or 1, len(todo))
    plan = datasets.Dataset.from_dict({"unit": list(range(len(todo)))})
    progress = Progress(todo, units_dir, say)
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        plan.map(_build_batch, batched=True, batch_size=1, num_proc=num_proc if num_proc > 1 else None,
                 fn_kwargs={"units": todo, "spec": spec, "cfg": cfg, "units_dir": str(units_dir)},
                 keep_in_memory=True, remove_columns=["unit"],
                 new_fingerprint=cache_key({"plan": [u.key for u in todo]}))
    finally:
        progress.stop()
        if enabled:
            datasets.enable_progress_bars()
    return sum(progress.done.values())


class Progress:
    """A progress bar over input bytes (ETA) with tokens/s, fed by the units' folders in the cache."""

    def __init__(self, todo: list[Unit], units_dir: Path, say: Callable[[str], None]):
        from tqdm.auto import tqdm

        self.todo = {u.key: u.nbytes for u in todo}
        self.units_dir, self.start = units_dir, time.monotonic()
        self.bar = tqdm(total=sum(self.todo.values()), unit="B", unit_scale=True, unit_divisor=1000,
                        desc="分词 tokenising", file=sys.stderr, mininterval=1 if sys.stderr.isatty() else 30)
        self.done: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        running = 0
        for entry in os.scandir(self.units_dir):
            name = entry.name
            if name in self.todo and name not in self.done:
                meta = Path(entry.path) / "meta.json"
                try:
                    self.done[name] = json.loads(meta.read_text(encoding="utf-8"))["tokens"]
                except (OSError, ValueError, KeyError, TypeError):
                    continue                         # not finished yet (or damaged: reading it names it)
                self.bar.update(self.todo[name])
            elif name.startswith(".") and ".tmp-" in name:
                with_progress = Path(entry.path) / "progress"
                try:
                    running += int(with_progress.read_text() or 0)
                except (OSError, ValueError):
                    pass
        tokens = sum(self.done.values()) + running
        self.bar.set_postfix_str(f"{tokens / max(1e-9, time.monotonic() - self.start):,.0f} tokens/s", refresh=False)

    def _run(self) -> None:
        while not self._stop.wait(2):
            self._poll()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        self.bar.close()


def unit_tables(units_dir: Path, unit: Unit) -> Iterator:
    """The record batches of a finished unit, memory-mapped."""
    import pyarrow as pa

    folder = _unit_folder(units_dir, unit)
    try:
        with pa.memory_map(str(folder / "data.arrow")) as source:
            yield from pa.ipc.open_stream(source)
    except (pa.ArrowException, OSError) as exc:
        raise DamagedCache(folder, f"data.arrow unreadable ({exc})") from None


# --- the ordered pass: hold out validation rows, write the final rows ----------------------------------

class SplitWriter:
    """Final rows of one split -> folder/data-00000.arrow, ... (a new file every SHARD_TOKENS tokens)."""

    def __init__(self, folder: Path, features):
        self.folder, self.features = folder, features
        self.writer, self.files, self.shard_tokens = None, 0, 0
        self.rows = self.tokens = self.label_tokens = 0
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, table) -> None:
        import pyarrow.compute as pc
        from datasets.arrow_writer import ArrowWriter

        if table is None or table.num_rows == 0:
            return
        if self.writer is None or self.shard_tokens >= SHARD_TOKENS:
            self.close()
            self.writer = ArrowWriter(features=self.features, path=str(self.folder / f"data-{self.files:05d}.arrow"))
            self.files += 1
            self.shard_tokens = 0
        self.writer.write_table(table)
        n = int(pc.sum(pc.list_value_length(table.column(table.column_names[0]))).as_py() or 0)
        self.rows += table.num_rows
        self.tokens += n
        self.shard_tokens += n
        if "labels" in table.column_names:
            flat = pc.list_flatten(table.column("labels"))
            self.label_tokens += int(pc.sum(pc.not_equal(flat, IGNORE).cast("int64")).as_py() or 0)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.finalize()
            self.writer = None

    def stats(self) -> dict:
        return {"rows": self.rows, "tokens": self.tokens, "label_tokens": self.label_tokens}


def split_sizes(n: int, val_size: float, where: str = "val_size") -> int:
    """How many of n samples to hold out: a fraction (<1) or a count (>=1); at least one stays for training."""
    if val_size <= 0:
        return 0
    n_val = max(1, round(n * val_size)) if val_size < 1 else int(val_size)
    if n_val >= n:
        raise ZhtuneError(f"val_size={val_size} holds out {n_val} of {n} samples, leaving none to train on",
                          where=where, expected="a fraction below 1 or a count smaller than the number of samples")
    return n_val


def held_out(n: int, val_size: float, seed: int):
    """The sorted indices of the rows held out for evaluation (seeded); memory grows with them, not with n,
    unless they are more than 2% of n (numpy's choice then permutes all n)."""
    import numpy as np

    n_val = split_sizes(n, val_size)
    return np.sort(np.random.default_rng(seed).choice(n, n_val, replace=False)) if n_val else np.empty(0, np.int64)


def _route(table, first_row: int, held) -> tuple[Any, Any]:
    """(train part, eval part) of a batch whose first row is row `first_row` of the corpus."""
    import numpy as np

    lo, hi = np.searchsorted(held, [first_row, first_row + table.num_rows])
    if lo == hi:
        return table, None
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[held[lo:hi] - first_row] = True
    return table.filter(~mask), table.filter(mask)


def finish(units: list[Unit], val_units: list[Unit], spec, units_dir: Path, out: Path, held) -> dict:
    """Units in order -> final train (and eval) rows in out/train, out/eval; their stats."""
    train, evals = SplitWriter(out / "train", spec.final_features), None
    pack_train, pack_eval = spec.finisher(), spec.finisher()
    if len(held) or val_units:
        evals = SplitWriter(out / "eval", spec.final_features)
    import pyarrow as pa

    row = 0
    for unit in units:
        for batch in unit_tables(units_dir, unit):
            table = pa.Table.from_batches([batch])
            keep, hold = _route(table, row, held)
            row += table.num_rows
            train.write(pack_train.add(keep))
            if hold is not None:
                evals.write(pack_eval.add(hold))
    for unit in val_units:
        for batch in unit_tables(units_dir, unit):
            evals.write(pack_eval.add(pa.Table.from_batches([batch])))
    train.write(pack_train.flush())
    train.close()
    stats = {**train.stats(), **pack_train.stats()}
    if evals is not None:
        evals.write(pack_eval.flush())
        evals.close()
        return {**stats, "eval": {**evals.stats(), **pack_eval.stats()}}
    return {**stats, "eval": {}}


# --- the whole preparation ---------------------------------------------------------------------------

def _say(text: str) -> None:
    print(text, flush=True)


def _totals(units: list[Unit], units_dir: Path, entries: list[str], key: str) -> Counts:
    total, per_entry = Counts(), {}
    for unit in units:
        meta = unit_counts(_unit_folder(units_dir, unit))
        total.add(meta)
        per_entry[unit.entry] = per_entry.get(unit.entry, 0) + meta.records
    for i, entry in enumerate(entries):
        if not per_entry.get(i):
            raise ZhtuneError(f"no records in {entry}", where=f"{key}[{i}]: {entry}",
                              expected="a non-empty data file or folder")
    return total


def _check_strict(skipped: dict, cfg: TrainConfig, where: str) -> None:
    if cfg.strict and skipped:
        raise ZhtuneError("records were skipped: " + Counts(skipped=skipped).describe_skips(), where=where,
                          expected="every record usable (strict=true turns skipped records into errors)",
                          hint="fix or remove those records, or set strict=false to skip and count them")


def _keyed(units: list[Unit], spec) -> list[Unit]:
    parts = spec.key_parts()
    for unit in units:
        unit.key = f"{spec.name}-" + cache_key({**parts, "segments": [s.fingerprint() for s in unit.segments],
                                                "limit": unit.limit})
    return units


def build(tmp: Path, spec, cfg: TrainConfig, root: Path, say: Callable[[str], None]) -> None:
    """Plan, tokenise the units, check the totals, hold out validation rows, write the final rows."""
    start = time.monotonic()
    units_dir = root / "units"
    units_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_tmps(units_dir)
    plans = root / "plans"
    units = _keyed(plan_units(cfg.dataset, "dataset", cfg.max_samples, plans), spec)
    val_units = _keyed(plan_units(cfg.val_file, "val_file", cfg.max_samples, plans), spec) if cfg.val_file else []
    tokenised = build_units(units + val_units, spec, cfg, units_dir, say)
    counts = _totals(units, units_dir, cfg.dataset, "dataset")
    _check_strict(counts.skipped, cfg, "dataset")
    spec.check(counts, "dataset")
    val_counts = Counts()
    if val_units:
        val_counts = _totals(val_units, units_dir, cfg.val_file, "val_file")
        _check_strict(val_counts.skipped, cfg, "val_file")
        spec.check(val_counts, "val_file")
    held = held_out(counts.rows, cfg.val_size, cfg.seed) if not val_units else held_out(0, 0, 0)
    finished = finish(units, val_units, spec, units_dir, tmp, held)
    stats = {"stage": spec.name, **spec.describe_counts(counts), "skipped": counts.skipped,
             "eval_skipped": val_counts.skipped, "truncated": counts.truncated,
             "truncated_first": counts.truncated_first,
             **spec.describe_split(counts.rows - len(held), len(held) if not val_units else val_counts.rows),
             **finished, "seconds": round(time.monotonic() - start, 1), "tokenised_tokens": tokenised}
    (tmp / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=1), encoding="utf-8")


def source_key(cfg: TrainConfig) -> dict:
    """What identifies the inputs without reading them: every source's path, size and modification stamp."""
    def entries(paths: list[str], key: str) -> list:
        return [[s.fingerprint() for s in find_sources(str(p), f"{key}[{i}]: {p}")] for i, p in enumerate(paths)]

    if not cfg.dataset:
        raise ZhtuneError("no training data given", where="dataset",
                          expected="one or more files or folders, e.g. dataset=[data/train.jsonl]")
    return {"data": entries(cfg.dataset, "dataset"), "val": entries(cfg.val_file, "val_file") if cfg.val_file else None,
            **{k: getattr(cfg, k) for k in ("format", "columns", "max_samples", "val_size", "seed")}}


def prepare(spec, cfg: TrainConfig) -> tuple[Any, Any, dict]:
    """(train, eval, stats) for `spec` from cfg.dataset: from the cache when nothing that decides the rows
    changed, else built once (this process or another one) and then loaded memory-mapped."""
    if cfg.val_file and cfg.val_size:
        raise ZhtuneError("both val_file and val_size are set", where="val_file / val_size",
                          expected="one of them: a validation file, or a fraction/count to hold out")
    root = cache_root(cfg.data_cache)
    name = f"{spec.name}-" + cache_key({**source_key(cfg), **spec.key_parts(), **spec.final_key_parts()})
    final = root / name
    say = _say if may_build() else (lambda text: None)
    discarded: set[Path] = set()
    waited_since = time.monotonic()
    while True:
        try:
            train, eval_, stats, status = _build_and_load(spec, cfg, root, final, say)
            break
        except DamagedCache as exc:
            # a damaged entry or unit (cut short, edited, a disk error) is stale: the builder removes and
            # rebuilds it once; the other ranks wait for that (a second time means something else is wrong)
            if may_build() and exc.folder not in discarded:
                say(f"缓存损坏 the data cache is damaged ({exc.detail}); rebuilding {exc.folder}")
                discarded.add(exc.folder)
                discard(exc.folder)
                continue
            if not may_build() and time.monotonic() - waited_since < TAKEOVER_S:
                time.sleep(2)
                continue
            raise ZhtuneError(f"the data cache is damaged: {exc.detail}", where=str(exc.folder),
                              expected="a cache folder written by zhtune",
                              hint=f"delete {exc.folder} (it is rebuilt), or point data_cache at another disk") \
                from None
    _check_strict(stats.get("skipped", {}), cfg, "dataset")      # also when the cache was built without strict
    _check_strict(stats.get("eval_skipped", {}), cfg, "val_file")
    stats.update(cache={"hit": "hit", "built": "miss", "waited": "waited"}[status], cache_dir=str(final))
    if os.environ.get("RANK", "0") == "0":
        say(summary(stats, spec, status, final))
    return train, eval_, stats


def _build_and_load(spec, cfg: TrainConfig, root: Path, final: Path, say) -> tuple[Any, Any, dict, str]:
    """build_once + reading the entry back: (train, eval, stats, status); DamagedCache for what is unreadable."""
    try:
        status = build_once(final, lambda tmp: build(tmp, spec, cfg, root, say), say)
    except PermissionError as exc:
        raise ZhtuneError(f"cannot write the data cache: {exc}", where="data_cache",
                          expected="a writable folder", hint="set data_cache=DIR (or $ZHTUNE_DATA_CACHE)") from None
    stats = read_json(final / "stats.json", final)
    if stats.get("stage") != spec.name or not all(isinstance(stats.get(k), int) for k in ("rows", "tokens")):
        raise DamagedCache(final, "stats.json lacks the stage, rows or tokens it is written with")
    train = load_split(final / "train")
    eval_ = load_split(final / "eval") if (final / "eval").is_dir() else None
    return train, eval_, stats, status


def summary(stats: dict, spec, status: str, final: Path) -> str:
    """The data block printed before training: counts, skips and truncation with their first file:line,
    time and tokens/s, the cache folder and its size."""
    took = ""
    if status == "built":
        took = f" in {stats['seconds']:.0f}s"
        if stats.get("tokenised_tokens") and stats["seconds"] >= 1:
            took += f" ({stats['tokenised_tokens'] / stats['seconds']:,.0f} tokens/s)"
    lines = [f"数据 data ({spec.name}): " + spec.describe_flow(stats) + took]
    for reason, entry in stats.get("skipped", {}).items():
        lines.append(f"  跳过 skipped: {entry['count']:,} × {reason} (first at {entry['first']})")
    if stats.get("truncated"):
        lines.append(f"  截断 truncated: {stats['truncated']:,} × longer than cutoff_len={stats.get('cutoff_len')} "
                     f"tokens, cut at the end (first at {stats['truncated_first']})")
    word = {"hit": "reused 复用", "waited": "built by another process", "built": "built 新建"}[status]
    lines.append(f"  缓存 cache: {final} ({human_bytes(folder_bytes(final))}, {word}; "
                 f"tokenised parts in {final.parent / 'units'})")
    return "\n".join(lines)


def batched(iterable, n: int) -> Iterator[list]:
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield chunk
