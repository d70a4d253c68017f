"""Training data in: files, folders or Hub datasets -> validated records that name their file:line.

Used by `zhtune train` through `build_pretrain_dataset` / `build_sft_dataset`; on its own:

    for rec in read_records(["data/alpaca_zh.json"]):
        print(rec.source, to_messages(rec, detect_format(rec, "sft")))

Also holds what the PT and SFT builders share: the DatasetBundle they return, the on-disk cache
under `data_cache` (keyed by the inputs, written atomically), and the validation split.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from zhtune.errors import ZhtuneError

DATA_VERSION = 1                     # bump when tokenisation/packing changes, so old caches are not reused
SUFFIXES = (".txt", ".json", ".jsonl")
FORMATS = ("text", "alpaca", "sharegpt", "messages", "preference")
USER_ROLES = {"user": "user", "human": "user"}
ASSISTANT_ROLES = {"assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bot": "assistant",
                   "model": "assistant"}


@dataclass
class Record:
    source: str                      # "file:line" (or "name[index]" for a Hub dataset)
    data: dict


@dataclass
class DatasetBundle:
    """What a builder hands the Trainer.

    train / eval rows hold `input_ids` and `labels` (-100 = no loss), plus `position_ids` when
    packed. The collator pads a batch: packed rows get position_ids that restart at 0 for every
    sample and NO attention_mask, so transformers builds a block-diagonal causal mask (samples
    never attend to each other). That detection is skipped when the model makes a KV cache, so
    train with `model.config.use_cache = False` (or gradient checkpointing, which forces it).
    """

    train: Any                       # datasets.Dataset
    eval: Any                        # datasets.Dataset | None
    collator: Callable[[list[dict]], dict]
    stats: dict = field(default_factory=dict)


# --- finding files ------------------------------------------------------------------------------

def _looks_like_hub_id(entry: str) -> bool:
    """owner/name, and not a path: a value whose first part is a local folder (data/train when data/ exists)
    or that starts with ./ ../ / ~ is never sent to the Hub (that cost a 36 s timeout with no network)."""
    from zhtune.io import looks_like_local_path

    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", entry)) and Path(entry).suffix not in SUFFIXES \
        and not looks_like_local_path(entry)


def resolve_entry(entry: str, where: str) -> list[Path] | str:
    """A dataset entry -> its files (folders recursively, sorted), or the name of a Hub dataset."""
    path = Path(entry).expanduser()
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise ZhtuneError(f"unsupported data file type: {path}", where=where,
                              expected="a .txt (one document per line), .json or .jsonl file")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise ZhtuneError(f"no .txt/.json/.jsonl files in folder {path}", where=where,
                              expected="a folder holding training files")
        return files
    if _looks_like_hub_id(entry):
        return entry
    raise ZhtuneError(f"dataset path not found: {entry}", where=where,
                      expected="an existing file or folder (.txt, .json, .jsonl) or a Hub dataset name like owner/name")


def fingerprint_entries(entries: list[str], where: str) -> list:
    """What identifies the inputs for the cache: each file's path, size and mtime (or the Hub name)."""
    out = []
    for i, entry in enumerate(entries):
        files = resolve_entry(entry, f"{where}[{i}]")
        if isinstance(files, str):
            out.append(["hub", files])
        else:
            out.append([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    return out


# --- reading files ------------------------------------------------------------------------------

def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ZhtuneError(f"not UTF-8 text ({exc.reason})", where=f"{path}:{lineno}",
                          expected="UTF-8 encoded text") from None
    return text.lstrip("\ufeff") if lineno == 1 else text


def _iter_txt(path: Path, text_field: str) -> Iterator[Record]:
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            yield Record(f"{path}:{lineno}", {text_field: _decode(raw, path, lineno).rstrip("\r\n")})


def _iter_jsonl(path: Path) -> Iterator[Record]:
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            line = _decode(raw, path, lineno).strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ZhtuneError(f"malformed JSON: {exc.msg} (column {exc.colno})", where=f"{path}:{lineno}",
                                  expected="one JSON object per line") from None
            yield Record(f"{path}:{lineno}", obj)


def _iter_json(path: Path) -> Iterator[Record]:
    """A .json file: a list of objects (each named by the line it starts on), one object, or JSON lines."""
    text = _decode(path.read_bytes(), path, 1)
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if text[pos:pos + 1] != "[":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":      # several objects, one per line: a .jsonl named .json
                yield from _iter_jsonl(path)
                return
            raise ZhtuneError(f"malformed JSON: {exc.msg} (column {exc.colno})", where=f"{path}:{exc.lineno}",
                              expected="a JSON list of objects, or one object per line") from None
        yield Record(f"{path}:{text.count(chr(10), 0, pos) + 1}", obj)
        return
    pos += 1
    lineno, last = 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        lineno += text.count("\n", last, pos)
        last = pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ZhtuneError(f"malformed JSON: {exc.msg} (column {exc.colno})", where=f"{path}:{exc.lineno}",
                              expected="a JSON list of objects") from None
        yield Record(f"{path}:{lineno}", obj)
    if pos >= len(text):
        raise ZhtuneError("malformed JSON: the list is not closed with ']'", where=f"{path}:{text.count(chr(10)) + 1}",
                          expected="a JSON list of objects")


def _iter_hub(name: str, where: str) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:  # noqa: BLE001 - offline, private, misspelt: all the user's to fix
        raise ZhtuneError(f"dataset {name!r} is not a local path and could not be loaded from the Hub: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", where=where,
                          expected="an existing file or folder, or a Hub dataset name (needs network)") from None
    for i, row in enumerate(ds):
        yield Record(f"{name}[{i}]", dict(row))


def _rename(obj: Any, columns: dict[str, str]) -> Any:
    """Apply {our_name: their_name} to a record and to the dicts inside its lists (conversations)."""
    if not isinstance(obj, dict):
        return obj
    out = dict(obj)
    for ours, theirs in columns.items():
        if theirs in out and ours not in obj:
            out[ours] = out.pop(theirs)
    for key, value in out.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            out[key] = [_rename(v, columns) for v in value]
    return out


def read_records(paths: list[str], fmt: str = "auto", columns: dict | None = None, text_field: str = "text",
                 max_samples: int | None = None, *, key: str = "dataset") -> Iterator[Record]:
    """Records from every entry in `paths` (at most `max_samples` per entry), columns renamed to ours.

    .txt files give one {text_field: line} record per line; `fmt` other than auto/text refuses them.
    `key` is the config key the paths came from (dataset, val_file), for error messages.
    """
    if not paths:
        raise ZhtuneError("no training data given", where=key,
                          expected="one or more files or folders, e.g. dataset=[data/train.jsonl]")
    columns = dict(columns or {})
    for i, entry in enumerate(paths):
        where = f"{key}[{i}]: {entry}"
        files = resolve_entry(str(entry), where)
        # generators: a file is opened only when the records before it did not reach max_samples
        sources = [_iter_hub(files, where)] if isinstance(files, str) else (_open(p, fmt, text_field) for p in files)
        count = 0
        for rec in itertools.islice(itertools.chain.from_iterable(sources), max_samples):
            if not isinstance(rec.data, dict):
                raise ZhtuneError(f"record is a JSON {type(rec.data).__name__}, not an object",
                                  where=rec.source, expected="one JSON object per record")
            count += 1
            yield Record(rec.source, _rename(rec.data, columns) if columns else rec.data)
        if count == 0:
            raise ZhtuneError(f"no records in {entry}", where=where, expected="a non-empty data file or folder")


def _open(path: Path, fmt: str, text_field: str) -> Iterator[Record]:
    if path.suffix == ".txt":
        if fmt not in ("auto", "text"):
            raise ZhtuneError(f"a .txt file holds plain text, but format={fmt}", where=str(path),
                              expected="format=text (or auto) for .txt, or a .json/.jsonl file for " + fmt)
        return _iter_txt(path, text_field)
    return _iter_jsonl(path) if path.suffix == ".jsonl" else _iter_json(path)


# --- record formats -----------------------------------------------------------------------------

def detect_format(rec: Record, fmt: str = "auto", text_field: str = "text") -> str:
    """The record format from its keys (or `fmt` when given): text | alpaca | sharegpt | messages | preference."""
    if fmt != "auto":
        return fmt
    keys = set(rec.data)
    if "chosen" in keys and "rejected" in keys:
        return "preference"
    if "messages" in keys:
        return "messages"
    if keys & {"conversations", "conversation"} or {"human", "assistant"} <= keys:
        return "sharegpt"
    if "instruction" in keys:
        return "alpaca"
    if text_field in keys:
        return "text"
    raise ZhtuneError(f"cannot tell the record format from its keys {sorted(keys)}", where=rec.source,
                      expected=f"'{text_field}' (text), instruction/input/output (alpaca), conversations (sharegpt), "
                               "messages (OpenAI)", hint="map your field names with columns={ours: yours}, "
                                                         "or set format=")


def _field(rec: Record, key: str, required: bool = True, kinds: tuple = (str,), what: str = "a string") -> Any:
    value = rec.data.get(key)
    if value is None:
        if required and key in rec.data:  # present but null: not a naming problem
            raise ZhtuneError(f"field {key!r} is null", where=rec.source, expected=f"{key}: {what}")
        if required:
            raise ZhtuneError(f"record has no {key!r} field (keys: {sorted(rec.data)})", where=rec.source,
                              expected=f"{key}: {what}", hint="map your field names with columns={ours: yours}")
        return None
    if not isinstance(value, kinds):
        raise ZhtuneError(f"field {key!r} is a {type(value).__name__}", where=rec.source, expected=f"{key}: {what}")
    return value


def to_text(rec: Record, text_field: str = "text") -> str:
    """The document of a pre-training record."""
    return _field(rec, text_field, what="the document text")


def to_messages(rec: Record, fmt: str) -> list[dict]:
    """Any SFT record -> [{role, content}, ...]: optional system, then user/assistant alternating,
    ending with an assistant turn (a trailing user turn is dropped)."""
    if fmt == "alpaca":
        messages = _alpaca(rec)
    elif fmt == "sharegpt":
        messages = _sharegpt(rec)
    elif fmt == "messages":
        messages = _turns(rec, _field(rec, "messages", kinds=(list,), what="a list of {role, content}"),
                          "messages", "role", "content")
    else:
        raise ZhtuneError(f"format {fmt!r} cannot be used for instruction tuning", where=rec.source,
                          expected="alpaca, sharegpt or messages records")
    return _check_turns(rec, messages)


def history_messages(rec: Record, system: str | None, history: list | None) -> list[dict]:
    """Alpaca-style optional system + history [[question, answer], ...] -> the leading messages."""
    messages = [{"role": "system", "content": system}] if system else []
    for j, pair in enumerate(history or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ZhtuneError(f"history[{j}] is not a [question, answer] pair of strings", where=rec.source,
                              expected="history: [[question, answer], ...]")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def _alpaca(rec: Record) -> list[dict]:
    instruction = _field(rec, "instruction")
    extra = _field(rec, "input", required=False)
    output = _field(rec, "output")
    system = _field(rec, "system", required=False)
    history = _field(rec, "history", required=False, kinds=(list,), what="a list of [question, answer] pairs")
    messages = history_messages(rec, system, history)
    # Chinese-LLaMA-Alpaca / Stanford Alpaca: the input follows the instruction on a new line
    user = f"{instruction}\n{extra}" if extra else instruction
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _sharegpt(rec: Record) -> list[dict]:
    system = _field(rec, "system", required=False)
    head = [{"role": "system", "content": system}] if system else []
    if "conversations" in rec.data:                      # sharegpt: [{from, value}]
        convo = _field(rec, "conversations", kinds=(list,), what="a list of {from, value}")
        return head + _turns(rec, convo, "conversations", "from", "value")
    if "conversation" in rec.data:                       # [{human, assistant}, ...] turn pairs
        pairs = _field(rec, "conversation", kinds=(list,), what="a list of {human, assistant}")
        out = []
        for j, turn in enumerate(pairs):
            if not (isinstance(turn, dict) and isinstance(turn.get("human"), str)
                    and isinstance(turn.get("assistant"), str)):
                raise ZhtuneError(f"conversation[{j}] is not a {{human, assistant}} pair of strings",
                                  where=rec.source, expected="conversation: [{human: ..., assistant: ...}, ...]")
            out += [{"role": "user", "content": turn["human"]}, {"role": "assistant", "content": turn["assistant"]}]
        return head + out
    human = _field(rec, "human", kinds=(list, str), what="a list of user turns")   # LLM_Magic lists
    assistant = _field(rec, "assistant", kinds=(list, str), what="a list of answers")
    human, assistant = ([x] if isinstance(x, str) else x for x in (human, assistant))
    if len(human) != len(assistant) or not all(isinstance(x, str) for x in human + assistant):
        raise ZhtuneError(f"{len(human)} human turns but {len(assistant)} assistant turns", where=rec.source,
                          expected="human and assistant: lists of strings of the same length")
    return head + [m for q, a in zip(human, assistant)
                   for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def _turns(rec: Record, items: list, key: str, role_key: str, content_key: str) -> list[dict]:
    out = []
    for j, item in enumerate(items):
        if not isinstance(item, dict):
            raise ZhtuneError(f"{key}[{j}] is a {type(item).__name__}", where=rec.source,
                              expected=f"{key}: a list of {{{role_key}, {content_key}}} objects")
        role, content = item.get(role_key), item.get(content_key)
        if role is None and role_key == "from":          # sharegpt files that use role/content inside
            role, content = item.get("role"), item.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ZhtuneError(f"{key}[{j}] needs a string {role_key!r} and a string {content_key!r}",
                              where=rec.source, expected=f"{{{role_key}: user|assistant|system, {content_key}: text}}")
        lowered = role.lower()
        if lowered == "system" and not out:
            out.append({"role": "system", "content": content})
        elif lowered in USER_ROLES or lowered in ASSISTANT_ROLES:
            out.append({"role": USER_ROLES.get(lowered) or ASSISTANT_ROLES[lowered], "content": content})
        else:
            raise ZhtuneError(f"{key}[{j}] has role {role!r}", where=rec.source,
                              expected="human/user, gpt/assistant, or system (first only)")
    return out


def _check_turns(rec: Record, messages: list[dict]) -> list[dict]:
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for j, m in enumerate(turns):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ZhtuneError(f"turn {j} is from the {m['role']}, expected the {want}", where=rec.source,
                              expected="an optional system prompt, then user and assistant turns alternating")
    if turns and turns[-1]["role"] == "user":
        messages = messages[:-1]
        turns = turns[:-1]
    if not turns:
        raise ZhtuneError("conversation has no assistant answer", where=rec.source,
                          expected="at least one user turn followed by an answer")
    return messages


# --- the cache and the split the builders share ---------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids (the vocabulary, merges, normaliser, special tokens)."""
    try:
        blob = tokenizer.backend_tokenizer.to_str()
    except AttributeError:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    blob += json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, len(tokenizer)])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def cache_key(parts: dict) -> str:
    def plain(o: Any) -> Any:
        return asdict(o) if is_dataclass(o) else str(o)

    blob = json.dumps({"version": DATA_VERSION, **parts}, sort_keys=True, default=plain)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def cached_build(cache_dir: str | None, name: str, build: Callable[[], tuple]) -> tuple:
    """(train, eval, stats) from data_cache/name if a finished build is there, else build() and save it.

    Saved under a temp folder and renamed into place: an interrupted build leaves no half cache, and
    when several processes build at once the first rename wins and the others load that one.
    """
    import datasets

    if not cache_dir:
        train, eval_, stats = build()
        return train, eval_, {**stats, "cache": "off"}
    final = Path(cache_dir) / name
    if not (final / "stats.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=final.parent))
        try:
            train, eval_, stats = build()
            train.save_to_disk(str(tmp / "train"))
            if eval_ is not None:
                eval_.save_to_disk(str(tmp / "eval"))
            (tmp / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=1), encoding="utf-8")
            try:
                os.rename(tmp, final)
            except OSError:                      # another process finished first: use its copy
                if not (final / "stats.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        status = "miss"
    else:
        status = "hit"
    stats = json.loads((final / "stats.json").read_text(encoding="utf-8"))
    train = datasets.load_from_disk(str(final / "train"))
    eval_ = datasets.load_from_disk(str(final / "eval")) if (final / "eval").is_dir() else None
    return train, eval_, {**stats, "cache": status, "cache_dir": str(final)}


def split_sizes(n: int, val_size: float, where: str = "val_size") -> int:
    """How many of n samples to hold out: a fraction (<1) or a count (>=1); at least one stays for training."""
    if val_size <= 0:
        return 0
    n_val = max(1, round(n * val_size)) if val_size < 1 else int(val_size)
    if n_val >= n:
        raise ZhtuneError(f"val_size={val_size} holds out {n_val} of {n} samples, leaving none to train on",
                          where=where, expected="a fraction below 1 or a count smaller than the number of samples")
    return n_val


def split_validation(ds, val_size: float, seed: int):
    """(train, eval) with a seeded random `val_size` held out; (ds, None) when val_size is 0."""
    import numpy as np

    n_val = split_sizes(len(ds), val_size)
    if not n_val:
        return ds, None
    order = np.random.default_rng(seed).permutation(len(ds))
    return ds.select(np.sort(order[n_val:])), ds.select(np.sort(order[:n_val]))


class SkipCounter:
    """Skipped records by reason, each with the first file:line, for DatasetBundle.stats."""

    def __init__(self) -> None:
        self.skipped: dict[str, dict] = {}

    def add(self, reason: str, source: str, n: int = 1) -> None:
        entry = self.skipped.setdefault(reason, {"count": 0, "first": source})
        entry["count"] += n

    def describe(self) -> str:
        return "; ".join(f"{k}: {v['count']} (first at {v['first']})" for k, v in self.skipped.items())
