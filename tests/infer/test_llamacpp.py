"""llamacpp backend on a GGUF exported from the tiny model: same prompt ids and greedy text as the hf
backend, stops, cancel, serialised concurrent streams, template from the GGUF, bad files refused."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("llama_cpp")

from zhtune.errors import ZhtuneError  # noqa: E402
from zhtune.infer.engine import GenParams, PromptTooLong  # noqa: E402
from zhtune.infer.resolve import load_engine  # noqa: E402

GREEDY = {"temperature": 0, "repetition_penalty": 1.0}
CHAT = [{"role": "user", "content": "你好，请介绍一下北京。Tell me about Beijing."}]
CONVS = [
    CHAT,
    [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "第一轮 hi"},
     {"role": "assistant", "content": "好的 ok"}, {"role": "user", "content": "第二轮\nagain"}],
]


@pytest.fixture(scope="session")
def cpp(gguf_file):
    eng = load_engine(str(gguf_file), n_threads=2)
    yield eng
    eng.close()


def text_of(stream):
    deltas = list(stream)
    assert deltas[-1].finish_reason in ("stop", "length")
    return "".join(d.text for d in deltas), deltas[-1]


@pytest.mark.parametrize("template", ["default", "alpaca", "llama2", "vicuna"])
def test_prompt_ids_match_training_tokenizer(cpp, engine, template):
    from zhtune.data.templates import get_template

    cpp.template = engine.template = get_template(template)
    try:
        for conv in CONVS:
            assert cpp.tokenize_prompt(conv) == engine.tokenize_prompt(conv)
        assert cpp.tokenize_prompt("raw text 你好") == engine.tokenize_prompt("raw text 你好")
    finally:
        cpp.template = engine.template = get_template("default")


def test_greedy_text_matches_hf_backend(cpp, engine):
    assert cpp.backend == "llamacpp" and cpp.template.name == "default" and cpp.max_model_len == 512
    p = GenParams(max_new_tokens=20, **GREEDY)
    a, last = text_of(cpp.stream(CHAT, p))
    b, _ = text_of(engine.stream(CHAT, p))
    # invalid byte runs from a random model: python's decoder writes one U+FFFD per run, HF one per byte
    assert a.replace("\ufffd", "") == b.replace("\ufffd", "")
    assert last.finish_reason == "length" and last.completion_tokens == 20
    assert last.prompt_tokens == len(engine.tokenize_prompt(CHAT))


def test_stops_and_lengths(cpp):
    full, _ = text_of(cpp.stream(CHAT, GenParams(max_new_tokens=30, **GREEDY)))
    stop = full[8:11]
    text, last = text_of(cpp.stream(CHAT, GenParams(max_new_tokens=30, stop=[stop], **GREEDY)))
    assert text == full[: full.index(stop)] and last.finish_reason == "stop"
    from llama_cpp import Llama

    raw = Llama(str(cpp.path), verbose=False)
    gen = [t for _, t in zip(range(10), raw.generate(cpp.tokenize_prompt(CHAT), temp=0, top_k=1, repeat_penalty=1.0))]
    raw.close()
    text, last = text_of(cpp.stream(CHAT, GenParams(max_new_tokens=10, stop_token_ids=[gen[5]], **GREEDY)))
    assert last.finish_reason == "stop" and last.completion_tokens == gen.index(gen[5]) + 1
    with pytest.raises(PromptTooLong):
        cpp.stream([{"role": "user", "content": "word " * 600}], GenParams())
    with pytest.raises(ZhtuneError) as exc:
        cpp.stream(CHAT, GenParams(top_p=0))
    assert exc.value.where == "top_p"


def test_concurrent_streams_are_batched_and_close_cancels(cpp):
    prompts = [[{"role": "user", "content": "问题 " + "长" * i + f" question {i}"}] for i in range(6)]
    p = GenParams(max_new_tokens=12, **GREEDY)
    single = [text_of(cpp.stream(q, p))[0] for q in prompts]
    results = [None] * len(prompts)

    def run(i):
        results[i] = text_of(cpp.stream(prompts[i], p))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == single                    # rows decoded together give each row's own answer
    assert [c.text for c in cpp.generate(prompts, p)] == single
    s = cpp.stream(CHAT, GenParams(max_new_tokens=400, **GREEDY))
    next(s)
    s.close()
    deadline = time.time() + 5
    while cpp.active and time.time() < deadline:
        time.sleep(0.01)
    assert cpp.active == 0


def test_seed_and_embed(cpp):
    p = {"max_new_tokens": 10, "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    a = text_of(cpp.stream(CHAT, GenParams(seed=3, **p)))[0]
    assert a == text_of(cpp.stream(CHAT, GenParams(seed=3, **p)))[0]
    v = cpp.embed(["hello world", "你好"])
    assert len(v) == 2 and abs(sum(x * x for x in v[0]) - 1) < 1e-4


def test_template_from_gguf_chat_template(tmp_path, tiny_model_dir, copy_of):
    from transformers import AutoTokenizer

    from zhtune.data.templates import get_template, install
    from zhtune.export.gguf import export_gguf

    model = copy_of(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(model)
    install(tok, get_template("llama2-zh"))
    tok.save_pretrained(model)
    out = export_gguf(model, tmp_path / "t.gguf", quant="f16", modelfile=False, log=lambda *a: None)
    with load_engine(str(out)) as eng:
        assert eng.template.name == "llama2-zh"
    with load_engine(str(out), template="vicuna") as eng:
        assert eng.template.name == "vicuna"


def test_bad_gguf_inputs(tmp_path, gguf_file, lora_dir):
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    with pytest.raises(ZhtuneError, match="not a GGUF"):
        load_engine(str(fake))
    with pytest.raises(ZhtuneError) as exc:
        load_engine(str(tmp_path / "missing.gguf"))
    assert exc.value.where == "--model"
    with pytest.raises(ZhtuneError) as exc:
        load_engine(str(gguf_file), loras=[str(lora_dir)])
    assert exc.value.where == "--lora"
    with pytest.raises(ZhtuneError) as exc:
        load_engine(str(gguf_file), template="nope")
    assert exc.value.where == "--template"
    with pytest.raises(ZhtuneError) as exc:
        load_engine(str(gguf_file), n_threads_batch=0)
    assert exc.value.where == "n_threads_batch"


def test_thread_counts_reach_the_llama_context(gguf_file, monkeypatch):
    """Half the CPUs for every step by default (llama.cpp's server default); --threads sets both
    (llama.cpp's -t); --threads-batch sets batched steps alone (-tb)."""
    import llama_cpp

    monkeypatch.setattr("os.cpu_count", lambda: 4)
    for options, want in (({}, (2, 2)), ({"n_threads": 1}, (1, 1)), ({"n_threads": 1, "n_threads_batch": 3}, (1, 3))):
        with load_engine(str(gguf_file), n_parallel=2, **options) as eng:
            got = (llama_cpp.llama_n_threads(eng.ctx.ctx), llama_cpp.llama_n_threads_batch(eng.ctx.ctx))
            assert got == want, options
            text, last = text_of(eng.stream(CHAT, GenParams(max_new_tokens=3, **GREEDY)))
            assert last.completion_tokens == 3
