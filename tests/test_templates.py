"""One template registry: the exported chat_template renders exactly what training renders."""

from __future__ import annotations

import pytest

from zhtune.data.templates import TEMPLATES, get_template, install
from zhtune.errors import ZhtuneError

CONVERSATIONS = [
    [{"role": "user", "content": "中国的首都是哪里？"}, {"role": "assistant", "content": "北京。"}],
    [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "a {b} }}"},
     {"role": "assistant", "content": "c\n"}, {"role": "user", "content": "第二轮"},
     {"role": "assistant", "content": "好的"}],
    [{"role": "user", "content": "只有提问"}],
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_template_matches_training(name, base_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_tokenizer_dir)
    template = get_template(name)
    install(tok, template)
    for conv in CONVERSATIONS:
        want = "".join(p + r for p, r in template.encode_pairs(conv, tok.bos_token, tok.eos_token))
        got = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert got == want


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_pairs_split_prompt_from_answer(name):
    t = get_template(name)
    pairs = t.encode_pairs(CONVERSATIONS[1])
    assert len(pairs) == 2
    assert "好的" in pairs[1][1] and "好的" not in pairs[1][0]
    assert "第二轮" in pairs[1][0]
    answer = pairs[0][1].lstrip(" ")
    assert answer.startswith("c" if t.trim else "c\n")


def test_unknown_template_suggests():
    with pytest.raises(ZhtuneError) as exc:
        get_template("lama2")
    assert "llama2" in exc.value.hint


def test_bad_roles():
    with pytest.raises(ZhtuneError):
        get_template("default").render([{"role": "assistant", "content": "x"}])


def test_system_only_conversation_is_refused():
    with pytest.raises(ZhtuneError) as exc:
        get_template("qwen").render([{"role": "system", "content": "只有系统提示"}])
    assert "user" in exc.value.expected
