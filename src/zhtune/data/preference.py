"""Preference pairs for DPO: records -> prompt / chosen / rejected token ids, rendered by the SFT templates.

Called by `zhtune train stage=dpo` as `build_preference_dataset(cfg, tokenizer, template)`. Accepted
records (the format is auto-detected per file, like SFT):

    {"prompt": "...", "chosen": "...", "rejected": "..."}                 LLM_Magic / alpaca-style pairs,
        + optional "system", "history": [[q, a], ...], "input" (appended to the prompt like alpaca)
    {"conversations"|"messages": [... ending with the user], "chosen": X, "rejected": X}
        sharegpt {from, value} or OpenAI {role, content} turns; X is a string or one assistant message
    {"prompt": [messages], "chosen": [assistant message], "rejected": [...]}   TRL's conversational form
    {"chosen": [whole conversation], "rejected": [whole conversation]}       the shared turns are the prompt

The context goes through `template.encode_pairs` exactly as in SFT: the prompt is the conversation
up to the last assistant header, chosen / rejected are that answer with the template's end marker.
Each segment is tokenised on its own, as SFT does, so ids match SFT's for the same conversation.
Structural mistakes raise with file:line; empty answers, chosen == rejected and prompts that leave no
room under cutoff_len are skipped, counted and printed (each reason with its first file:line), or with
strict=true refused. The pairs stream from disk through data/prepare.py like SFT samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from zhtune.config import TrainConfig
from zhtune.data.prepare import Counts, DatasetBundle, prepare
from zhtune.data.readers import (
    ASSISTANT_ROLES, Record, _field, _turns, detect_format, history_messages, tokenizer_fingerprint,
)
from zhtune.data.sft import check_split_options, source_file
from zhtune.errors import ZhtuneError

BATCH_PAIRS = 256                    # pairs tokenised per call


@dataclass
class Pair:
    source: str              # file:line
    context: list[dict]      # optional system, then user/assistant turns ending with the user
    chosen: str
    rejected: str


# --- records -> pairs --------------------------------------------------------------------------

def _answer(rec: Record, key: str) -> str:
    """chosen / rejected as text: a string, one assistant message, or a list holding one."""
    value = rec.data.get(key)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role = str(value.get("role", value.get("from", "assistant"))).lower()
        value = value.get("content", value.get("value"))
        if role not in ASSISTANT_ROLES:
            raise ZhtuneError(f"{key!r} is a message from {role!r}", where=rec.source,
                              expected=f"{key}: the assistant's answer (a string or an assistant message)")
    if value is None:
        raise ZhtuneError(f"record has no {key!r} field (keys: {sorted(rec.data)})", where=rec.source,
                          expected="prompt, chosen and rejected",
                          hint="map your field names with columns={ours: yours}")
    if not isinstance(value, str):
        raise ZhtuneError(f"field {key!r} is a {type(value).__name__}", where=rec.source,
                          expected=f"{key}: a string, or one assistant message {{role, content}}")
    return value


def _text_context(rec: Record) -> list[dict]:
    """prompt string (+ input, system, history [[q, a], ...]) -> messages ending with the user."""
    prompt = _field(rec, "prompt", required=False) if "prompt" in rec.data else _field(rec, "instruction")
    extra = _field(rec, "input", required=False)
    system = _field(rec, "system", required=False)
    history = _field(rec, "history", required=False, kinds=(list,), what="a list of [question, answer] pairs")
    messages = history_messages(rec, system, history)
    user = f"{prompt}\n{extra}" if extra else prompt
    return messages + [{"role": "user", "content": user or ""}]


def _split_full_conversations(rec: Record) -> tuple[list[dict], str, str]:
    """{"chosen": [conversation], "rejected": [conversation]}: the shared turns are the context."""
    chosen = _turns(rec, rec.data["chosen"], "chosen", "role", "content")
    rejected = _turns(rec, rec.data["rejected"], "rejected", "role", "content")
    if len(chosen) < 2 or chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" \
            or rejected[-1]["role"] != "assistant":
        raise ZhtuneError("chosen and rejected conversations must share every turn but the last answer",
                          where=rec.source, expected="two conversations differing only in the final assistant turn")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def to_pair(rec: Record) -> Pair:
    """Any preference record -> Pair (raises with file:line on a structural mistake)."""
    data = rec.data
    if "chosen" not in data or "rejected" not in data:
        missing = [k for k in ("chosen", "rejected") if k not in data]
        raise ZhtuneError(f"record has no {' and '.join(repr(k) for k in missing)} field (keys: {sorted(data)})",
                          where=rec.source, expected="prompt, chosen and rejected",
                          hint="map your field names with columns={ours: yours}")
    convo_key = next((k for k in ("conversations", "messages") if k in data), None)
    if convo_key is None and isinstance(data.get("prompt"), list):
        convo_key = "prompt"
    if convo_key is not None:
        items = _field(rec, convo_key, kinds=(list,), what="a list of turns")
        role_key, content_key = ("from", "value") if convo_key == "conversations" else ("role", "content")
        context = _turns(rec, items, convo_key, role_key, content_key)
        system = _field(rec, "system", required=False)
        if system and not (context and context[0]["role"] == "system"):
            context = [{"role": "system", "content": system}] + context
        chosen, rejected = _answer(rec, "chosen"), _answer(rec, "rejected")
    elif isinstance(data["chosen"], list) and isinstance(data["rejected"], list) and len(data["chosen"]) > 1:
        context, chosen, rejected = _split_full_conversations(rec)
    else:
        context, chosen, rejected = _text_context(rec), _answer(rec, "chosen"), _answer(rec, "rejected")
    turns = context[1:] if context and context[0]["role"] == "system" else context
    for j, m in enumerate(turns):
        if m["role"] != ("user" if j % 2 == 0 else "assistant"):
            raise ZhtuneError(f"turn {j} is from the {m['role']}", where=rec.source,
                              expected="user and assistant turns alternating, ending with the user's question")
    if not turns or turns[-1]["role"] != "user":
        raise ZhtuneError("the prompt does not end with a user turn", where=rec.source,
                          expected="a conversation ending with the question that chosen/rejected answer")
    return Pair(rec.source, context, chosen, rejected)


def pair_of(rec: Record, fmt: str) -> Pair:
    """A preference record -> Pair; other record kinds are refused with their file:line."""
    if fmt != "preference" and not ("chosen" in rec.data or "rejected" in rec.data):
        raise ZhtuneError(f"a {fmt} record cannot be used for preference tuning", where=rec.source,
                          expected="records with chosen and rejected answers (prompt/chosen/rejected)",
                          hint="stage=sft trains on single answers")
    return to_pair(rec)


def skip_reason(pair: Pair) -> str | None:
    if not pair.chosen.strip() or not pair.rejected.strip():
        return "empty chosen or rejected"
    if not pair.context[-1]["content"].strip():
        return "empty prompt"
    if pair.chosen.strip() == pair.rejected.strip():
        return "chosen identical to rejected"
    return None


# --- pairs -> token ids ----------------------------------------------------------------------------

def render_pair(pair: Pair, template, bos: str, eos: str) -> tuple[list[str], str, str]:
    """(prompt segments, chosen text, rejected text) from the one template, as SFT renders them."""
    chosen_pairs = template.encode_pairs(pair.context + [{"role": "assistant", "content": pair.chosen}], bos, eos)
    rejected_last = template.encode_pairs(pair.context + [{"role": "assistant", "content": pair.rejected}], bos, eos)
    segments = [text for p, r in chosen_pairs[:-1] for text in (p, r)] + [chosen_pairs[-1][0]]
    return segments, chosen_pairs[-1][1], rejected_last[-1][1]


def tokenise_pairs(pairs: list[Pair], tokenizer, template, cutoff_len: int, counts: Counts) -> dict:
    """Columns for TRL's DPOTrainer: prompt_ids / chosen_ids / rejected_ids (+ the texts for ORPO/SimPO).

    prompt + answer is cut to cutoff_len from the end of the answer (TRL's keep_start); a prompt with
    no room left for an answer token is skipped, a cut answer counted.
    """
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    out: dict[str, list] = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "prompt", "chosen", "rejected")}
    rendered = [render_pair(p, template, bos, eos) for p in pairs]
    flat = [s for segs, c, r in rendered for s in (*segs, c, r)]
    encoded = iter(tokenizer(flat, add_special_tokens=False)["input_ids"])   # one batched call
    for pair, (segments, chosen, rejected) in zip(pairs, rendered):
        prompt_ids = [t for _ in segments for t in next(encoded)]
        chosen_ids, rejected_ids = next(encoded), next(encoded)
        room = cutoff_len - len(prompt_ids)
        if room < 1:
            counts.skip(f"prompt fills cutoff_len={cutoff_len}", pair.source)
            continue
        if len(chosen_ids) > room or len(rejected_ids) > room:
            counts.truncate(pair.source)
        out["prompt_ids"].append(prompt_ids)
        out["chosen_ids"].append(chosen_ids[:room])
        out["rejected_ids"].append(rejected_ids[:room])
        out["prompt"].append("".join(segments))
        out["chosen"].append(chosen)
        out["rejected"].append(rejected)
        counts.rows += 1
        counts.tokens += len(prompt_ids) + max(len(chosen_ids[:room]), len(rejected_ids[:room]))
    return out


class PairStats:
    """Passes the pairs through and measures them (prompt + the longer answer)."""

    def __init__(self):
        self.pairs = self.max_tokens = self.total = 0

    def add(self, table) -> Any:
        if table is None or table.num_rows == 0:
            return None
        import numpy as np
        import pyarrow.compute as pc

        lengths = [pc.list_value_length(table.column(c)).to_numpy(zero_copy_only=False)
                   for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
        total = lengths[0] + np.maximum(lengths[1], lengths[2])
        self.pairs += len(total)
        self.max_tokens = max(self.max_tokens, int(total.max()))
        self.total += int(total.sum())
        return table

    def flush(self) -> None:
        return None

    def stats(self) -> dict:
        if not self.pairs:
            return {}
        return {"pairs": self.pairs, "max_tokens": self.max_tokens, "mean_tokens": round(self.total / self.pairs, 1)}


@dataclass
class PreferenceSpec:
    """What stage dpo does with records (see data/prepare.py for the protocol)."""

    tokenizer: Any
    template: Any
    fmt: str
    columns: dict
    cutoff_len: int
    name: str = "dpo"

    def __post_init__(self):
        import datasets

        ints, text = datasets.List(datasets.Value("int32")), datasets.Value("string")
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.features = datasets.Features({"prompt_ids": ints, "chosen_ids": ints, "rejected_ids": ints,
                                           "prompt": text, "chosen": text, "rejected": text})
        self.final_features = self.features

    def key_parts(self) -> dict:
        return {"stage": "dpo-pairs", "tokenizer": self.fingerprint, "template": self.template, "format": self.fmt,
                "columns": self.columns, "cutoff_len": self.cutoff_len}

    def final_key_parts(self) -> dict:
        return {}

    def tokenise(self, records: Iterator[Record], counts: Counts) -> Iterator[dict]:
        """Records -> pair batches; empty fields, identical answers and full prompts are skipped and counted."""
        formats: dict[str, str] = {}
        pairs: list[Pair] = []
        for rec in records:
            file = source_file(rec.source)
            pair = pair_of(rec, formats.get(file) or formats.setdefault(file, detect_format(rec, self.fmt)))
            counts.records += 1
            reason = skip_reason(pair)
            if reason:
                counts.skip(reason, rec.source)
                continue
            pairs.append(pair)
            if len(pairs) == BATCH_PAIRS:
                yield tokenise_pairs(pairs, self.tokenizer, self.template, self.cutoff_len, counts)
                pairs = []
        if pairs:
            yield tokenise_pairs(pairs, self.tokenizer, self.template, self.cutoff_len, counts)
        counts.formats = sorted(set(counts.formats) | set(formats.values()))

    def finisher(self) -> PairStats:
        return PairStats()

    def check(self, counts: Counts, where: str) -> None:
        if counts.rows == 0:
            raise ZhtuneError("every preference record was skipped: " + counts.describe_skips(), where=where,
                              expected=f"pairs whose chosen and rejected answers are non-empty and different, with "
                                       f"prompts shorter than cutoff_len={self.cutoff_len} tokens",
                              hint="raise cutoff_len (alias max_seq_length) if the prompts fill it")

    def describe_counts(self, counts: Counts) -> dict:
        return {"records": counts.records, "formats": counts.formats, "cutoff_len": self.cutoff_len}

    def describe_split(self, n_train: int, n_eval: int) -> dict:
        return {}

    def describe_flow(self, stats: dict) -> str:
        held = f" (+{stats['eval'].get('pairs', 0):,} eval pairs)" if stats.get("eval") else ""
        return (f"{stats['records']:,} records → {stats.get('pairs', 0):,} pairs, {stats.get('mean_tokens', 0)} tokens "
                f"on average, at most {stats.get('max_tokens', 0)}{held}")


def build_preference_dataset(cfg: TrainConfig, tokenizer, template) -> DatasetBundle:
    """cfg.dataset (+ val_file / val_size) -> datasets of prompt/chosen/rejected ids for DPOTrainer."""
    check_split_options(cfg)
    spec = PreferenceSpec(tokenizer, template, cfg.format, dict(cfg.columns), cfg.cutoff_len)
    train, eval_, stats = prepare(spec, cfg)
    return DatasetBundle(train=train, eval=eval_, collator=None, stats=stats)
