"""The OpenAI protocol of `zhtune serve` against a real uvicorn server and the real hf engine on the
tiny model: response shapes, streaming, usage, sampling parameters, embeddings, errors, auth, 413."""

from __future__ import annotations

import base64
import json
import math
import struct

import httpx
import pytest

USER = [{"role": "user", "content": "hello, who are you?"}]


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=60) as c:
        yield c


def chat(client, url, **body):
    return client.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": USER, **body})


def sse_events(response) -> list:
    """The `data:` payloads of an SSE response, JSON-decoded (except the final [DONE])."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_and_models(client, api_url):
    health = client.get(f"{api_url}/health").json()
    assert health["status"] == "ok" and health["backend"] == "hf" and health["active_generations"] == 0
    models = client.get(f"{api_url}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == 512
    assert client.get(f"{api_url}/v1/models/tiny").json()["id"] == "tiny"
    assert client.get(f"{api_url}/v1/models/other").status_code == 404


def test_chat_non_stream_shape_and_usage(client, api_url):
    r = chat(client, api_url, max_tokens=5, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("length", "stop")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 5


def test_stream_equals_non_stream_and_reports_usage(client, api_url):
    whole = chat(client, api_url, max_tokens=12, temperature=0).json()
    with client.stream("POST", f"{api_url}/v1/chat/completions",
                       json={"model": "tiny", "messages": USER, "max_tokens": 12, "temperature": 0, "stream": True,
                             "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == whole["choices"][0]["finish_reason"] and not any(finishes[:-1])
    # the usage chunk comes last, with no choices; the others carry usage null
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stream_with_n_choices_and_max_completion_tokens(client, api_url):
    whole = chat(client, api_url, max_completion_tokens=5, temperature=0, user="u1").json()
    assert whole["usage"]["completion_tokens"] <= 5
    with client.stream("POST", f"{api_url}/v1/chat/completions", json={
            "model": "tiny", "messages": USER, "max_completion_tokens": 5, "temperature": 0, "n": 2,
            "stream": True}) as r:
        events = sse_events(r)
    texts, finishes = ["", ""], [None, None]
    for chunk in events[:-1]:
        for c in chunk["choices"]:
            texts[c["index"]] += c["delta"].get("content", "")
            finishes[c["index"]] = c["finish_reason"] or finishes[c["index"]]
    assert texts == [whole["choices"][0]["message"]["content"]] * 2
    assert finishes == [whole["choices"][0]["finish_reason"]] * 2


def test_stop_string_cuts_the_text(client, api_url):
    full = chat(client, api_url, max_tokens=24, temperature=0).json()["choices"][0]["message"]["content"]
    cut = len(full) // 2
    stop = full[cut:cut + 3]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    expected = full[: full.find(stop)]
    for stops in (stop, [stop, "never-appears-zz"]):
        r = chat(client, api_url, max_tokens=24, temperature=0, stop=stops).json()
        assert r["choices"][0]["message"]["content"] == expected
        assert r["choices"][0]["finish_reason"] == "stop"


def test_n_choices_and_seed_repeat(client, api_url):
    body = {"max_tokens": 8, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "n": 3, "seed": 7}
    first = chat(client, api_url, **body).json()
    again = chat(client, api_url, **body).json()
    texts = [c["message"]["content"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts == [c["message"]["content"] for c in again["choices"]]   # same seed, same samples
    assert len(set(texts)) > 1                                              # n samples differ
    assert 3 <= first["usage"]["completion_tokens"] <= 3 * 8


def test_multi_turn_and_text_parts(client, api_url):
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and then?"}]
    parts = [dict(m, content=[{"type": "text", "text": m["content"]}]) for m in turns]
    a = client.post(f"{api_url}/v1/chat/completions",
                    json={"model": "tiny", "messages": turns, "max_tokens": 6, "temperature": 0}).json()
    b = client.post(f"{api_url}/v1/chat/completions",
                    json={"model": "tiny", "messages": parts, "max_tokens": 6, "temperature": 0}).json()
    single = chat(client, api_url, max_tokens=6, temperature=0).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    # the history is in the prompt: more prompt tokens than a single turn
    assert a["usage"]["prompt_tokens"] > single["usage"]["prompt_tokens"]


def test_completions_prompts_n_echo_and_stream(client, api_url):
    r = client.post(f"{api_url}/v1/completions", json={
        "model": "tiny", "prompt": ["The cat", "A dog"], "n": 2, "max_tokens": 4, "temperature": 0}).json()
    assert r["object"] == "text_completion" and [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["choices"][0]["text"] == r["choices"][1]["text"]     # greedy: n copies agree
    echo = client.post(f"{api_url}/v1/completions", json={
        "model": "tiny", "prompt": "The cat", "max_tokens": 4, "temperature": 0, "echo": True}).json()
    assert echo["choices"][0]["text"] == "The cat" + r["choices"][0]["text"]
    with client.stream("POST", f"{api_url}/v1/completions", json={
            "model": "tiny", "prompt": "The cat", "max_tokens": 4, "temperature": 0, "stream": True}) as s:
        events = sse_events(s)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == r["choices"][0]["text"]


def test_embeddings_float_and_base64(client, api_url):
    texts = ["你好世界", "hello world"]
    f = client.post(f"{api_url}/v1/embeddings", json={"model": "tiny", "input": texts}).json()
    b = client.post(f"{api_url}/v1/embeddings",
                    json={"model": "tiny", "input": texts, "encoding_format": "base64"}).json()
    assert [d["index"] for d in f["data"]] == [0, 1] and f["usage"]["prompt_tokens"] > 0
    for fd, bd in zip(f["data"], b["data"]):
        vec = fd["embedding"]
        assert len(vec) == 64 and math.isclose(math.sqrt(sum(x * x for x in vec)), 1.0, rel_tol=1e-4)
        raw = base64.b64decode(bd["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert max(abs(x - y) for x, y in zip(decoded, vec)) < 1e-6
    assert f["data"][0]["embedding"] != f["data"][1]["embedding"]


# --- errors: OpenAI's shape and the right status, never a 500 --------------------------------------
LONG = "hello " * 700   # > 512 tokens of context

BAD_REQUESTS = [
    # (path, body, status, param, words in the message)
    ("/v1/chat/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/chat/completions", [1, 2], 400, None, ""),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", ""),
    ("/v1/chat/completions", {"model": "nope", "messages": USER}, 404, "model", "nope"),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "temperature": 9}, 400, "temperature", "[0, 5]"),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": 0}, 400, "max_tokens", ""),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": "many"}, 400, "max_tokens", ""),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "n": 0}, 400, "n", ""),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "seed": -5}, 400, "seed", ""),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "frequency_penalty": 3}, 400,
     "frequency_penalty", ""),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "stop": ["x"] * 20}, 400, "stop", ""),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "stop_token_ids": [10**6]}, 400,
     "stop_token_ids", ""),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages.0.role", ""),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": None}]}, 400,
     "messages.0.content", ""),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "assistant", "content": "a"}]}, 400,
     "messages", "no user message"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     400, "messages.2", "role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "tools": [{"type": "function"}]}, 400,
     "tools", "not supported"),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "top_logprobs": 1}, 400, "top_logprobs",
     "logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": LONG}]}, 400,
     "messages", "512"),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": 600}, 400, "max_tokens", "512"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "prompt", ""),
    ("/v1/completions", {"model": "tiny", "prompt": LONG}, 400, "prompt", "512"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a"] * 40, "n": 2}, 400, "n", ""),
    ("/v1/embeddings", {"model": "tiny", "input": []}, 400, "input", ""),
    ("/v1/embeddings", {"model": "tiny", "input": ""}, 400, "input", ""),
    ("/v1/embeddings", {"model": "tiny", "input": LONG}, 400, "input", "512"),
    ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model", ""),
]


@pytest.mark.parametrize("path,body,status,param,words", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(client, api_url, path, body, status, param, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(f"{api_url}{path}", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if param:
        assert error["param"] == param, error
    assert words in error["message"]


def test_unknown_route_and_method_are_openai_errors(client, api_url):
    r = client.get(f"{api_url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = client.get(f"{api_url}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_api_key_required(client, api_key_url, api_key):
    body = {"model": "tiny", "messages": USER, "max_tokens": 2}
    r = client.post(f"{api_key_url}/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key"
    r = client.post(f"{api_key_url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "incorrect" in r.json()["error"]["message"]
    assert client.get(f"{api_key_url}/v1/models").status_code == 401
    ok = client.post(f"{api_key_url}/v1/chat/completions", json=body,
                     headers={"Authorization": f"Bearer {api_key}"})
    assert ok.status_code == 200, ok.text
    assert client.get(f"{api_key_url}/health").status_code == 200   # liveness needs no key


def test_body_too_large_is_413_with_or_without_content_length(client, api_key_url, api_key):
    auth = {"Authorization": f"Bearer {api_key}", "content-type": "application/json"}
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    r = client.post(f"{api_key_url}/v1/chat/completions", content=big, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the server counts what arrives
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    r = client.post(f"{api_key_url}/v1/chat/completions", content=chunked(), headers=auth)
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]
