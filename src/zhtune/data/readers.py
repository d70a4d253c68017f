"""Training records: files, folders or Hub datasets -> validated records that name their file:line, and the
record formats (text, alpaca, sharegpt, messages) turned into what the stages train on.

Used by `zhtune train` through data/prepare.py; on its own:

    for rec in read_records(["data/alpaca_zh.json"]):
        print(rec.source, to_messages(rec, detect_format(rec, "sft")))

Which files are read and how (compressed, parquet, arrow, save_to_disk folders) is data/files.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any, Iterator

from zhtune.data.files import Unit, find_sources
from zhtune.data.formats import Record, Segment, read_segment
from zhtune.errors import ZhtuneError

FORMATS = ("text", "alpaca", "sharegpt", "messages", "preference")
USER_ROLES = {"user": "user", "human": "user"}
ASSISTANT_ROLES = {"assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bot": "assistant",
                   "model": "assistant"}
__all__ = ["Record", "read_records", "unit_records", "detect_format", "to_text", "to_messages", "history_messages",
           "tokenizer_fingerprint"]


# --- reading ------------------------------------------------------------------------------------

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


def unit_records(unit: Unit, fmt: str, columns: dict | None, text_field: str = "text") -> Iterator[Record]:
    """The records of a unit of work (data/files.py) in order, checked to be objects, columns renamed."""
    columns = dict(columns or {})
    records = itertools.chain.from_iterable(read_segment(seg, fmt, text_field) for seg in unit.segments)
    for rec in itertools.islice(records, unit.limit):
        if not isinstance(rec.data, dict):
            raise ZhtuneError(f"record is a JSON {type(rec.data).__name__}, not an object",
                              where=rec.source, expected="one JSON object per record")
        yield Record(rec.source, _rename(rec.data, columns)) if columns else rec


def read_records(paths: list[str], fmt: str = "auto", columns: dict | None = None, text_field: str = "text",
                 max_samples: int | None = None, *, key: str = "dataset") -> Iterator[Record]:
    """Records from every entry in `paths` (at most `max_samples` per entry), one after another.

    .txt files give one {text_field: line} record per line; `fmt` other than auto/text refuses them.
    `key` is the config key the paths came from (dataset, val_file), for error messages.
    """
    if not paths:
        raise ZhtuneError("no training data given", where=key,
                          expected="one or more files or folders, e.g. dataset=[data/train.jsonl]")
    for i, entry in enumerate(paths):
        sources = find_sources(str(entry), f"{key}[{i}]: {entry}")   # generators: files open when reached
        unit = Unit(i, [Segment(s) for s in sources], max_samples)
        count = 0
        for rec in unit_records(unit, fmt, columns, text_field):
            count += 1
            yield rec
        if count == 0:
            raise ZhtuneError(f"no records in {entry}", where=f"{key}[{i}]: {entry}",
                              expected="a non-empty data file or folder")


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


# --- identity of a tokenizer, for cache keys ------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids (the vocabulary, merges, normaliser, special tokens)."""
    try:
        blob = tokenizer.backend_tokenizer.to_str()
    except AttributeError:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    blob += json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, len(tokenizer)])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
