"""Generation metrics (`zhtune eval --task generate --data FILE.jsonl`): each record's conversation up to
its last answer is sent to the engine (the model's chat template), and the reply is scored against
that answer as LLaMA-Factory's predict_with_generate does: ROUGE-1/2/L (F) over jieba words
(rouge-chinese), BLEU-4 over characters (nltk, smoothing method 3), each x100 and averaged.
"""

from __future__ import annotations

import logging

from zhtune.data.readers import detect_format, read_records, to_messages
from zhtune.errors import ZhtuneError
from zhtune.infer.engine import Engine, GenParams

CHUNK = 32   # prompts per engine.generate call (the engine batches them)


def _libraries():
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as exc:
        raise ZhtuneError(f"--task generate needs {exc.name}", where="--task generate",
                          hint="pip install 'zhtune[eval]'") from None
    jieba.setLogLevel(logging.WARNING)   # its dictionary-loading messages are not the user's business
    return jieba, Rouge, sentence_bleu, SmoothingFunction


def similarity(prediction: str, reference: str) -> dict[str, float]:
    """One pair's scores, x100 and rounded to 4 places, exactly as LLaMA-Factory's ComputeSimilarity."""
    jieba, Rouge, sentence_bleu, SmoothingFunction = _libraries()
    hypothesis, ref_words = list(jieba.cut(prediction)), list(jieba.cut(reference))
    if not " ".join(hypothesis).split() or not " ".join(ref_words).split():
        rouge = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        scores = Rouge().get_scores(" ".join(hypothesis), " ".join(ref_words))[0]
        rouge = {k: v["f"] for k, v in scores.items()}
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return {**{k: round(v * 100, 4) for k, v in rouge.items()}, "bleu-4": round(bleu * 100, 4)}


def read_pairs(path: str, limit: int | None) -> list[tuple[str, list[dict], str]]:
    """(file:line, conversation before the last answer, that answer) of each record (alpaca, sharegpt
    or messages: what `zhtune train stage=sft` reads)."""
    pairs = []
    for rec in read_records([path], key="--data", max_samples=limit):
        messages = to_messages(rec, detect_format(rec))
        pairs.append((rec.source, messages[:-1], messages[-1]["content"]))
    return pairs


def evaluate(engine: Engine, path: str, params: GenParams, limit: int | None, progress) -> tuple[dict, list[dict]]:
    """(LLaMA-Factory's predict_results keys, one {"prompt", "predict", "label"} row per record)."""
    pairs = read_pairs(path, limit)
    _libraries()   # a missing library is named before any generation runs
    rows, sums = [], {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for start in range(0, len(pairs), CHUNK):
        chunk = pairs[start:start + CHUNK]
        replies = engine.generate([messages for _, messages, _ in chunk], params)
        for (source, messages, label), reply in zip(chunk, replies):
            scores = similarity(reply.text, label)
            for k in sums:
                sums[k] += scores[k]
            rows.append({"source": source, "prompt": engine.format(messages), "predict": reply.text, "label": label})
        progress.update(len(chunk))
    n = len(rows)
    results = {f"predict_{k}": round(v / n, 4) for k, v in sums.items()}
    return {**results, "predict_samples": n}, rows
