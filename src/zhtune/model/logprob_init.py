"""The `logprob` embedding init's output rows (model/embeddings.py calls it): each new lm_head row is fitted so a
new piece's day-0 probability tracks the base's probability of its whole text, from one forward pass over
calibration text; context_offsets makes that context-dependent. benchmarks/embedding_init.py measures it.

    info = fit_output_rows(model, tokenizer, old, sources, texts, offsets=context_offsets(...))
"""

from __future__ import annotations

import math


def fit_output_rows(model, tokenizer, old: int, sources: list[list[int]], texts: list[str],
                    max_positions: int = 65536, iterations: int = 30, alpha: float = 0.5, offsets=None,
                    start: str = "first") -> dict:
    """Set each new lm_head row to w[first base piece] (+ offsets) + c_t * u, from one forward pass over
    `texts` (tokenized by the merged `tokenizer`, at most `max_positions` positions).

    Why: a mean of byte rows scores a new piece like the average of its bytes' logits, but the base
    gives the whole text log P(b1) + log P(b2 | b1) + ...: the first piece's row carries the first
    term (and its context), c_t the rest. Llama's head has no bias, but final hidden states share a
    common direction: u solves H u ≈ 1 (least squares over the calibration states H), so adding
    c_t * u to a row adds ≈ c_t to its logit at every position. c_t is fitted without gradients
    (iterative proportional fitting): each new piece's expected count under the day-0 softmax over
    the calibration positions is made equal to its count there (+ alpha), which also accounts for
    the probability the old byte rows keep. `offsets` (context_offsets) make the rest context-dependent.
    start="current": keep the rows as they are and fit only c_t (a tied head, whose rows are also inputs).
    Cost: max_positions x new pieces x hidden multiply-adds per iteration (seconds on a GPU for 7B).
    """
    import torch

    hidden, nxt = _calibration_states(model, tokenizer, texts, max_positions)   # (N, d), (N,)
    head = model.get_output_embeddings().weight.detach()                         # (size, d)
    h = hidden.to(head.device)
    w_old = head[:old].float()                                                   # (old, d)
    if start == "current":  # a tied head: the rows as they are (the mean init), only c_t * u is added
        rows = head[old:].float().clone()
    else:
        rows = torch.stack([w_old[ids[0]] if ids else head[old + k].float() for k, ids in enumerate(sources)])
    if offsets is not None:
        rows = rows + offsets.to(rows)
    gram = h.T @ h                                                               # (d, d)
    ridge = 1e-4 * gram.diagonal().mean() * torch.eye(gram.shape[0], device=h.device)
    u = torch.linalg.solve(gram + ridge, h.sum(0))                               # (d,)
    proj = h @ u                                                                 # (N,) ≈ 1
    counts = torch.bincount((nxt[nxt >= old] - old).to(h.device), minlength=len(sources)).float() + alpha
    c = _fit_levels(h, w_old, rows, proj, counts, iterations)
    with torch.no_grad():
        head[old:] = (rows + c[:, None] * u[None]).to(head.dtype)
    return {"positions": len(nxt), "bias_fit_rms": float((proj - 1).pow(2).mean().sqrt()),
            "seen_pieces": int((counts > alpha).sum())}


def _fit_levels(h, w_old, rows, proj, counts, iterations: int):
    """c (new pieces,) such that each new piece's expected count under the day-0 softmax over the positions
    h (N, d), with rows + c_t * u as its head rows (h @ u = proj), equals its target count: iterative
    proportional fitting, no gradients; stops at its best iteration."""
    import torch

    z_old = torch.cat([torch.logsumexp(part @ w_old.T, -1) for part in h.split(1024)])  # (N,)
    c = torch.zeros(len(rows), device=h.device)
    # the base logits of the new rows do not change between iterations: keep them when they are small
    cached = [part @ rows.T for part in h.split(1024)] if len(h) * len(rows) <= 5e7 else None
    best = (math.inf, c)
    for _ in range(iterations):
        expected = torch.zeros_like(c)
        for n, (part, p, zo) in enumerate(zip(h.split(1024), proj.split(1024), z_old.split(1024))):
            z = (cached[n] if cached else part @ rows.T) + p[:, None] * c[None]  # (chunk, new)
            total = torch.logaddexp(zo, torch.logsumexp(z, -1))
            expected += torch.exp(z - total[:, None]).sum(0)
        gap = counts.log() - expected.log()
        error = float(gap.abs().mean())
        if error >= best[0]:  # the shift below overshoots once the counts are close (a tied head's c_t * u
            return best[1]     # is no uniform shift: measured to drift back after ~15 iterations): keep the best
        best = (error, c)
        if float(gap.abs().max()) < 0.01:  # every expected count within 1% of its target
            break
        # plus the shift that moves the new pieces' total share from S to T at once (raising every c_t
        # also raises the normaliser: plain proportional fitting creeps there slowly)
        share, goal = min(float(expected.sum()) / len(h), 0.999), min(float(counts.sum()) / len(h), 0.999)
        c = (c + gap + math.log((1 - share) / (1 - goal))).clamp(-30.0, 10.0)
    return c


def _calibration_states(model, tokenizer, texts: list[str], max_positions: int):
    """Final hidden states (N, d) float32 on the CPU and the next token ids (N,) of `texts` tokenized by
    `tokenizer` (BOS + text + EOS), until `max_positions` positions."""
    import torch

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    encoded = (tokenizer(t, add_special_tokens=False).input_ids for t in texts)
    seqs = calibration_sequences(encoded, bos, eos, max_positions)
    states, nexts = [], []
    for seq, hidden in _forward(model, seqs):  # positions 0..len-2 predict tokens 1..len-1
        states.append(hidden[:-1].cpu())
        nexts.append(torch.tensor(seq[1:]))
    return torch.cat(states)[:max_positions], torch.cat(nexts)[:max_positions]


def calibration_sequences(encoded, bos, eos, max_positions: int, block: int = 512) -> list[list[int]]:
    """BOS + ids + EOS, each cut to `block` tokens, until `max_positions` predicted positions."""
    seqs, total = [], 0
    for ids in encoded:
        ids = (([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else []))[:block]
        if len(ids) > 1:
            seqs.append(ids)
            total += len(ids) - 1
        if total >= max_positions:
            break
    return seqs


def pad_right(group: list[list[int]]):
    """Token id lists -> (ids, attention mask), both LongTensor (len(group), longest), 0-padded right."""
    import torch

    width = max(map(len, group))
    ids = torch.zeros(len(group), width, dtype=torch.long)
    mask = torch.zeros(len(group), width, dtype=torch.long)
    for row, seq in enumerate(group):
        ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
    return ids, mask


def _forward(model, seqs: list[list[int]], batch: int = 8):
    """Yield (seq, final hidden states (len, d) float32) for each sequence, batched by length."""
    import torch

    device = model.get_input_embeddings().weight.device
    decoder, was_training = model.get_decoder(), model.training
    # train mode: an eval-mode forward repacks bitsandbytes' 4-bit weights on the CPU, after which
    # QLoRA gets no gradients (docs NOTES); Llama-family models have no dropout to disturb the states
    model.train()
    seqs = sorted(seqs, key=len)
    try:
        with torch.no_grad():
            for start in range(0, len(seqs), batch):
                group = seqs[start:start + batch]
                ids, mask = pad_right(group)
                out = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
                for row, seq in enumerate(group):
                    yield seq, out[row, :len(seq)].float()
    finally:
        model.train(was_training)


def context_offsets(model, old: int, sources: list[list[int]], base_seqs: list[list[int]],
                    min_samples: int = 30, ridge: float = 3.0):
    """(new pieces, d) lm_head offsets so a piece's logit follows the base's context-dependent
    log P(rest of its spelling | context, its first base piece), not just its average.

    From one teacher-forced pass of the base over `base_seqs` (calibration text in BASE tokens): where
    the text continues with a prefix p of some new piece's spelling (e.g. <0xE4>, or 质), the base's
    log-probabilities of p's possible next pieces there are regression targets on the hidden state h
    just before p. A ridge fit per prefix (centred: the IPF in fit_output_rows sets the levels) gives
    each child a direction; a piece's offset sums them over its prefixes. Prefixes seen fewer than
    `min_samples` times add nothing.
    """
    import torch

    children: dict[tuple, dict[int, list[int]]] = {}      # prefix -> next base piece -> new pieces
    for k, ids in enumerate(sources):
        for n in range(1, len(ids)):
            children.setdefault(tuple(ids[:n]), {}).setdefault(ids[n], []).append(k)
    w_old = model.get_output_embeddings().weight.detach()[:old].float()
    feats: dict[tuple, list] = {}
    targets: dict[tuple, list] = {}
    for seq, hidden in _forward(model, base_seqs):
        for j in range(len(seq) - 1):
            prefix = (seq[j + 1],)
            while prefix in children and j + len(prefix) < len(seq):  # walk the text down the prefix tree
                logp = torch.log_softmax(hidden[j + len(prefix)].to(w_old) @ w_old.T, -1)  # (old,)
                feats.setdefault(prefix, []).append(hidden[j].cpu())
                targets.setdefault(prefix, []).append(logp[list(children[prefix])].cpu())
                if j + len(prefix) + 1 >= len(seq):
                    break
                prefix = prefix + (seq[j + len(prefix) + 1],)
    d = w_old.shape[1]
    offsets, fitted = torch.zeros(len(sources), d), 0
    for prefix, rows in feats.items():
        if len(rows) < min_samples:
            continue
        h = torch.stack(rows)
        h = h - h.mean(0)                                                    # (n, d)
        y = torch.stack(targets[prefix])
        y = y - y.mean(0)                                                    # (n, children)
        lam = ridge * h.pow(2).sum() / d
        if len(h) < d:  # dual form: an n x n solve
            coef = h.T @ torch.linalg.solve(h @ h.T + lam * torch.eye(len(h)), y)
        else:
            coef = torch.linalg.solve(h.T @ h + lam * torch.eye(d), h.T @ y)  # (d, children)
        for col, pieces in enumerate(children[prefix].values()):
            offsets[pieces] += coef[:, col]
        fitted += 1
    return offsets, fitted
