"""The engine's log-prob contract: Engine.score (prompt log-probs, candidates, shared prefixes computed once),
GenParams.logprobs on streams, token-id prompts; hf against a direct transformers computation, llama.cpp
against hf."""

from __future__ import annotations

import pytest

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import GenParams


def reference(model_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].log_softmax(-1)


def test_score_matches_transformers_with_shared_prefixes(engine, tiny_model_dir):
    header = engine.encode("The following are questions about the weather and the sea. " * 2)
    seqs = [header + engine.encode(q, bos=False) for q in ("Is it cold?", "Why is the sea blue today", "Rain")]
    seqs.append(engine.encode("A short one"))
    nxt = engine.score(seqs, prompt=False, top_k=3, candidates=[5, 7])   # the first three share ~30 tokens
    full = engine.score(seqs, prompt=True, top_k=2)
    for ids, a, b in zip(seqs, nxt, full):
        ref = reference(tiny_model_dir, ids)
        assert a.tokens == [] and a.next[5] == pytest.approx(float(ref[-1, 5]), abs=1e-4)
        top = ref[-1].topk(3)
        assert all(a.next[int(i)] == pytest.approx(float(v), abs=1e-4) for v, i in zip(*top))
        assert b.tokens[0] is None and len(b.tokens) == len(ids)
        for pos in range(1, len(ids)):
            assert b.tokens[pos].id == ids[pos]
            assert b.tokens[pos].logprob == pytest.approx(float(ref[pos - 1, ids[pos]]), abs=1e-4)
            assert b.tokens[pos].top[0][1] == pytest.approx(float(ref[pos - 1].max()), abs=1e-4)


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
