"""SentencePiece model -> a Hugging Face tokenizer folder that gives exactly sentencepiece's ids.

Writes tokenizer.model, tokenizer_config.json (LlamaTokenizer, add_bos_token), special_tokens_map.json
and a fast tokenizer.json. (transformers 5: a folder with only tokenizer.model loads as a generic
backend with other ids, and save_pretrained does not write tokenizer.model, so we write both.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from zhtune.io import atomic_write_json


def write_hf_tokenizer(sp_model: str | Path, out_dir: str | Path, extra_config: dict | None = None) -> Path:
    """Write an HF tokenizer folder for `sp_model` into `out_dir` (created)."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sp_model, out / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "legacy": False, "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000,
    }
    config.update(extra_config or {})
    atomic_write_json(out / "tokenizer_config.json", config)
    atomic_write_json(out / "special_tokens_map.json",
                      {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.save_pretrained(str(out))  # adds tokenizer.json (fast); keeps our tokenizer.model
    # save_pretrained rewrites tokenizer_config.json; keep the keys that make the folder load right
    saved = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    saved.update({k: v for k, v in config.items() if k in ("tokenizer_class", "add_bos_token", "add_eos_token", "legacy")})
    atomic_write_json(out / "tokenizer_config.json", saved)
    return out
