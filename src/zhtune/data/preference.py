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
room under cutoff_len are skipped and counted (each reason with its first file:line) in stats.
"""

from __future__ import annotations

from dataclasses import dataclass

from zhtune.config import TrainConfig
from zhtune.data.readers import (
    ASSISTANT_ROLES, DatasetBundle, Record, SkipCounter, _field, _turns, cache_key, cached_build, detect_format,
    fingerprint_entries, history_messages, read_records, split_validation, tokenizer_fingerprint,
)
from zhtune.errors import ZhtuneError


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


def load_pairs(entries: list[str], cfg: TrainConfig, skips: SkipCounter,
               where: str = "dataset") -> tuple[list[Pair], dict]:
    """Files -> valid Pairs; empty fields and identical answers are skipped and counted."""
    pairs, formats, n_read = [], {}, 0
    for rec in read_records(entries, cfg.format, cfg.columns, max_samples=cfg.max_samples):
        file = rec.source.rsplit(":", 1)[0]
        fmt = formats.get(file) or formats.setdefault(file, detect_format(rec, cfg.format))
        if fmt != "preference" and not ("chosen" in rec.data or "rejected" in rec.data):
            raise ZhtuneError(f"a {fmt} record cannot be used for preference tuning", where=rec.source,
                              expected="records with chosen and rejected answers (prompt/chosen/rejected)",
                              hint="stage=sft trains on single answers")
        pair = to_pair(rec)
        n_read += 1
        if not pair.chosen.strip() or not pair.rejected.strip():
            skips.add("empty chosen or rejected", rec.source)
        elif not pair.context[-1]["content"].strip():
            skips.add("empty prompt", rec.source)
        elif pair.chosen.strip() == pair.rejected.strip():
            skips.add("chosen identical to rejected", rec.source)
        else:
            pairs.append(pair)
    if not pairs:
        raise ZhtuneError("every preference record was skipped: " + skips.describe(), where=where,
                          expected="pairs whose chosen and rejected answers are non-empty and different")
    return pairs, {"records": n_read, "formats": sorted(set(formats.values()))}


# --- pairs -> token ids ----------------------------------------------------------------------------

def render_pair(pair: Pair, template, bos: str, eos: str) -> tuple[list[str], str, str]:
    """(prompt segments, chosen text, rejected text) from the one template, as SFT renders them."""
    chosen_pairs = template.encode_pairs(pair.context + [{"role": "assistant", "content": pair.chosen}], bos, eos)
    rejected_last = template.encode_pairs(pair.context + [{"role": "assistant", "content": pair.rejected}], bos, eos)
    segments = [text for p, r in chosen_pairs[:-1] for text in (p, r)] + [chosen_pairs[-1][0]]
    return segments, chosen_pairs[-1][1], rejected_last[-1][1]


def tokenise_pairs(pairs: list[Pair], tokenizer, template, cutoff_len: int, skips: SkipCounter) -> dict:
    """Columns for TRL's DPOTrainer: prompt_ids / chosen_ids / rejected_ids (+ the texts for ORPO/SimPO).

    prompt + answer is cut to cutoff_len from the end of the answer (TRL's keep_start); a prompt with
    no room left for an answer token is skipped.
    """
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    out = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "prompt", "chosen", "rejected", "source")}
    truncated = 0
    rendered = [render_pair(p, template, bos, eos) for p in pairs]
    flat = [s for segs, c, r in rendered for s in (*segs, c, r)]
    encoded = iter(tokenizer(flat, add_special_tokens=False)["input_ids"])   # one batched call
    for pair, (segments, chosen, rejected) in zip(pairs, rendered):
        prompt_ids = [t for _ in segments for t in next(encoded)]
        chosen_ids, rejected_ids = next(encoded), next(encoded)
        room = cutoff_len - len(prompt_ids)
        if room < 1:
            skips.add(f"prompt fills cutoff_len={cutoff_len}", pair.source)
            continue
        if len(chosen_ids) > room or len(rejected_ids) > room:
            truncated += 1
        out["prompt_ids"].append(prompt_ids)
        out["chosen_ids"].append(chosen_ids[:room])
        out["rejected_ids"].append(rejected_ids[:room])
        out["prompt"].append("".join(segments))
        out["chosen"].append(chosen)
        out["rejected"].append(rejected)
        out["source"].append(pair.source)
    out["truncated"] = truncated
    return out


def _dataset(entries: list[str], cfg: TrainConfig, tokenizer, template, skips: SkipCounter, where: str):
    import datasets

    pairs, counts = load_pairs(entries, cfg, skips, where)
    columns = tokenise_pairs(pairs, tokenizer, template, cfg.cutoff_len, skips)
    counts["truncated"] = columns.pop("truncated")
    if not columns["source"]:
        raise ZhtuneError("every preference record was skipped: " + skips.describe(), where=where,
                          expected=f"prompts shorter than cutoff_len={cfg.cutoff_len} tokens",
                          hint="raise cutoff_len (alias max_seq_length)")
    return datasets.Dataset.from_dict(columns), counts


def _stats(ds) -> dict:
    if ds is None:
        return {}
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    return {"pairs": len(ds), "max_tokens": max(lengths), "mean_tokens": round(sum(lengths) / len(lengths), 1)}


def build_preference_dataset(cfg: TrainConfig, tokenizer, template) -> DatasetBundle:
    """cfg.dataset (+ val_file / val_size) -> datasets of prompt/chosen/rejected ids for DPOTrainer."""
    if cfg.val_file and cfg.val_size:
        raise ZhtuneError("both val_file and val_size are set", where="val_file / val_size",
                          expected="one of them: a validation file, or a fraction/count to hold out")
    if cfg.cutoff_len < 2:
        raise ZhtuneError(f"cutoff_len={cfg.cutoff_len}", where="cutoff_len", expected="at least 2 tokens")
    key = cache_key({
        "stage": "dpo", "data": fingerprint_entries(cfg.dataset, "dataset"),
        "val": fingerprint_entries(cfg.val_file, "val_file") if cfg.val_file else None,
        "tokenizer": tokenizer_fingerprint(tokenizer), "template": template,
        **{k: getattr(cfg, k) for k in ("format", "columns", "max_samples", "cutoff_len", "val_size", "seed")},
    })

    def build():
        skips = SkipCounter()
        train, counts = _dataset(cfg.dataset, cfg, tokenizer, template, skips, "dataset")
        if cfg.val_file:
            eval_, _ = _dataset(cfg.val_file, cfg, tokenizer, template, SkipCounter(), "val_file")
        else:
            train, eval_ = split_validation(train, cfg.val_size, cfg.seed)
        stats = {"stage": "dpo", **counts, "skipped": skips.skipped, "cutoff_len": cfg.cutoff_len,
                 **_stats(train), "eval": _stats(eval_)}
        return train, eval_, stats

    train, eval_, stats = cached_build(cfg.data_cache, f"dpo-{key}", build)
    return DatasetBundle(train=train, eval=eval_, collator=None, stats=stats)
