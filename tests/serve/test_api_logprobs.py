"""What evaluation clients need from `zhtune serve`: chat logprobs + top_logprobs, legacy /v1/completions
logprobs with echo (the prompt's log-probs), token-id prompts, max_tokens 0 scoring; the numbers are the
engine's own; bad bodies are 400s naming the field; a lone surrogate anywhere is a 400, never a 500."""

from __future__ import annotations

import json

import httpx
import pytest

USER = [{"role": "user", "content": "hello, who are you?"}]


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=60) as c:
        yield c


def test_chat_logprobs_are_the_greedy_tokens(client, api_url, api_engine):
    r = client.post(f"{api_url}/v1/chat/completions", json={
        "model": "tiny", "messages": USER, "max_tokens": 5, "temperature": 0, "logprobs": True,
        "top_logprobs": 3}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] == 5
    for entry in content:   # greedy: the chosen token is the most likely one
        assert len(entry["top_logprobs"]) == 3 and entry["logprob"] == entry["top_logprobs"][0]["logprob"]
        assert entry["top_logprobs"][0]["token"] == entry["token"] and bytes(entry["bytes"]).decode("utf-8", "replace")
    assert b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", "replace").strip()
    plain = client.post(f"{api_url}/v1/chat/completions", json={
        "model": "tiny", "messages": USER, "max_tokens": 5, "temperature": 0}).json()
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"] == r["choices"][0]["message"]


def test_chat_logprobs_stream(client, api_url):
    with client.stream("POST", f"{api_url}/v1/chat/completions", json={
            "model": "tiny", "messages": USER, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "stream": True}) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    tokens = [e for ev in events for c in ev["choices"] if c.get("logprobs") for e in c["logprobs"]["content"]]
    assert len(tokens) == 6 and all(e["top_logprobs"] == [] for e in tokens)


def test_completions_echo_logprobs_equal_engine_scores(client, api_url, api_engine):
    ids = api_engine.encode("The cat sat on the mat", bos=True)
    r = client.post(f"{api_url}/v1/completions", json={
        "model": "tiny", "prompt": [ids, ids[:4]], "max_tokens": 1, "temperature": 0, "logprobs": 2,
        "echo": True}).json()
    scored = api_engine.score([ids], prompt=True, top_k=2)[0]
    first = sorted(r["choices"], key=lambda c: c["index"])[0]["logprobs"]
    assert len(first["tokens"]) == len(ids) + 1 and first["token_logprobs"][0] is None
    assert first["top_logprobs"][0] is None
    for got, want in zip(first["token_logprobs"][1:len(ids)], scored.tokens[1:]):
        assert got == pytest.approx(want.logprob, abs=1e-4)
    assert first["tokens"][:3] == ["<s>", " The", " c"]
    assert first["text_offset"] == sorted(first["text_offset"]) and first["text_offset"][0] == 0
    # the generated token is the most likely next one: what lm-eval's is_greedy checks
    assert first["token_logprobs"][-1] == max(first["top_logprobs"][-1].values())
    assert max(scored.next.values()) == pytest.approx(first["token_logprobs"][-1], abs=1e-4)
    assert len(r["choices"]) == 2 and len(r["choices"][1]["logprobs"]["tokens"]) == 5


def test_text_prompt_echo_and_score_only(client, api_url, api_engine):
    r = client.post(f"{api_url}/v1/completions", json={
        "model": "tiny", "prompt": "The cat", "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    c = r["choices"][0]
    assert c["text"] == "The cat" and r["usage"]["completion_tokens"] == 0
    ids = api_engine.encode("The cat")
    assert len(c["logprobs"]["tokens"]) == len(ids) and c["logprobs"]["top_logprobs"][1] == {}
    gen = client.post(f"{api_url}/v1/completions", json={
        "model": "tiny", "prompt": "The cat", "max_tokens": 3, "temperature": 0, "logprobs": 1}).json()["choices"][0]
    assert len(gen["logprobs"]["tokens"]) == 3 and gen["logprobs"]["token_logprobs"][0] is not None
    with client.stream("POST", f"{api_url}/v1/completions", json={
            "model": "tiny", "prompt": "The cat", "max_tokens": 3, "temperature": 0, "logprobs": 1,
            "echo": True, "stream": True}) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    streamed = [t for ev in events for ch in ev["choices"] if ch["logprobs"] for t in ch["logprobs"]["token_logprobs"]]
    assert streamed[0] is None and len(streamed) == len(ids) + 3


def test_echo_one_token_from_the_scoring_forward_equals_score_then_generate(client, api_url, api_engine):
    """echo + logprobs + max_tokens 1 (lm-eval's request) takes the token from the forward that scores the prompt;
    streamed, the same request scores and then generates: both answers agree (text, tokens, numbers, usage)."""
    def combined(body, stream):
        if not stream:
            r = client.post(f"{api_url}/v1/completions", json=body).json()
            return r["choices"], r["usage"]
        with client.stream("POST", f"{api_url}/v1/completions",
                           json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
            events = [json.loads(line[5:]) for line in s.iter_lines()
                      if line.startswith("data:") and "[DONE]" not in line]
        choices: dict = {}
        for ev in events:
            for ch in ev["choices"]:
                c = choices.setdefault(ch["index"], {"index": ch["index"], "text": "", "finish_reason": None,
                                                     "logprobs": {"tokens": [], "token_logprobs": [],
                                                                  "top_logprobs": [], "text_offset": []}})
                c["text"] += ch["text"]
                c["finish_reason"] = ch["finish_reason"] or c["finish_reason"]
                for key in c["logprobs"]:
                    c["logprobs"][key] += (ch["logprobs"] or {}).get(key) or []
        return [choices[i] for i in sorted(choices)], events[-1]["usage"]

    ids = api_engine.encode("The cat sat on the mat and", bos=True)
    for body in ({"prompt": [ids, ids[:5]], "temperature": 0, "logprobs": 2},
                 {"prompt": "The cat sat", "temperature": 0, "logprobs": 0, "repetition_penalty": 1.0},
                 {"prompt": "A dog", "temperature": 0.8, "seed": 3, "logprobs": 1, "n": 2}):
        body = {"model": "tiny", "max_tokens": 1, "echo": True, **body}
        (one, use_one), (two, use_two) = combined(body, False), combined(body, True)
        assert use_one == use_two and len(one) == len(two)
        for a, b in zip(sorted(one, key=lambda c: c["index"]), two):
            assert (a["text"], a["finish_reason"]) == (b["text"], b["finish_reason"])
            la, lb = a["logprobs"], b["logprobs"]
            assert la["tokens"] == lb["tokens"] and la["text_offset"] == lb["text_offset"]
            assert la["token_logprobs"][0] is None and lb["token_logprobs"][0] is None
            assert la["token_logprobs"][1:] == pytest.approx(lb["token_logprobs"][1:], abs=1e-4)
            assert [sorted((t or {})) for t in la["top_logprobs"]] == [sorted((t or {})) for t in lb["top_logprobs"]]


SURROGATE = "\ud800"
BAD = [
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "logprobs": 30}, "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 2, 10**6]}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [[1, 2], [3, 10**6]]}, "prompt.1"),
    ("/v1/completions", {"model": "tiny", "prompt": [[1, 2], []]}, "prompt.1"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 0, "echo": True}, "max_tokens"),
    # defect 15: a lone surrogate is not text
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": SURROGATE}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a" + SURROGATE}]}]}, "messages.0.content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "stop": [SURROGATE]}, "stop"),
    ("/v1/chat/completions", {"model": SURROGATE, "messages": USER}, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": SURROGATE}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["ok", SURROGATE]}, "prompt"),
    ("/v1/embeddings", {"model": "tiny", "input": SURROGATE}, "input"),
    ("/v1/embeddings", {"model": "tiny", "input": ["ok", "x" + SURROGATE]}, "input"),
]


def post_raw(client, url, body):
    # json.dumps keeps a lone surrogate as the escape "\ud800", exactly what a client may send
    return client.post(url, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{b[0]}:{b[2]}:{i}" for i, b in enumerate(BAD)])
def test_bad_bodies_name_the_field(client, api_url, path, body, param):
    r = post_raw(client, f"{api_url}{path}", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


@pytest.fixture(scope="module")
def llamacpp_url(gguf_file, serve_app):
    from zhtune.infer.resolve import load_engine
    from zhtune.serve.api import create_app

    engine = load_engine(str(gguf_file), n_ctx=256, n_parallel=2)
    with serve_app(create_app(engine, served_model_name="tiny", max_concurrency=2)) as url:
        yield url, engine
    engine.close()


def test_llamacpp_backend_logprobs_and_surrogates(client, llamacpp_url, api_engine):
    url, engine = llamacpp_url
    for path, body, param in BAD[7:]:
        r = post_raw(client, f"{url}{path}", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, r.text)
    ids = api_engine.encode("The cat sat on the mat")
    r = client.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 1,
                                                   "temperature": 0, "logprobs": 1, "echo": True}).json()
    want = api_engine.score([ids], prompt=True)[0]
    got = r["choices"][0]["logprobs"]["token_logprobs"]
    assert got[0] is None and len(got) == len(ids) + 1
    assert got[1:len(ids)] == pytest.approx([t.logprob for t in want.tokens[1:]], abs=1e-3)
    chat = client.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 3,
                                                           "temperature": 0, "logprobs": True, "top_logprobs": 2})
    assert len(chat.json()["choices"][0]["logprobs"]["content"]) == 3
