"""One template registry: the exported chat_template renders exactly what training renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from zhtune.data.templates import TEMPLATES, get_template, install
from zhtune.errors import ZhtuneError

CONVERSATIONS = [
    [{"role": "user", "content": "中国的首都是哪里？"}, {"role": "assistant", "content": "北京。"}],
    [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "a {b} }}"},
     {"role": "assistant", "content": "c\n"}, {"role": "user", "content": "第二轮"},
     {"role": "assistant", "content": "好的"}],
    [{"role": "user", "content": "只有提问"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nA1"},
     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "<think>s</think>A2"}],
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


# --- the registry against the models' own (official) chat templates, token for token ------------------------
OFFICIAL = Path(__file__).parent / "fixtures" / "chat_templates"   # verbatim, see its README.md
FAMILY = {"llama3": "llama3", "llama3.1": "llama3", "qwen": "qwen2", "qwen2.5": "qwen2", "qwen3": "qwen2",
          "chatml": "qwen2", "smollm2": "smollm"}   # a tiny byte-level tokenizer with the template's special tokens
PROMPTS = [  # conversations that end with a user turn: what chat / serve send
    [{"role": "user", "content": "你好，请介绍一下北京。"}],
    [{"role": "system", "content": "  你是一个乐于助人的助手。\n"}, {"role": "user", "content": "1+1=?  "}],
    [{"role": "user", "content": "Q1 第一问"}, {"role": "assistant", "content": " A1 第一答\n"},
     {"role": "user", "content": "Q2: {braces} and 'quotes'"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}, {"role": "user", "content": "Q3"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\n想一想\n</think>\n\nA1"},
     {"role": "user", "content": "Q2"}],  # a reasoning model's earlier answer: Qwen3 drops its reasoning
]


def _official(name: str, bytelevel_base, tmp_path):
    import json
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / name
    shutil.copytree(bytelevel_base(FAMILY[name]), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = (OFFICIAL / f"{name}.jinja").read_text(encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder, AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_registry_template_renders_the_official_one_token_for_token(name, bytelevel_base, tmp_path):
    folder, tok = _official(name, bytelevel_base, tmp_path)
    template = get_template(name)
    bos, eos = tok.bos_token or "", tok.eos_token

    def ours(conv):
        return tok(template.render(conv, bos, eos), add_special_tokens=False).input_ids

    for conv in PROMPTS:
        want = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert ours(conv) == want, (tok.decode(ours(conv)), tok.decode(want))
        assert sum(i in tok.added_tokens_decoder for i in want) >= 2  # the markers are special tokens
    for conv in (p + [{"role": "assistant", "content": "答：好的。"}] for p in PROMPTS):  # training conversations
        want = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=False)["input_ids"]
        if name == "qwen3":  # Qwen3's own template writes an empty <think></think> before the last answer only;
            # zhtune's qwen3 trains the answer as written (the model writes <think> itself when it thinks)
            want = tok(tok.decode(want).replace("<|im_start|>assistant\n<think>\n\n</think>\n\n答",
                                                "<|im_start|>assistant\n答"), add_special_tokens=False).input_ids
        assert ours(conv) == want, (tok.decode(ours(conv)), tok.decode(want))
    # a base that carries the official template gets this registry template when none is named
    from zhtune.data.templates import match_chat_template, training_template

    assert match_chat_template(tok.chat_template, tok.bos_token or "<s>", eos) is template
    assert training_template(None, [folder]) == (template, f"the chat_template of {folder}")


def test_training_takes_the_base_chat_template_when_none_is_named(bytelevel_base, tmp_path, capsys):
    from zhtune.config import TRAIN_ALIASES, TrainConfig, load_config
    from zhtune.train.common import template_for

    folder, _ = _official("qwen2.5", bytelevel_base, tmp_path)
    cfg = load_config(TrainConfig, None, [f"model_name_or_path={tmp_path / 'no-model'}",
                                          f"tokenizer_name_or_path={folder}"], TRAIN_ALIASES)
    assert cfg.template is None
    assert template_for(cfg).name == "qwen2.5" and cfg.template == "qwen2.5"  # recorded in run.yaml
    assert "qwen2.5 (the chat_template of" in capsys.readouterr().out
    named = load_config(TrainConfig, None, [f"tokenizer_name_or_path={folder}", "template=alpaca"], TRAIN_ALIASES)
    assert template_for(named).name == "alpaca"  # a named template wins
    # a chat_template that is none of the registry's: default, and the user is told how to name one
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer_config.json").write_text('{"chat_template": "{{ messages[0][\'content\'] }}"}')
    cfg = load_config(TrainConfig, None, [f"tokenizer_name_or_path={other}"], TRAIN_ALIASES)
    assert template_for(cfg).name == "default"
    assert "none of zhtune's templates" in capsys.readouterr().out
