"""The engine's log-prob contract: Engine.score (prompt log-probs, candidates, shared prefixes computed once),
GenParams.logprobs on streams, token-id prompts; hf against a direct transformers computation, llama.cpp
against hf."""

from __future__ import annotations

import pytest

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import GenParams


def reference(model_dir, ids, model=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = model or AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].log_softmax(-1)


def test_score_matches_transformers_with_shared_prefixes(engine, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    header = engine.encode("The following are questions about the weather and the sea. " * 2)
    questions = ["Is it cold?", "Why is the sea blue today", "Rain", "Snow in May?", "Fog", "Wind and waves",
                 "Is the tide high", "Clouds", "Where do storms start?"]
    seqs = [header + engine.encode(q, bos=False) for q in questions]   # a group: the header runs once
    seqs += [engine.encode("A short one"), engine.encode("Another, longer, sentence without the header")]
    nxt = engine.score(seqs, prompt=False, top_k=3, candidates=[5, 7])
    full = engine.score(seqs, prompt=True, top_k=2)
    for ids, a, b in zip(seqs, nxt, full):
        ref = reference(tiny_model_dir, ids, model)
        assert a.tokens == [] and a.next[5] == pytest.approx(float(ref[-1, 5]), abs=1e-4)
        top = ref[-1].topk(3)
        assert all(a.next[int(i)] == pytest.approx(float(v), abs=1e-4) for v, i in zip(*top))
        assert b.tokens[0] is None and len(b.tokens) == len(ids)
        for pos in range(1, len(ids)):
            assert b.tokens[pos].id == ids[pos]
            assert b.tokens[pos].logprob == pytest.approx(float(ref[pos - 1, ids[pos]]), abs=1e-4)
            assert b.tokens[pos].top[0][1] == pytest.approx(float(ref[pos - 1].max()), abs=1e-4)


def test_prefix_groups_share_what_saves_most():
    """Two subjects under one header: each subject's 60-token prefix is shared (not only the 20-token header);
    rows with no long common prefix, or too few to fill a batch, are pooled."""
    from zhtune.infer.hf_score import GROUP_MIN, prefix_groups

    header = list(range(100, 120))
    a, b = header + list(range(200, 240)), header + list(range(300, 340))
    seqs = [a + [i, i + 1] for i in range(9)] + [b + [i] for i in range(9)] + [[5, 6, 7], [5, 6, 8]]
    seqs += [header + [400 + i] for i in range(GROUP_MIN - 1)]   # one row short of a group of their own
    groups = sorted((sorted(rows), shared) for rows, shared in prefix_groups(seqs))
    assert groups == [(list(range(9)), 60), (list(range(9, 18)), 60), (list(range(18, len(seqs))), 0)]


def test_stream_logprobs_and_token_id_prompts(engine):
    ids = engine.encode("The cat sat")
    deltas = list(engine.stream(ids, GenParams(max_new_tokens=4, temperature=0, logprobs=2)))
    tokens = [t for d in deltas for t in d.logprobs]
    assert len(tokens) == deltas[-1].completion_tokens == 4 and deltas[-1].prompt_tokens == len(ids)
    assert all(t.top[0] == (t.id, t.logprob) for t in tokens)      # greedy: the top token is the one taken
    scored = engine.score([ids + [tokens[0].id]], prompt=True)[0]
    assert scored.tokens[-1].logprob == pytest.approx(tokens[0].logprob, abs=1e-4)
    text = "".join(d.text for d in engine.stream("The cat sat", GenParams(max_new_tokens=4, temperature=0)))
    assert text == "".join(d.text for d in deltas)                  # ids and text give the same answer
    assert all(d.logprobs == [] for d in engine.stream(ids, GenParams(max_new_tokens=2, temperature=0)))


@pytest.mark.parametrize("call,where", [
    (lambda e: e.stream([1, 2, 10**6], GenParams()), "prompt"),
    (lambda e: e.score([[1, -1]]), "prompt"),
    (lambda e: e.score([[]]), "prompt"),
    (lambda e: e.score([[1] * 600]), "prompt"),
    (lambda e: e.score([[1, 2]], candidates=[10**6]), "candidates"),
    (lambda e: e.score([[1, 2]], top_k=99), "top_k"),
    (lambda e: e.stream("x", GenParams(logprobs=50)), "logprobs"),
])
def test_bad_input_is_named(engine, call, where):
    with pytest.raises(ZhtuneError) as err:
        call(engine)
    assert err.value.where == where


def test_llamacpp_scores_and_stream_logprobs_match_hf(engine, gguf_file):
    from zhtune.infer.resolve import load_engine

    seqs = [engine.encode("The cat sat on the mat"), engine.encode("A dog")]
    want = engine.score(seqs, prompt=True, top_k=2, candidates=[5])
    with load_engine(str(gguf_file), n_ctx=256, n_parallel=2) as gg:
        assert gg.encode("The cat sat on the mat") == seqs[0]
        assert gg.token_bytes(seqs[0]) == engine.token_bytes(seqs[0])
        got = gg.score(seqs, prompt=True, top_k=2, candidates=[5])
        last = gg.score(seqs, prompt=False, candidates=[5])   # reuses the slot's cached prefix
        deltas = list(gg.stream(seqs[0], GenParams(max_new_tokens=3, temperature=0, logprobs=1)))
    for a, b, c in zip(got, want, last):
        assert [t.logprob for t in a.tokens[1:]] == pytest.approx([t.logprob for t in b.tokens[1:]], abs=1e-3)
        assert a.next[5] == pytest.approx(b.next[5], abs=1e-3) and c.next[5] == pytest.approx(b.next[5], abs=1e-3)
    tokens = [t for d in deltas for t in d.logprobs]
    assert len(tokens) == 3 and all(t.top[0] == (t.id, t.logprob) for t in tokens)


def test_score_and_complete_is_score_then_stream(engine):
    """The one-forward path (serve's echo + max_tokens 1) gives what score() and stream() give: prompt log-probs,
    the same token under the request's penalties / sampling seed, its log-prob, stop rules and text."""
    prompts = [engine.encode(t) for t in ("The cat sat on the", "A dog", "Why is the sea blue? Because the")]
    loop = list(engine.stream(prompts[1], GenParams(max_new_tokens=24, temperature=0, repetition_penalty=1.0,
                                                     logprobs=0)))
    prompts[1] += [t.id for d in loop for t in d.logprobs]   # it repeats itself: a penalty changes the next token
    greedy = list(engine.stream(prompts[0], GenParams(max_new_tokens=1, temperature=0, logprobs=1)))
    token = greedy[-1].logprobs[0].id
    edge = (engine.encode("the sea and the sky " * 200) * 2)[:engine.max_model_len - 1]
    cases = [GenParams(max_new_tokens=1, temperature=0, logprobs=2, repetition_penalty=1.3),
             GenParams(max_new_tokens=1, temperature=0, repetition_penalty=1.0, logprobs=0),
             GenParams(max_new_tokens=1, temperature=0.9, top_p=1.0, top_k=0, seed=7, logprobs=3),
             GenParams(max_new_tokens=1, temperature=0, logprobs=1, stop_token_ids=[token]),   # ends at once
             GenParams(max_new_tokens=1, temperature=0, logprobs=1,
                       stop=[engine.tokenizer.decode([token]).strip() or "x"]),
             GenParams(max_new_tokens=1, temperature=0)]
    finishes, picked = [], []
    for n, params in enumerate(cases):
        jobs = [(ids, params) for ids in (prompts + [edge] if n == 0 else prompts)]
        got = engine.score_and_complete(jobs, top_k=2)
        finishes.append([deltas[-1].finish_reason for _, deltas in got])
        picked.append([[t.id for d in deltas for t in d.logprobs] for _, deltas in got])
        want = engine.score([ids for ids, _ in jobs], prompt=True, top_k=2)
        for (ids, _), (scored, deltas), ref in zip(jobs, got, want):
            assert [t.logprob for t in scored.tokens[1:]] == pytest.approx([t.logprob for t in ref.tokens[1:]],
                                                                            abs=1e-4)
            streamed = list(engine.stream(ids, params))
            assert "".join(d.text for d in deltas) == "".join(d.text for d in streamed)
            last, ref_last = deltas[-1], streamed[-1]
            assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == \
                (ref_last.finish_reason, ref_last.prompt_tokens, ref_last.completion_tokens)
            mine = [t for d in deltas for t in d.logprobs]
            theirs = [t for d in streamed for t in d.logprobs]
            assert [t.id for t in mine] == [t.id for t in theirs]
            assert [[i for i, _ in t.top] for t in mine] == [[i for i, _ in t.top] for t in theirs]
            assert [t.logprob for t in mine] == pytest.approx([t.logprob for t in theirs], abs=1e-4)
    assert finishes[0] == ["length"] * 4 and finishes[3][0] == finishes[4][0] == "stop"
    assert picked[0][1] != picked[1][1]    # the penalty mattered, and both paths applied it
    assert engine.score_and_complete([(prompts[0], GenParams(max_new_tokens=2))], top_k=0) is None
