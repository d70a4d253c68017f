"""Fixtures for the API tests: the real hf engine on the tiny model, and real uvicorn servers on
127.0.0.1 (free ports) running zhtune.serve.api's app in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest

API_KEY = "sk-test-key"


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY


@pytest.fixture(scope="session")
def api_engine(tiny_model_dir):
    from zhtune.infer.resolve import load_engine

    engine = load_engine(str(tiny_model_dir))
    yield engine
    engine.close()


@contextmanager
def running_server(app):
    """Serve `app` with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def serve_app():
    """serve_app(app) -> a context manager running `app` on 127.0.0.1; yields its base URL."""
    return running_server


@pytest.fixture(scope="session")
def api_app(api_engine):
    """The app without an API key (served name 'tiny')."""
    from zhtune.serve.api import create_app

    return create_app(api_engine, served_model_name="tiny", max_concurrency=16, max_queue=256)


@pytest.fixture(scope="session")
def api_url(api_app):
    with running_server(api_app) as url:
        yield url


@pytest.fixture(scope="session")
def api_key_url(api_engine):
    """A second server over the same engine that requires API_KEY and caps bodies at 4 KiB."""
    from zhtune.serve.api import create_app

    app = create_app(api_engine, api_key=API_KEY, served_model_name="tiny", max_body_bytes=4096)
    with running_server(app) as url:
        yield url


@pytest.fixture()
def wait_idle():
    """wait_idle(client, url) -> /health once no generation runs or waits (or after 20 s)."""
    return _wait_idle


def _wait_idle(client, url: str, timeout: float = 20.0) -> dict:
    """Poll /health until no generation is running or queued; returns the last /health body."""
    deadline = time.monotonic() + timeout
    while True:
        health = client.get(f"{url}/health").json()
        if health["active_generations"] == 0 and health["pending_generations"] == 0:
            return health
        if time.monotonic() > deadline:
            return health
        time.sleep(0.05)
