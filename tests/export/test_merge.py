"""zhtune merge: streaming merge of 1..n adapters equals base + adapters through peft; refusals."""

from __future__ import annotations

import json

import pytest
import torch

from zhtune.errors import ZhtuneError
from zhtune.export import merge as M
from zhtune.export.parity import verify_merge


def test_merge_two_adapters_matches_peft(tmp_path, tiny_model_dir, pt_adapter, sft_adapter, big_tokenizer_dir):
    out = M.merge(tiny_model_dir, [pt_adapter, sft_adapter], tmp_path / "m", log=lambda *_: None)
    result = verify_merge(tiny_model_dir, [pt_adapter, sft_adapter], out, log=print)
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 1040
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 1040 and (out / "tokenizer.model").read_bytes() == (big_tokenizer_dir / "tokenizer.model").read_bytes()
    # the chat template is the training template's (sft run.yaml says alpaca)
    from zhtune.data.templates import get_template

    msgs = [{"role": "user", "content": "你好"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == get_template("alpaca").render(msgs, "<s>", "</s>")
