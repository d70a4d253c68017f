"""Real clients against `zhtune serve` on 127.0.0.1: the official openai package and LangChain's
ChatOpenAI, streaming and not, with and without an API key."""

from __future__ import annotations

import math

import pytest

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "你好，介绍一下北京"}]


@pytest.fixture(scope="module")
def oai(api_url):
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def test_openai_chat_stream_and_not(oai):
    whole = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens > 10
    stream = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_openai_completions_embeddings_models(oai):
    c = oai.completions.create(model="tiny", prompt="从前有座山", max_tokens=6, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens <= 6
    streamed = "".join(x.choices[0].text for x in oai.completions.create(
        model="tiny", prompt="从前有座山", max_tokens=6, temperature=0, stream=True))
    assert streamed == c.choices[0].text
    e = oai.embeddings.create(model="tiny", input=["你好", "世界"])   # the client asks for base64
    assert len(e.data) == 2 and math.isclose(sum(x * x for x in e.data[0].embedding), 1.0, rel_tol=1e-4)
    assert [m.id for m in oai.models.list()] == ["tiny"]


def test_openai_errors_are_typed(oai, api_key_url, api_key):
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=2)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="tiny", messages=MESSAGES, temperature=7)
    assert err.value.param == "temperature"
    with (openai.OpenAI(base_url=f"{api_key_url}/v1", api_key="wrong", max_retries=0) as bad,
          pytest.raises(openai.AuthenticationError)):
        bad.models.list()
    with openai.OpenAI(base_url=f"{api_key_url}/v1", api_key=api_key, max_retries=0) as good:
        assert good.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices


def test_langchain_chat_openai_invoke_and_stream(api_url):
    chat_openai = pytest.importorskip("langchain_openai").ChatOpenAI
    llm = chat_openai(model="tiny", base_url=f"{api_url}/v1", api_key="unused", temperature=0, max_tokens=8,
                      max_retries=0, timeout=60)
    from langchain_core.messages import HumanMessage, SystemMessage

    messages = [SystemMessage("你是一个助手"), HumanMessage("你好，介绍一下北京")]
    answer = llm.invoke(messages)
    assert isinstance(answer.content, str) and answer.response_metadata["finish_reason"] in ("stop", "length")
    assert answer.usage_metadata["output_tokens"] >= 1
    pieces = list(llm.stream(messages))
    assert "".join(p.content for p in pieces) == answer.content
