"""vllm backend: a clear error where vLLM or a GPU is missing; on a GPU machine with vLLM, the same
greedy text as the hf backend for the tiny model."""

from __future__ import annotations

import importlib.util

import pytest

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import GenParams
from zhtune.infer.resolve import load_engine


def _has_vllm_and_gpu() -> bool:
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.skipif(_has_vllm_and_gpu(), reason="vLLM and a GPU are present: the real test runs instead")
def test_clear_error_without_vllm_or_gpu(tiny_model_dir):
    with pytest.raises(ZhtuneError) as exc:
        load_engine(str(tiny_model_dir), backend="vllm")
    assert exc.value.where == "--backend vllm"
    assert "vLLM" in exc.value.what or "GPU" in exc.value.what


@pytest.mark.gpu
def test_vllm_matches_hf_greedy(tiny_model_dir, engine):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    chat = [{"role": "user", "content": "你好 hello"}]
    p = GenParams(max_new_tokens=16, temperature=0, repetition_penalty=1.0)
    with load_engine(str(tiny_model_dir), backend="vllm", gpu_memory_utilization=0.3, dtype="float32") as eng:
        assert eng.tokenize_prompt(chat) == engine.tokenize_prompt(chat)
        deltas = list(eng.stream(chat, p))
        assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 16
        want = "".join(d.text for d in engine.stream(chat, p))
        assert "".join(d.text for d in deltas).replace("\ufffd", "") == want.replace("\ufffd", "")


@pytest.mark.gpu
def test_vllm_scores_and_logprobs_match_hf(tiny_model_dir, engine):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    seqs = [engine.encode("The cat sat on the mat"), engine.encode("A dog")]
    want = engine.score(seqs, prompt=True, top_k=2, candidates=[5, 7])
    with load_engine(str(tiny_model_dir), backend="vllm", gpu_memory_utilization=0.3, dtype="float32") as eng:
        got = eng.score(seqs, prompt=True, top_k=2, candidates=[5, 7])
        nxt = eng.score(seqs, prompt=False, candidates=[5, 7])
        deltas = list(eng.stream(seqs[0], GenParams(max_new_tokens=3, temperature=0, logprobs=1)))
    for a, b, c in zip(got, want, nxt):
        assert [t.logprob for t in a.tokens[1:]] == pytest.approx([t.logprob for t in b.tokens[1:]], abs=1e-3)
        assert [a.next[5], c.next[7]] == pytest.approx([b.next[5], b.next[7]], abs=1e-3)
    tokens = [t for d in deltas for t in d.logprobs]
    assert len(tokens) == 3 and all(t.top[0] == (t.id, t.logprob) for t in tokens)
