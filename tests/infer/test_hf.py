"""hf backend: greedy output equals transformers' generate, concurrent streams equal single ones,
stops/lengths/cancel/seed behave, Chinese streams never break a character, adapters apply unmerged."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import GenParams, PromptTooLong
from zhtune.infer.resolve import load_engine

GREEDY = dict(temperature=0, repetition_penalty=1.0)
CHAT = [{"role": "user", "content": "你好，请介绍一下北京。Tell me about Beijing."}]


def text_of(stream) -> tuple[str, object]:
    deltas = list(stream)
    assert deltas[-1].finish_reason in ("stop", "length")
    assert all(d.finish_reason is None for d in deltas[:-1])
    return "".join(d.text for d in deltas), deltas[-1]


def test_greedy_matches_transformers_generate(engine):
    ids = engine.tokenize_prompt(CHAT)
    assert ids[0] == engine.tokenizer.bos_token_id and ids.count(engine.tokenizer.bos_token_id) == 1
    want = engine.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(ids):]
    text, last = text_of(engine.stream(CHAT, GenParams(max_new_tokens=24, **GREEDY)))
    assert text == engine.tokenizer.decode(want, skip_special_tokens=True)
    assert last.finish_reason == "length" and last.completion_tokens == 24 and last.prompt_tokens == len(ids)


def test_concurrent_staggered_streams_equal_single_runs(engine):
    prompts = [[{"role": "user", "content": "问题 " + "长" * i + f" question {i}"}] for i in range(6)]
    params = GenParams(max_new_tokens=16, **GREEDY)
    single = [text_of(engine.stream(p, params))[0] for p in prompts]
    results = [None] * len(prompts)

    def run(i):
        results[i] = text_of(engine.stream(prompts[i], params))[0]

    threads = []
    for i in range(len(prompts)):   # staggered: later rows join a batch that is already decoding
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
        time.sleep(0.01 * i)
    for t in threads:
        t.join(60)
    assert results == single
    batch = engine.generate(prompts, params)
    assert [c.text for c in batch] == single and all(c.completion_tokens == 16 for c in batch)


def test_stop_string_is_cut_and_never_emitted(engine):
    params = GenParams(max_new_tokens=30, **GREEDY)
    full, _ = text_of(engine.stream(CHAT, params))
    stop = full[6:9]
    assert len(stop) == 3
    text, last = text_of(engine.stream(CHAT, GenParams(max_new_tokens=30, stop=[stop], **GREEDY)))
    assert text == full[: full.index(stop)] and last.finish_reason == "stop"
    assert stop not in text


def test_stop_token_ids_and_eos(engine):
    ids = engine.tokenize_prompt(CHAT)
    gen = engine.model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(ids):].tolist()
    stop_id = gen[4]
    n = gen.index(stop_id) + 1
    text, last = text_of(engine.stream(CHAT, GenParams(max_new_tokens=10, stop_token_ids=[stop_id], **GREEDY)))
    assert last.finish_reason == "stop" and last.completion_tokens == n
    assert text == engine.tokenizer.decode(gen[: n - 1], skip_special_tokens=True)


def test_close_cancels_generation(engine):
    stream = engine.stream(CHAT, GenParams(max_new_tokens=400, **GREEDY))
    next(stream)
    stream.close()
    deadline = time.time() + 5
    while engine.active and time.time() < deadline:
        time.sleep(0.01)
    assert engine.active == 0
    text, last = text_of(engine.stream(CHAT, GenParams(max_new_tokens=3, **GREEDY)))
    assert last.completion_tokens == 3


def test_seed_reproducible_and_sampling_params(engine):
    p = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50, repetition_penalty=1.2,
             frequency_penalty=0.5, presence_penalty=0.5)
    a = text_of(engine.stream(CHAT, GenParams(seed=7, **p)))[0]
    b = text_of(engine.stream(CHAT, GenParams(seed=7, **p)))[0]
    c = text_of(engine.stream(CHAT, GenParams(seed=8, **p)))[0]
    assert a == b and a != c


def test_penalties_as_logits_processors():
    from zhtune.infer.hf_decode import Request, sample

    logits = torch.tensor([3.0, 2.9, 0.0, -1.0])
    r = Request([0], GenParams(temperature=0, repetition_penalty=1.0, presence_penalty=0.5), [])
    r.counts = torch.tensor([1.0, 0, 0, 0])
    assert sample(torch, r, logits.clone()) == 1               # 3.0 - 0.5 < 2.9
    r = Request([0], GenParams(temperature=0, repetition_penalty=2.0), [])
    r.all_ids = torch.tensor([[0]])
    assert sample(torch, r, logits.clone()) == 1               # 3.0 / 2 < 2.9
    r = Request([0], GenParams(temperature=1.0, top_k=1, repetition_penalty=1.0), [])
    r.rng = torch.Generator().manual_seed(0)
    assert {sample(torch, r, logits.clone()) for _ in range(20)} == {0}
    r = Request([0], GenParams(temperature=1.0, top_k=0, top_p=0.6, repetition_penalty=1.0), [])
    r.rng = torch.Generator().manual_seed(0)
    assert {sample(torch, r, logits.clone()) for _ in range(50)} <= {0, 1}


def test_chinese_incremental_decode_never_breaks_a_character(engine):
    """The base tokenizer has no Chinese pieces: every character is 3 byte tokens. Feeding them one at
    a time must release whole characters only, and the pieces must join to the original."""
    from zhtune.infer.hf_decode import Batch, Request

    text = "你好，世界！中文 mixed English 。"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)     # byte fallback is really in play
    batch = Batch(engine, None)
    r = Request([1], GenParams(), [])
    batch.start(r)
    pieces = []
    for t in ids:
        r.generated.append(t)
        pieces.append(batch._text(r, flush=False))
    pieces.append(batch._text(r, flush=True))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == engine.tokenizer.decode(ids)


def test_prompt_too_long_and_bad_params(engine):
    long = [{"role": "user", "content": "word " * 600}]
    with pytest.raises(PromptTooLong) as exc:
        engine.stream(long, GenParams())
    assert exc.value.prompt_tokens >= 512 and exc.value.max_model_len == 512
    with pytest.raises(ZhtuneError) as exc:
        engine.stream(CHAT, GenParams(temperature=-1))
    assert exc.value.where == "temperature"
    with pytest.raises(ZhtuneError) as exc:
        engine.stream(CHAT, GenParams(stop_token_ids=[10**6]))
    assert exc.value.where == "stop_token_ids"
    # a prompt that fits but leaves less room than max_new_tokens stops at the context
    near = [{"role": "user", "content": "word " * 240}]
    n = len(engine.tokenize_prompt(near))
    text, last = text_of(engine.stream(near, GenParams(max_new_tokens=1000, **GREEDY)))
    assert last.finish_reason == "length" and last.completion_tokens == 512 - n


def test_no_deprecated_cache_keyword(engine):
    """The KV cache goes to the model by the name its forward declares (transformers 5.25: `cache`), so a
    generation and a shared-prefix scoring raise no FutureWarning (it printed on every request)."""
    import warnings

    header = engine.encode("A header shared by every question below, long enough to run once. " * 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text_of(engine.stream(CHAT, GenParams(max_new_tokens=4, **GREEDY)))
        engine.score([header + engine.encode(f"question {i}", bos=False) for i in range(10)], prompt=False)
    assert engine.cache_arg in ("cache", "past_key_values")
    assert [str(w.message) for w in caught if "cache" in str(w.message) or "past_key" in str(w.message)] == []


def test_embed_is_normalised_mean_pool(engine):
    vecs = engine.embed(["hello world", "你好", "hello world"])
    assert len(vecs) == 3 and len(vecs[0]) == engine.model.config.hidden_size
    for v in vecs:
        assert abs(sum(x * x for x in v) - 1) < 1e-4
    assert vecs[0] == pytest.approx(vecs[2], abs=1e-5)
    assert vecs[0] == pytest.approx(engine.embed(["hello world"])[0], abs=1e-4)   # padding is masked out


def test_adapter_applied_unmerged_and_found_from_run_yaml(tiny_model_dir, lora_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_dir).eval()
    with load_engine(str(tiny_model_dir), loras=[str(lora_dir)]) as eng, \
            load_engine(str(lora_dir.parent)) as alone:
        assert alone.spec.base == tiny_model_dir and alone.template.name == "alpaca"
        assert alone.spec.template_source == "run.yaml"
        ids = torch.tensor([eng.tokenize_prompt(CHAT)])
        with torch.no_grad():
            want = ref(ids).logits
            assert torch.allclose(eng.model(ids).logits, want, atol=1e-5)
            assert torch.allclose(alone.model(ids).logits, want, atol=1e-5)
        base_text = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
        assert not torch.allclose(base_text, want, atol=1e-3)
        p = GenParams(max_new_tokens=8, **GREEDY)
        assert text_of(eng.stream(CHAT, p))[0] == text_of(alone.stream(CHAT, p))[0]


def test_adapter_with_resized_vocab(tmp_path, tiny_model_dir, base_tokenizer_dir):
    from transformers import AutoTokenizer

    from .conftest import make_lora

    tok = AutoTokenizer.from_pretrained(base_tokenizer_dir)
    tok.add_tokens(["你好", "北京"])
    tok.save_pretrained(tmp_path / "tok")
    adapter = make_lora(tiny_model_dir, tmp_path / "out", resize_to=len(tok), tokenizer_dir=tmp_path / "tok")
    with load_engine(str(adapter)) as eng:
        assert len(eng.tokenizer) == 1002 and eng.vocab_size == 1002
        assert eng.tokenizer.convert_tokens_to_ids("北京") == 1001
        text, last = text_of(eng.stream(CHAT, GenParams(max_new_tokens=4, **GREEDY)))
        assert last.completion_tokens == 4


def test_adapter_for_another_base_is_refused(tiny_model_dir, other_base_lora):
    with pytest.raises(ZhtuneError) as exc:
        load_engine(str(tiny_model_dir), loras=[str(other_base_lora)])
    assert "another base" in exc.value.what and "--lora" in exc.value.where


def test_template_resolution_and_bad_paths(tmp_path, tiny_model_dir, copy_of):
    from transformers import AutoTokenizer

    from zhtune.data.templates import get_template, install
    from zhtune.infer.resolve import resolve_model

    assert resolve_model(tiny_model_dir).template.name == "default"
    assert resolve_model(tiny_model_dir, template="llama2").template_source == "--template"
    model = copy_of(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(model)
    install(tok, get_template("vicuna"))
    tok.save_pretrained(model)
    spec = resolve_model(model)
    assert spec.template.name == "vicuna" and spec.template_source == "chat_template"
    with pytest.raises(ZhtuneError) as exc:
        resolve_model(tiny_model_dir, template="lama2")
    assert exc.value.where == "--template" and "llama2" in exc.value.hint
    with pytest.raises(ZhtuneError) as exc:
        load_engine(str(tmp_path / "missing"))
    assert exc.value.where == "--model"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZhtuneError, match="not a model"):
        load_engine(str(tmp_path / "empty"))
    with pytest.raises(ZhtuneError) as exc:
        load_engine(str(tiny_model_dir), backend="onnx")
    assert exc.value.where == "--backend"
    with pytest.raises(ZhtuneError) as exc:
        load_engine(str(tiny_model_dir), loras=[str(tmp_path / "empty")])
    assert "--lora" in exc.value.where


def test_template_stop_string_ends_generation(engine):
    """Stop strings of the template (e.g. "\\nHuman:" for default) work like user stop strings."""
    from zhtune.infer.engine import StopFilter

    f = StopFilter(["\nHuman:"])
    out = [f.feed(p) for p in ["Hi", " there\n", "Hu", "man: more"]]
    assert "".join(t for t, _ in out) == "Hi there" and out[-1][1]
    f = StopFilter(["\nHuman:"])
    assert f.feed("a\nHu")[0] == "a" and f.feed("go")[0] == "\nHugo"


def test_dtype_and_8bit_weights(tiny_model_dir):
    """bf16 and bitsandbytes 8-bit load and generate (bitsandbytes runs on this CPU too)."""
    pytest.importorskip("bitsandbytes")
    p = GenParams(max_new_tokens=4, **GREEDY)
    with load_engine(str(tiny_model_dir), dtype="bf16") as eng:
        assert eng.model.dtype == torch.bfloat16 and text_of(eng.stream(CHAT, p))[1].completion_tokens == 4
    with load_engine(str(tiny_model_dir), load_in_8bit=True) as eng:
        assert type(eng.model.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
        assert text_of(eng.stream(CHAT, p))[1].completion_tokens == 4
    with pytest.raises(ZhtuneError, match="both"):
        load_engine(str(tiny_model_dir), load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(ZhtuneError) as exc:
        load_engine(str(tiny_model_dir), dtype="fp8")
    assert exc.value.where == "--dtype"
    with pytest.raises(ZhtuneError, match="unknown option"):
        load_engine(str(tiny_model_dir), n_threads=2)


def test_extreme_parameters_never_break_sampling(engine):
    """Values inside the validated ranges but numerically extreme (what an API fuzzer sends)."""
    for kw in ({"temperature": 1e-300}, {"temperature": 5.0, "repetition_penalty": 1e-30},
               {"temperature": 1.0, "top_p": 1e-300, "top_k": 1}, {"temperature": 1.0, "repetition_penalty": 10.0,
                                                                   "frequency_penalty": 2.0, "presence_penalty": -2.0}):
        text, last = text_of(engine.stream(CHAT, GenParams(max_new_tokens=3, seed=0, **kw)))
        assert last.completion_tokens == 3 or last.finish_reason == "stop", kw
    text, last = text_of(engine.stream("", GenParams(max_new_tokens=2)))   # an empty raw prompt is just BOS
    assert last.prompt_tokens == 1
