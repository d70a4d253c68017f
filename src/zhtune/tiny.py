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


# Byte-level BPE stand-ins for LLaMA-3, Qwen2.5/3, GPT-2, SmolLM and Mistral-Nemo (tekken) tokenizers:
# (special tokens, BOS, EOS, tokenizer_class). tekken numbers its specials first (ids 0..), the others after
# the vocabulary, as the real ones do.
BYTELEVEL_FAMILIES = {
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|end_of_text|>", "PreTrainedTokenizerFast"),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>", "Qwen2Tokenizer"),
    "gpt2": (["<|endoftext|>"], None, "<|endoftext|>", "GPT2Tokenizer"),
    "smollm": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>", "GPT2Tokenizer"),
    "tekken": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "PreTrainedTokenizerFast"),
}
IGNORE_MERGES = ("llama3", "tekken")  # tiktoken-built vocabularies: a whole word in the vocabulary wins


def train_bytelevel_base(lines: Iterable[str], output: str | Path, family: str = "llama3", vocab_size: int = 1000,
                         chat_template: str | None = None) -> Path:
    """Train a byte-level BPE tokenizer the way `family` builds its own (pre-tokenizer, normaliser,
    ignore_merges, where the special tokens go, BOS or not) and write an HF tokenizer folder.

    llama3 / tekken: their regex split + ByteLevel without its regex, ignore_merges, every split of every
    token as a merge (tiktoken's rule, as their own tokenizer.json files); qwen2: Qwen2's regex, NFC;
    gpt2: GPT-2's ByteLevel regex; smollm: single digits, then GPT-2's ByteLevel.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from zhtune.io import atomic_write_json, atomic_write_text
    from zhtune.vocab.bytelevel import PRE_TOKENIZER_REGEX, all_split_merges

    specials, bos, eos, cls = BYTELEVEL_FAMILIES[family]
    tok = Tokenizer(models.BPE(ignore_merges=family in IGNORE_MERGES))
    if family in PRE_TOKENIZER_REGEX:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEX[family]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif family == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if family == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    first = specials if family == "tekken" else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=first)
    tok.train_from_iterator(list(lines), trainer=trainer)
    data = json.loads(tok.to_str())
    if family in IGNORE_MERGES:
        vocab = data["model"]["vocab"]
        data["model"]["merges"] = [list(p) for p in all_split_merges(vocab, [t for t in vocab if t not in first])]
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens(specials)  # tekken's are there already (same ids); the others go after the vocabulary
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos:
        steps.append(processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                   special_tokens=[(bos, tok.token_to_id(bos))]))
    tok.post_processor = processors.Sequence(steps)
    out = Path(output)
    atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=True) + "\n")
    config = {"tokenizer_class": cls, "bos_token": bos, "eos_token": eos, "pad_token": None,
              "add_bos_token": bos is not None, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 131072, "errors": "replace"}
    if family == "tekken":
        config["unk_token"] = "<unk>"
    if chat_template:
        config["chat_template"] = chat_template
    atomic_write_json(out / "tokenizer_config.json", config)
    return out


def tiny_llama_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                      num_kv_heads: int = 2, intermediate_size: int = 128, max_position: int = 512):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position, bos_token_id=1, eos_token_id=2, pad_token_id=None,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    )


# The architectures zhtune trains, merges and exports, as tiny random configs with each one's traits, and the
# byte-level tokenizer family each ships with: llama = LLaMA-3.1 (rope_type llama3, scaled within a short
# prompt: original context 64); llama-tied = LLaMA-3.2 / SmolLM (the same, tied head); mistral =
# Mistral-Nemo (tekken); qwen2 (q/k/v biases); qwen3 (q/k norms, a head_dim of its own, tied).
ARCHITECTURES = {"llama": "llama3", "llama-tied": "smollm", "mistral": "tekken", "qwen2": "qwen2", "qwen3": "qwen2"}
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def tiny_config(arch: str, vocab_size: int, bos: int | None = None, eos: int | None = None, hidden_size: int = 64,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                max_position: int = 512):
    """A tiny random config of `arch` (see ARCHITECTURES)."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}: {', '.join(ARCHITECTURES)}")
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=max_position, bos_token_id=bos, eos_token_id=eos, pad_token_id=None,
                  rms_norm_eps=1e-6)
    if arch in ("llama", "llama-tied"):
        return AutoConfig.for_model("llama", **common, rope_parameters=dict(_LLAMA3_ROPE),
                                    tie_word_embeddings=arch == "llama-tied")
    default_rope = {"rope_type": "default", "rope_theta": 1000000.0}
    if arch == "mistral":
        return AutoConfig.for_model("mistral", **common, sliding_window=None, tie_word_embeddings=False,
                                    rope_parameters=default_rope)
    if arch == "qwen2":
        return AutoConfig.for_model("qwen2", **common, tie_word_embeddings=False, use_sliding_window=False,
                                    rope_parameters=default_rope)
    return AutoConfig.for_model("qwen3", **common, head_dim=2 * hidden_size // num_heads, tie_word_embeddings=True,
                                use_sliding_window=False, rope_parameters=default_rope)


def build_tiny_model(output: str | Path, vocab_size: int, seed: int = 0, tokenizer_dir: str | Path | None = None,
                     arch: str | None = None, **config_kwargs) -> Path:
    """Save a randomly initialised causal LM (safetensors) to `output`, with the tokenizer.

    arch None: the LLaMA-2-like LlamaConfig of tiny_llama_config; else one of ARCHITECTURES."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    output = Path(output)
    torch.manual_seed(seed)
    if arch is None:
        model = LlamaForCausalLM(tiny_llama_config(vocab_size, **config_kwargs))
    else:
        if tokenizer_dir is not None:  # the config names the tokenizer's BOS / EOS ids, as real ones do
            config_kwargs = {**_special_ids(Path(tokenizer_dir)), **config_kwargs}
        model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, **config_kwargs))
        with torch.no_grad():  # an exporter that drops or misplaces something must change the logits:
            for name, p in model.named_parameters():
                if name.endswith(".bias") or "norm" in name:  # random biases and norm gains
                    p.add_(torch.randn_like(p) * 0.1)
                elif name.endswith(("q_proj.weight", "k_proj.weight")):  # sharp attention: positions matter
                    p.mul_(6.0)
                elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                    p.mul_(10.0)
    model.save_pretrained(output)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name not in ("run.yaml",):
                shutil.copy2(f, output / f.name)
    return output


def _special_ids(tokenizer_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return {"bos": tok.bos_token_id, "eos": tok.eos_token_id}


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return atomic_write_bytes(path, text.encode("utf-8"))


def build_tiny_base(output: str | Path, vocab_size: int = 1000, seed: int = 0, arch: str | None = None) -> Path:
    """A tiny English 'base model' folder for CPU experiments: a SentencePiece tokenizer + random LLaMA-2-like
    Llama (arch None), or one of ARCHITECTURES with its family's byte-level BPE tokenizer."""
    import tempfile

    from zhtune.vocab.hf import write_hf_tokenizer

    output = Path(output)
    with tempfile.TemporaryDirectory() as tmp:
        if arch is None:
            sp = train_base_sp(asset_lines("en_corpus.txt"), Path(tmp) / "tokenizer.model", vocab_size=vocab_size)
            tok = write_hf_tokenizer(sp, Path(tmp) / "tokenizer")
            return build_tiny_model(output, vocab_size=vocab_size, seed=seed, tokenizer_dir=tok)
        if arch not in ARCHITECTURES:
            from zhtune.errors import ZhtuneError

            raise ZhtuneError(f"unknown tiny architecture {arch!r}", where="--arch", expected=", ".join(ARCHITECTURES))
        tok = train_bytelevel_base(asset_lines("en_corpus.txt"), Path(tmp) / "tokenizer", ARCHITECTURES[arch],
                                   vocab_size=vocab_size)
        from transformers import AutoTokenizer

        rows = len(AutoTokenizer.from_pretrained(str(tok)))
        return build_tiny_model(output, vocab_size=rows, seed=seed, tokenizer_dir=tok, arch=arch)


def main(argv: list[str] | None = None) -> int:
    """`python -m zhtune.tiny [OUTPUT]`: write the tiny base model folder examples/tiny/*.yaml use."""
    import os
    import sys

    from zhtune.args import make_parser
    from zhtune.console import quiet_libraries
    from zhtune.io import check_output_dir

    quiet_libraries(debug=os.environ.get("ZHTUNE_DEBUG") == "1")   # as every `zhtune` command

    parser = make_parser("tiny", """
        写一个极小的随机基座模型 (英文分词器 + 随机 Llama)，供 examples/tiny/*.yaml 在 CPU 上试跑。
        Write a tiny base model folder (an English tokenizer trained in-process + a random Llama) for
        the CPU recipes in examples/tiny/.""",
        "python -m zhtune.tiny tiny/base\npython -m zhtune.tiny tiny/qwen2 --arch qwen2   # Qwen2 + its byte-level BPE")
    parser.prog = "python -m zhtune.tiny"
    parser.add_argument("output", nargs="?", default="tiny/base", help="new model folder")
    parser.add_argument("--arch", choices=list(ARCHITECTURES), default=None,
                        help="another architecture with its byte-level BPE tokenizer (default: LLaMA-2-like "
                             "Llama with a SentencePiece tokenizer)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    check_output_dir(args.output)
    what = f"{args.arch} + {ARCHITECTURES[args.arch]} byte-level BPE" if args.arch else "Llama + SentencePiece"
    print(f"tiny base model ({what}) -> {build_tiny_base(args.output, arch=args.arch)}")
    return 0


if __name__ == "__main__":  # python -m zhtune.tiny tiny/base
    import sys

    from zhtune.errors import ZhtuneError

    try:
        sys.exit(main())
    except ZhtuneError as exc:  # as the zhtune command does: the message, exit 2, no traceback
        print(exc.render(), file=sys.stderr)
        sys.exit(2)
