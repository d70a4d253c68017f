"""`zhtune rag qa / summarize --api-base` against a real `zhtune serve` (a subprocess on 127.0.0.1 serving
the tiny model, with an API key): model name and context come from /v1/models, token counts are
calibrated from the server's usage figures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from zhtune import tiny
from zhtune.cli import main as cli

KEY = "sk-rag-test"


@pytest.fixture(scope="module")
def serve_url(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("fastapi", reason="zhtune serve needs the serve extra")
    httpx = pytest.importorskip("httpx")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")  # noqa: SIM115 (closed in finally)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "zhtune", "serve", "--model", str(tiny_model_dir),
                             "--port", str(port), "--api-key", KEY, "--served-model-name", "tiny"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"zhtune serve did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


GEN = ["--max-new-tokens", "8", "--temperature", "0", "--seed", "0"]


def test_qa_through_serve(serve_url, asset_index, capsys):
    argv = ["rag", "qa", "--docs", str(tiny.asset("rag_docs")), "--index", str(asset_index[1]),
            "--chunk-size", "300", "--chunk-overlap", "30", "--question", "开茶节在什么时候举行？",
            "--api-base", serve_url, "--api-key", KEY, *GEN, "--json"]
    assert cli(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["sources"] and result["sources"][0]["n"] == 1 and isinstance(result["answer"], str)
    # the context came from the server's /v1/models, the rate from its usage figures
    assert "context 512 tokens" in captured.err and "tokens/char on your text" in captured.err


def test_summarize_through_serve(serve_url, tmp_path, capsys):
    manual = tmp_path / "manual.txt"  # part of a document: a few map calls, batched over HTTP
    manual.write_text(tiny.asset("rag_docs/xingfan_x3_manual.txt").read_text(encoding="utf-8")[:500], encoding="utf-8")
    argv = ["rag", "summarize", "--docs", str(manual), "--chain", "map_reduce", "--chunk-size", "100",
            "--api-base", serve_url, "--api-key", KEY, "--model-name", "tiny", *GEN, "--json"]
    assert cli(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["llm_calls"] >= 3 and result["sources"] == [str(manual)]


def test_wrong_key_and_model(serve_url, capsys):
    doc = tiny.asset("rag_docs/yunxi_town.md")
    assert cli(["rag", "summarize", "--docs", str(doc), "--api-base", serve_url, "--api-key", "wrong"]) == 2
    assert "refused the API key" in capsys.readouterr().err
