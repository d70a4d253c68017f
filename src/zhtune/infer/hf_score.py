"""How the transformers backend (zhtune.infer.hf) batches `Engine.score`: sequences that share a prefix (a
benchmark's header and worked examples) in groups whose prefix runs once, rows of similar length together,
and the next-token log-probs read off each batch."""

from __future__ import annotations

from zhtune.infer.engine import Scored

# score(): padded tokens per forward (activations), and logits kept per forward when every position
# is wanted ([tokens, vocab] floats: 2**27 of them is 512 MiB)
SCORE_TOKENS = 8192
SCORE_LOGITS = 2**27
SCORE_ROWS = 64
SHARED_MIN = 16    # a prefix at least this long shared by a group of sequences runs once (KV cache repeated)
GROUP_MIN = 8      # ... by at least this many (a smaller group would make batches too small to run well)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_groups(sequences: list[list[int]]) -> list[tuple[list[int], int]]:
    """Indices of `sequences` in groups that share a prefix, each with that prefix's length (0: rows with no
    prefix worth sharing, pooled). Sorted by ids, sequences with a common prefix are neighbours; a run of at
    least GROUP_MIN whose neighbours share >= SHARED_MIN tokens is one group, split further where that saves
    more prefix tokens (a benchmark: each subject's questions share its header and worked examples)."""
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])
    # lcp[k]: tokens order[k] and order[k + 1] share, each row keeping at least one token of its own
    lcp = [min(common_prefix(sequences[a], sequences[b]), len(sequences[a]) - 1, len(sequences[b]) - 1)
           for a, b in zip(order, order[1:])]

    def best(lo: int, hi: int, depth: int = 0) -> tuple[list[tuple[list[int], int]], int]:
        """Groups of order[lo:hi] (neighbours share >= SHARED_MIN) and the prefix tokens they save."""
        if hi - lo < GROUP_MIN:
            return [(order[lo:hi], 0)], 0
        shared = min(lcp[lo:hi - 1])
        whole = [(order[lo:hi], shared)], (hi - lo - 1) * shared
        cuts = [k + 1 for k in range(lo, hi - 1) if lcp[k] == shared]
        if depth > 32:   # nested deeper than any benchmark's prompts: stop looking
            return whole
        split: list[tuple[list[int], int]] = []
        saved = 0
        for a, b in zip([lo, *cuts], [*cuts, hi]):
            groups, s = best(a, b, depth + 1)
            split += groups
            saved += s
        return (split, saved) if saved > whole[1] else whole

    groups, pool, lo = [], [], 0
    for hi in [k + 1 for k, n in enumerate(lcp) if n < SHARED_MIN] + [len(order)]:
        for rows, shared in best(lo, hi)[0]:
            if shared:
                groups.append((rows, shared))
            else:
                pool += rows
        lo = hi
    return groups + ([(pool, 0)] if pool else [])


def batches(rows: list[int], lengths: list[int], shared: int, budget: int) -> list[list[int]]:
    """`rows` (lengths: tokens after the shared prefix) sorted by length and cut into batches of at most
    SCORE_ROWS rows and `budget` tokens, the prefix counted in every row (its KV cache is repeated per row):
    neighbours have similar lengths, so little of a batch is padding."""
    ranked = sorted(zip(lengths, rows))
    out: list[list[int]] = []
    for length, row in ranked:
        if not out or len(out[-1]) >= SCORE_ROWS or (len(out[-1]) + 1) * (shared + length) > budget:
            out.append([])
        out[-1].append(row)
    return out


def next_scores(torch, logprobs, top_k: int, candidates: list[int]) -> list[Scored]:
    """logprobs [B, V] (log-softmaxed): each row's candidates and top_k next tokens, as Scored (no tokens)."""
    out = [Scored([], {}) for _ in range(logprobs.shape[0])]
    if candidates:
        picked = logprobs[:, candidates].tolist()                                               # [B, C]
        for scored, values in zip(out, picked):
            scored.next.update(zip(candidates, values))
    if top_k:
        values, indices = logprobs.topk(top_k, dim=-1)
        for scored, i, v in zip(out, indices.tolist(), values.tolist()):
            scored.next.update(zip(i, v))
    return out
