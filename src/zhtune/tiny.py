"""Tiny, deterministic stand-ins for a LLaMA base: an English SentencePiece tokenizer and a random Llama.

Used by the test fixtures and by `zhtune demo`; everything is built by code, never downloaded.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable

from zhtune.io import ASSETS, asset, asset_lines, atomic_write_bytes  # noqa: F401 (asset* re-exported for callers)


def train_base_sp(lines: Iterable[str], output: str | Path, vocab_size: int = 1000) -> Path:
    """Train a LLaMA-like SentencePiece model (BPE, byte_fallback, identity normalizer,
    add_dummy_prefix, <unk>/<s>/</s> = 0/1/2, the 256 byte pieces) and write it to `output`."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        character_coverage=0.99995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_surface=" \u2047 ", num_threads=1, minloglevel=2, max_sentence_length=16384,
        split_by_unicode_script=True, split_by_number=True, split_by_whitespace=True,
    )
    return atomic_write_bytes(output, buf.getvalue())


def tiny_llama_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                      num_kv_heads: int = 2, intermediate_size: int = 128, max_position: int = 512):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position, bos_token_id=1, eos_token_id=2, pad_token_id=None,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    )


def build_tiny_model(output: str | Path, vocab_size: int, seed: int = 0, tokenizer_dir: str | Path | None = None,
                     **config_kwargs) -> Path:
    """Save a randomly initialised LlamaForCausalLM (safetensors) to `output`, with the tokenizer."""
    import shutil

    import torch
    from transformers import LlamaForCausalLM

    output = Path(output)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size, **config_kwargs))
    model.save_pretrained(output)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name not in ("run.yaml",):
                shutil.copy2(f, output / f.name)
    return output


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return atomic_write_bytes(path, text.encode("utf-8"))


def build_tiny_base(output: str | Path, vocab_size: int = 1000, seed: int = 0) -> Path:
    """A tiny English 'base model' folder (SentencePiece tokenizer + random Llama) for CPU experiments."""
    import tempfile

    from zhtune.vocab.hf import write_hf_tokenizer

    output = Path(output)
    with tempfile.TemporaryDirectory() as tmp:
        sp = train_base_sp(asset_lines("en_corpus.txt"), Path(tmp) / "tokenizer.model", vocab_size=vocab_size)
        tok = write_hf_tokenizer(sp, Path(tmp) / "tokenizer")
        return build_tiny_model(output, vocab_size=vocab_size, seed=seed, tokenizer_dir=tok)


def main(argv: list[str] | None = None) -> int:
    """`python -m zhtune.tiny [OUTPUT]`: write the tiny base model folder examples/tiny/*.yaml use."""
    import sys

    from zhtune.args import make_parser
    from zhtune.io import check_output_dir

    parser = make_parser("tiny", """
        写一个极小的随机基座模型 (英文分词器 + 随机 Llama)，供 examples/tiny/*.yaml 在 CPU 上试跑。
        Write a tiny base model folder (an English tokenizer trained in-process + a random Llama) for
        the CPU recipes in examples/tiny/.""", "python -m zhtune.tiny tiny/base")
    parser.prog = "python -m zhtune.tiny"
    parser.add_argument("output", nargs="?", default="tiny/base", help="new model folder")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    check_output_dir(args.output)
    print(f"tiny base model (tokenizer + random Llama) -> {build_tiny_base(args.output)}")
    return 0


if __name__ == "__main__":  # python -m zhtune.tiny tiny/base
    import sys

    from zhtune.errors import ZhtuneError

    try:
        sys.exit(main())
    except ZhtuneError as exc:  # as the zhtune command does: the message, exit 2, no traceback
        print(exc.render(), file=sys.stderr)
        sys.exit(2)
