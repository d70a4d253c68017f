"""`zhtune serve` under load on loopback: concurrent requests give the same outputs as sequential
ones, 64 concurrent streams all complete whole, the queue bound answers 503, a client that
disconnects cancels its generation, and the event loop stays responsive while the model works."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx

from zhtune.serve.api import create_app


def _chat_body(prompt: str, max_tokens: int, stream: bool = False, temperature: float = 0.0) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": temperature, "stream": stream}


def _stream_text(client: httpx.Client, url: str, body: dict) -> tuple[str, list]:
    text, events = "", []
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(line[5:].strip())
    for e in events[:-1]:
        for c in json.loads(e)["choices"]:
            text += c["delta"].get("content", "")
    return text, events


def test_concurrent_outputs_equal_sequential(api_url, wait_idle):
    prompts = [f"question {i}: tell me about topic {i * 7}" for i in range(8)]
    with httpx.Client(timeout=120) as client:
        sequential = [client.post(f"{api_url}/v1/chat/completions", json=_chat_body(p, 8)).json()
                      ["choices"][0]["message"]["content"] for p in prompts]
        assert len(set(sequential)) > 1   # distinct prompts, distinct answers: a crossed output would show

        def one(i: int) -> str:
            if i % 2:   # half streamed, half not
                return _stream_text(client, api_url, _chat_body(prompts[i], 8, stream=True))[0]
            return client.post(f"{api_url}/v1/chat/completions", json=_chat_body(prompts[i], 8)).json()[
                "choices"][0]["message"]["content"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            concurrent = list(pool.map(one, range(len(prompts))))
        assert concurrent == sequential
        assert wait_idle(client, api_url)["active_generations"] == 0


async def _many_streams(url: str, count: int, max_tokens: int) -> list[list[str]]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def one(i: int) -> list[str]:
            events = []
            async with client.stream("POST", f"{url}/v1/chat/completions",
                                     json=_chat_body(f"load test prompt number {i}", max_tokens, stream=True,
                                                     temperature=0.8)) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:].strip())
            return events

        return await asyncio.gather(*(one(i) for i in range(count)))


def test_64_concurrent_streams_complete_whole(api_url, wait_idle):
    before = threading.active_count()
    for burst in range(2):
        results = asyncio.run(_many_streams(api_url, 64, 4))
        for events in results:
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert all("error" not in c for c in chunks)
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert len({c["id"] for c in chunks}) == 1
            assert [c["choices"][0]["finish_reason"] for c in chunks][-1] in ("stop", "length")
        with httpx.Client(timeout=30) as client:
            health = wait_idle(client, api_url)
        assert health["pending_generations"] == 0 and health["active_generations"] == 0
        # worker threads are a bounded pool (max_concurrency=16 in the fixture), not one per request:
        # a second burst adds none
        if burst == 0:
            after_first = threading.active_count()
            assert after_first <= before + 16
        else:
            assert threading.active_count() <= after_first


def _slow_body(stream: bool) -> dict:
    # long enough that finishing instead of cancelling would take many seconds
    return _chat_body("tell me a very long story", 480, stream=stream, temperature=0.0)


def test_stream_disconnect_cancels_generation(api_url, api_engine, wait_idle):
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{api_url}/v1/chat/completions", json=_slow_body(True)) as r:
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
            assert got and client.get(f"{api_url}/health").json()["active_generations"] == 1
        left = time.monotonic()   # leaving the block closes the connection mid-stream
        health = wait_idle(client, api_url, timeout=10)
        assert health["active_generations"] == 0 and health["pending_generations"] == 0
        assert time.monotonic() - left < 5
        assert api_engine.active == 0   # the engine dropped the row from its batch


def test_non_stream_disconnect_cancels_generation(api_url, api_engine, wait_idle):
    host = urlparse(api_url)
    body = json.dumps(_slow_body(False)).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host.hostname}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with httpx.Client(timeout=60) as client:
        with socket.create_connection((host.hostname, host.port)) as sock:
            sock.sendall(request)
            deadline = time.monotonic() + 10
            while client.get(f"{api_url}/health").json()["active_generations"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        left = time.monotonic()
        health = wait_idle(client, api_url, timeout=10)
        assert health["active_generations"] == 0 and time.monotonic() - left < 5
        assert api_engine.active == 0


def test_queue_bound_answers_503(api_engine, serve_app, wait_idle):
    app = create_app(api_engine, served_model_name="tiny", max_concurrency=1, max_queue=1)
    with serve_app(app) as url, httpx.Client(timeout=60) as client:
        finished = threading.Event()

        def hold() -> None:
            with client.stream("POST", f"{url}/v1/chat/completions", json=_slow_body(True)) as r:
                assert r.status_code == 200
                for _ in r.iter_lines():
                    if finished.is_set():   # the test is done: leave (which cancels)
                        break

        threads = [threading.Thread(target=hold) for _ in range(2)]
        threads[0].start()
        deadline = time.monotonic() + 20
        while client.get(f"{url}/health").json()["active_generations"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        threads[1].start()   # waits in the queue (the one running slot is taken)
        while client.get(f"{url}/health").json()["pending_generations"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = client.post(f"{url}/v1/chat/completions", json=_chat_body("one more", 4))
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_busy" and "limit" in r.json()["error"]["message"]
        finished.set()
        for t in threads:
            t.join(timeout=60)
        assert wait_idle(client, url)["pending_generations"] == 0


def test_client_leaving_while_queued_frees_its_place(api_engine, serve_app):
    app = create_app(api_engine, served_model_name="tiny", max_concurrency=1, max_queue=2)
    with serve_app(app) as url, httpx.Client(timeout=60) as client:
        def pending() -> int:
            return client.get(f"{url}/health").json()["pending_generations"]

        def wait_for(count: int, seconds: float = 20) -> None:
            deadline = time.monotonic() + seconds
            while pending() != count:
                assert time.monotonic() < deadline, f"pending stayed at {pending()}, expected {count}"
                time.sleep(0.02)

        with client.stream("POST", f"{url}/v1/chat/completions", json=_slow_body(True)) as running:
            lines = running.iter_lines()
            next(lines)
            host = urlparse(url)
            body = json.dumps(_slow_body(True)).encode()
            with socket.create_connection((host.hostname, host.port)) as sock:   # queued behind `running`
                sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host.hostname}\r\n"
                              f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                             + body)
                wait_for(2)
            # it left while queued: its place is freed at once, long before `running` (480 tokens) ends
            wait_for(1, seconds=3)
            assert client.get(f"{url}/health").json()["active_generations"] == 1
            assert "[DONE]" not in next(lines)
        wait_for(0)


def test_event_loop_stays_responsive_during_generation(api_url):
    with httpx.Client(timeout=60) as client:
        worker = threading.Thread(target=client.post, args=(f"{api_url}/v1/chat/completions",),
                                  kwargs={"json": _chat_body("a long answer please", 100)})
        worker.start()
        time.sleep(0.3)
        latencies = []
        for _ in range(5):
            t0 = time.monotonic()
            assert client.get(f"{api_url}/health").status_code == 200
            latencies.append(time.monotonic() - t0)
        worker.join()
    assert sorted(latencies)[2] < 0.5
