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
