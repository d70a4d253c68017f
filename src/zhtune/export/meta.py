"""Meta's LLaMA checkpoint layout <-> Hugging Face, both ways: `zhtune convert meta` and `merge --format pth`.

    zhtune convert meta --input llama-2-13b/ --output llama-2-13b-hf/

Meta ships `consolidated.NN.pth` (one per model-parallel rank), `params.json` and `tokenizer.model`.
Three things differ from the HF layout, and all of them live here, once:
- names: `layers.0.attention.wq.weight` <-> `model.layers.0.self_attn.q_proj.weight`;
- rotary layout: Meta rotates interleaved pairs (x0,x1),(x2,x3)...; HF rotates halves. HF's q/k rows
  are Meta's rows permuted per head (`to_hf_qk` / `to_meta_qk`); GGUF uses Meta's layout too;
- model parallelism: each rank holds a slice of every column/row-parallel weight (`SPLIT_DIM`).
LLaMA-3.x downloads differ once more: tokenizer.model is a tiktoken file (base64 token, rank) whose 256
special tokens live in Meta's code, params.json's use_scaled_rope means rope_type llama3, and LLaMA-3.2's
1B/3B tie their output to the embeddings. `convert meta` writes them as transformers' own conversion
script does (a byte-level tokenizer.json with ignore_merges, rope_parameters llama3, a tied head), and
`merge --format pth` writes them back.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from zhtune.errors import ZhtuneError
from zhtune.io import read_json

# HF name pattern -> Meta name pattern ({i} = layer index)
HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
}
META_TO_HF = {v: k for k, v in HF_TO_META.items()}

# Meta's fairscale layers: ColumnParallelLinear splits the output dim (0), RowParallelLinear and
# ParallelEmbedding (LLaMA 1/2) split dim 1; norms are replicated on every rank (None).
SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
             "wo": 1, "w2": 1, "tok_embeddings": 1}

# model-parallel ranks Meta ships per size, and how to recognise the size: (hidden, layers) -> size
MP_SHARDS = {"7B": 1, "8B": 1, "13B": 2, "30B": 4, "33B": 4, "34B": 4, "65B": 8, "70B": 8}
SIZE_BY_SHAPE = {(4096, 32): "7B", (5120, 40): "13B", (6656, 60): "30B", (8192, 48): "34B",
                 (8192, 80): "70B"}
_IGNORED_META = ("rope.freqs",)  # LLaMA-1 stored its (recomputable) rotary frequencies


def _pattern(name: str) -> tuple[str, str | None]:
    m = re.match(r"^(model\.layers|layers)\.(\d+)\.", name)
    if not m:
        return name, None
    return name.replace(f"{m.group(1)}.{m.group(2)}.", f"{m.group(1)}.{{i}}.", 1), m.group(2)


def _kind(meta_name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'wq'; 'tok_embeddings.weight' -> 'tok_embeddings'."""
    parts = meta_name.split(".")
    return parts[-2] if meta_name.startswith("layers.") else parts[0]


def hf_to_meta_name(name: str) -> str:
    pat, layer = _pattern(name)
    if pat not in HF_TO_META:
        raise ZhtuneError(f"tensor {name!r} has no Meta equivalent", where=name,
                          expected="a LLaMA tensor (embed, norms, attention q/k/v/o, mlp gate/up/down, lm_head)")
    return HF_TO_META[pat].replace("{i}", layer or "")


def meta_to_hf_name(name: str) -> str:
    pat, layer = _pattern(name)
    if pat not in META_TO_HF:
        raise ZhtuneError(f"tensor {name!r} is not a LLaMA tensor Meta ships", where=name,
                          expected="tok_embeddings, norm, output, layers.N.attention.*, layers.N.feed_forward.*")
    return META_TO_HF[pat].replace("{i}", layer or "")


def to_hf_qk(w, n_heads: int):
    """Meta q/k rows [n_heads * head_dim, (in)] (interleaved rotary pairs) -> HF rows (rotated halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_meta_qk(w, n_heads: int):
    """Inverse of `to_hf_qk`: HF q/k rows (a weight, or a bias) -> Meta's interleaved layout (also GGUF's)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- params.json <-> config.json --------------------------------------------------------------
def meta_ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The MLP width Meta's model.py derives from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def params_from_config(config: dict) -> dict:
    """config.json (dict) -> params.json whose derived MLP width equals intermediate_size."""
    dim, inter = config["hidden_size"], config["intermediate_size"]
    params = {"dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": config["num_attention_heads"],
              "norm_eps": config.get("rms_norm_eps", 1e-5), "vocab_size": config["vocab_size"]}
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    if kv != params["n_heads"]:
        params["n_kv_heads"] = kv
    for multiple_of, mult in [(256, None), (4096, 1.3), (1024, 1.3), (256, 1.3), (256, 1.5), (1024, None),
                              (4096, None)]:
        if meta_ffn_size(dim, multiple_of, mult) == inter:
            break
    else:  # any width: round up to a multiple of itself, from a multiplier that lands just below it
        multiple_of, base = inter, int(2 * (4 * dim) / 3)
        mult = inter / base if base > inter else None
    params["multiple_of"] = multiple_of
    if mult is not None:
        params["ffn_dim_multiplier"] = mult
    if meta_ffn_size(dim, multiple_of, mult) != inter:
        raise ZhtuneError(f"cannot express intermediate_size={inter} in params.json", where="config.json")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if theta != 10000.0:
        params["rope_theta"] = theta
    if rope.get("rope_type", rope.get("type")) == "llama3":  # LLaMA-3.1+: Meta's apply_scaling
        params["use_scaled_rope"] = True
        if float(rope.get("factor", 8.0)) != 8.0:  # 3.2's 32; Meta's code defaults to 8
            params["rope_scaling_factor"] = float(rope["factor"])
    return params


def config_from_params(params: dict, vocab_size: int, context_length: int | None = None,
                       llama3: Llama3 | None = None) -> dict:
    """params.json -> config.json (dict) for LlamaForCausalLM (transformers 5: rope_parameters). llama3:
    a LLaMA-3.x download (tiktoken tokenizer): its rope scaling, context, special token ids, tied head."""
    from transformers import LlamaConfig

    try:
        dim, n_heads = int(params["dim"]), int(params["n_heads"])
        inter = meta_ffn_size(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier"))
        # params.json rarely says; LLaMA-1 (norm_eps 1e-6) was trained on 2048, LLaMA-2 on 4096, 3 on 8192,
        # 3.1+ on 131072 (transformers' CONTEXT_LENGTH_FOR_VERSION)
        default_context = (2048 if float(params.get("norm_eps", 1e-5)) <= 1e-6 else 4096) if llama3 is None \
            else (8192 if llama3.version == "3" else 131072)
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=dim, intermediate_size=inter,
            num_hidden_layers=int(params["n_layers"]), num_attention_heads=n_heads,
            num_key_value_heads=int(params.get("n_kv_heads") or n_heads),
            rms_norm_eps=float(params.get("norm_eps", 1e-5)),
            max_position_embeddings=int(context_length or params.get("max_seq_len") or default_context),
            rope_parameters=llama3_rope(params, llama3.version if llama3 else None),
            bos_token_id=llama3.bos if llama3 else 1, eos_token_id=llama3.eos if llama3 else 2,
            tie_word_embeddings=bool(llama3 and llama3.tied),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ZhtuneError(f"params.json is missing or has a bad value: {exc}", where="params.json",
                          expected="dim, n_layers, n_heads, norm_eps, multiple_of (Meta's format)") from None
    config.architectures = ["LlamaForCausalLM"]
    return config.to_dict()


# ---- LLaMA-3.x: tiktoken tokenizer.model, Meta's 256 special tokens, rope scaling -----------------------------
LLAMA3_VERSIONS = ("3", "3.1", "3.2", "3.3")
LLAMA3_SPECIALS = 256


def llama3_special_tokens(version: str) -> list[str]:
    """The special tokens Meta's tokenizer.py numbers after the tiktoken ranks (as transformers' conversion
    script lists them): LLaMA-3, and 3.1 onwards (eom, python_tag, finetune_right_pad)."""
    if version == "3":
        named = ["<|begin_of_text|>", "<|end_of_text|>", *[f"<|reserved_special_token_{i}|>" for i in range(4)],
                 "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
        return named + [f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_SPECIALS - 5)]
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(3, LLAMA3_SPECIALS - 8)]


@dataclass
class Llama3:
    """What a LLaMA-3.x download needs beyond params.json: its version and the tokenizer's ids."""
    version: str
    specials: dict[str, int]   # special token -> id (the first ids no tiktoken rank uses)
    tied: bool = False

    @property
    def bos(self) -> int:
        return self.specials["<|begin_of_text|>"]

    @property
    def eos(self) -> int:
        return self.specials["<|end_of_text|>"]

    @property
    def stops(self) -> list[int]:  # generation stops at the end of text, of a message (3.1+), of a turn
        return [self.specials[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>") if t in self.specials]


def llama3_version(params: dict, version: str | None = None) -> str:
    """The version named, else: no scaled rope -> 3; scaled rope and at most 3072 wide (3.2's 1B/3B) -> 3.2;
    else 3.1 (3.3 converts as 3.1)."""
    if version:
        return version
    if not params.get("use_scaled_rope"):
        return "3"
    return "3.2" if int(params.get("dim", 0)) <= 3072 else "3.1"


def llama3_specials(ranks: dict[bytes, int], version: str) -> dict[str, int]:
    """Meta's special tokens at the first ids after the ranks 0..n-1 (tokens added after them keep theirs)."""
    first = next(i for i in range(len(ranks) + 1) if i not in set(ranks.values()))
    return {t: first + k for k, t in enumerate(llama3_special_tokens(version))}


def llama3_rope(params: dict, version: str | None) -> dict:
    """rope_parameters: LLaMA-3.1+'s use_scaled_rope is rope_type llama3 with Meta's constants (factor 8,
    32 for 3.2, or params' rope_scaling_factor; low/high frequency factors 1 and 4; original context 8192)."""
    theta = float(params.get("rope_theta", 500000.0 if version else 10000.0))
    if not params.get("use_scaled_rope"):
        return {"rope_type": "default", "rope_theta": theta}
    factor = float(params.get("rope_scaling_factor") or (32.0 if version == "3.2" else 8.0))
    return {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": float(params.get("rope_high_freq_factor", 4.0)),
            "original_max_position_embeddings": 8192}


def write_llama3_tokenizer(llama3: Llama3, ranks: dict[bytes, int], out: Path, context: int) -> None:
    """tokenizer.json (+ tokenizer_config.json) of a tiktoken tokenizer.model with Meta's special tokens."""
    from zhtune.io import atomic_write_json, atomic_write_text
    from zhtune.vocab.bytelevel import PRE_TOKENIZER_REGEX, tiktoken_tokenizer

    tok = tiktoken_tokenizer(ranks, llama3.specials, "<|begin_of_text|>", PRE_TOKENIZER_REGEX["llama3"])
    atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=True) + "\n")
    atomic_write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "add_bos_token": True, "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": context})


def tiktoken_of_hf(hf_dir: Path) -> str | None:
    """tokenizer.model (tiktoken text) for an HF LLaMA-3 folder, None for a SentencePiece one; a byte-level
    tokenizer without Meta's special tokens after its ranks is refused (Meta's code could not number them)."""
    from zhtune.vocab.bytelevel import is_bytelevel, read_bytelevel, tiktoken_text, token_bytes

    if not (hf_dir / "tokenizer.json").is_file() or not is_bytelevel(read_json(hf_dir / "tokenizer.json")):
        return None
    bpe = read_bytelevel(hf_dir / "tokenizer.json")
    specials = {t["content"]: t["id"] for t in bpe.added}
    ranks = {token_bytes(t): i for t, i in bpe.vocab.items() if t not in specials and token_bytes(t) is not None}
    if not any(specials == llama3_specials(ranks, v) for v in LLAMA3_VERSIONS):
        raise ZhtuneError(f"{hf_dir / 'tokenizer.json'} is a byte-level tokenizer without LLaMA-3's 256 special "
                          "tokens after its ranks", where=str(hf_dir),
                          expected="a LLaMA-3.x tokenizer (Meta's layout numbers its special tokens itself)",
                          hint="keep this model in the HF layout: zhtune merge --format hf")
    return tiktoken_text({t: i for t, i in bpe.vocab.items() if t not in specials})


def num_shards_for(config: dict, model_size: str | None = None) -> int:
    """How many consolidated.NN.pth Meta ships for this model (1 for anything it doesn't ship)."""
    size = model_size or SIZE_BY_SHAPE.get((config["hidden_size"], config["num_hidden_layers"]))
    if size and size.upper() not in MP_SHARDS:
        raise ZhtuneError(f"unknown model size {size!r}", where="--model-size", expected=", ".join(MP_SHARDS))
    return MP_SHARDS[size.upper()] if size else 1


# ---- HF -> Meta (merge --format pth) ----------------------------------------------------------
def hf_to_meta(hf_dir: str | Path, out_dir: str | Path, num_shards: int | None = None,
               model_size: str | None = None, dtype=None) -> Path:
    """Write an HF LLaMA folder (safetensors) as consolidated.NN.pth + params.json + tokenizer.model.

    Builds one rank at a time, so peak memory is one consolidated file (1/num_shards of the model).
    """
    import torch

    from zhtune.export.weights import WeightReader

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config = read_json(hf_dir / "config.json", "config.json")
    if config.get("model_type") not in ("llama", None):
        raise ZhtuneError(f"Meta's layout is for LLaMA models, not {config.get('model_type')!r}",
                          where=str(hf_dir / "config.json"), expected="model_type llama")
    n = num_shards or num_shards_for(config, model_size)
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if kv % n or config["hidden_size"] % n or config["intermediate_size"] % n:
        raise ZhtuneError(f"cannot split into {n} model-parallel shards", where="--num-shards",
                          expected=f"a divisor of num_key_value_heads ({kv}) and hidden_size")
    tiktoken = tiktoken_of_hf(hf_dir)  # checked before any tensor is written
    reader = WeightReader(hf_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(n):
        shard = {}
        names = reader.names()
        if "lm_head.weight" not in names:  # tied embeddings: Meta's layout always has its own output
            names = names + ["lm_head.weight"]
        for name in names:
            meta = hf_to_meta_name(name)
            w = reader.get(name if name in reader.names() else "model.embed_tokens.weight")
            if dtype is not None:
                w = w.to(dtype)
            if meta.endswith("attention.wq.weight"):
                w = to_meta_qk(w, heads)
            elif meta.endswith("attention.wk.weight"):
                w = to_meta_qk(w, kv)
            dim = SPLIT_DIM.get(_kind(meta))
            if meta == "tok_embeddings.weight" and tiktoken is not None:
                dim = 0  # LLaMA-3's VocabParallelEmbedding splits the vocabulary, not the width
            if dim is not None and n > 1:
                w = torch.chunk(w, n, dim=dim)[rank]
            shard[meta] = w.clone().contiguous()  # clone: save only the slice, not the whole storage
        torch.save(shard, out_dir / f"consolidated.{rank:02d}.pth")
        del shard
    (out_dir / "params.json").write_text(json.dumps(params_from_config(config), indent=2) + "\n", encoding="utf-8")
    if tiktoken is not None:  # LLaMA-3.x: Meta's tiktoken file, ranks = the HF ids
        (out_dir / "tokenizer.model").write_text(tiktoken, encoding="utf-8")
    elif (hf_dir / "tokenizer.model").is_file():
        shutil.copyfile(hf_dir / "tokenizer.model", out_dir / "tokenizer.model")
    return out_dir


# ---- Meta -> HF (convert meta) -----------------------------------------------------------------
def _meta_files(input_dir: Path, model_size: str | None) -> tuple[Path, list[Path], Path]:
    """(weights folder, consolidated files in rank order, tokenizer.model) of a Meta download."""
    folder = input_dir / model_size if model_size and (input_dir / model_size).is_dir() else input_dir
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise ZhtuneError(f"no consolidated.*.pth in {folder}", where=str(folder),
                          expected="Meta's checkpoint folder: consolidated.00.pth ... + params.json",
                          hint="pass the folder that holds them (or its parent with --model-size 7B)")
    if not (folder / "params.json").is_file():
        raise ZhtuneError(f"params.json missing in {folder}", where=str(folder / "params.json"),
                          expected="Meta's params.json beside consolidated.*.pth")
    tok = next((p for p in (folder / "tokenizer.model", folder.parent / "tokenizer.model") if p.is_file()), None)
    if tok is None:
        raise ZhtuneError(f"tokenizer.model missing in {folder} and its parent", where=str(folder),
                          expected="Meta's tokenizer.model")
    return folder, files, tok


def meta_to_hf(input_dir: str | Path, output_dir: str | Path, model_size: str | None = None,
               max_shard_size: int = 2 * 1000**3, dtype=None, overwrite: bool = False,
               context_length: int | None = None, llama_version: str | None = None) -> Path:
    """Convert Meta's layout to an HF folder (safetensors shards + index, config, tokenizer).

    The output is locked for the whole run and checked before any work."""
    from zhtune.io import check_output_dir, output_lock

    with output_lock(output_dir):
        check_output_dir(output_dir, overwrite)
        return _meta_to_hf(input_dir, output_dir, model_size, max_shard_size, dtype, overwrite, context_length,
                           llama_version)


def _llama3_of(tok_model: Path, params: dict, version: str | None, state: dict, shards: int, rows: int):
    """(Llama3, tiktoken ranks) of a LLaMA-3.x download, (None, None) for a SentencePiece one. Tied: no
    output.weight, or one equal to the embeddings (LLaMA-3.2 1B/3B ship a copy)."""
    import torch

    from zhtune.vocab.bytelevel import is_tiktoken_file, read_tiktoken

    if not is_tiktoken_file(tok_model):
        return None, None
    token_ranks = read_tiktoken(tok_model)
    version = llama3_version(params, version)
    llama3 = Llama3(version, llama3_specials(token_ranks, version))
    if max(llama3.specials.values()) >= rows or max(token_ranks.values()) >= rows:
        raise ZhtuneError(f"{tok_model} has ids up to {max(max(llama3.specials.values()), max(token_ranks.values()))} "
                          f"(its ranks and LLaMA-3's {LLAMA3_SPECIALS} special tokens) but tok_embeddings only "
                          f"{rows} rows", where=str(tok_model), expected="the tokenizer.model of this checkpoint")
    out = state.get("output.weight")
    llama3.tied = out is None or (shards == 1 and torch.equal(out, state["tok_embeddings.weight"]))
    return llama3, token_ranks


def _meta_to_hf(input_dir, output_dir, model_size, max_shard_size, dtype, overwrite, context_length,
                llama_version=None) -> Path:
    import torch

    from zhtune.export.weights import TensorSpec, write_sharded_safetensors
    from zhtune.io import atomic_output_dir, atomic_write_json, load_state_dict
    from zhtune.vocab.hf import write_hf_tokenizer

    folder, files, tok_model = _meta_files(Path(input_dir), model_size)
    params = read_json(folder / "params.json", "params.json")
    ranks = [load_state_dict(f) for f in files]  # mmapped: pages are read as tensors are converted
    names = [k for k in ranks[0] if k not in _IGNORED_META]
    vocab = _meta_vocab(ranks, params, folder, files[0])
    llama3, token_ranks = _llama3_of(tok_model, params, llama_version, ranks[0], len(ranks), vocab)
    if llama3 is not None and llama3.tied:
        names = [k for k in names if k != "output.weight"]  # transformers ties lm_head to the embeddings
    config = config_from_params(params, vocab, context_length, llama3)
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]

    def split_dim(meta_name: str) -> int | None:
        key = _kind(meta_name)
        dim = SPLIT_DIM.get(key) if len(ranks) > 1 else None
        if key == "tok_embeddings" and dim is not None and ranks[0][meta_name].shape[1] == config["hidden_size"]:
            dim = 0  # LLaMA-3 shards the vocabulary (VocabParallelEmbedding) instead of the width
        return dim

    def tensor(spec):
        parts = [r[spec.source] for r in ranks]
        dim = split_dim(spec.source)
        w = torch.cat(parts, dim=dim) if dim is not None else parts[0]
        if _kind(spec.source) == "wq":
            w = to_hf_qk(w, heads)
        elif _kind(spec.source) == "wk":
            w = to_hf_qk(w, kv)
        return w.to(spec.dtype)

    specs = []
    for meta_name in names:
        shape = list(ranks[0][meta_name].shape)
        dim = split_dim(meta_name)
        if dim is not None:
            shape[dim] = sum(r[meta_name].shape[dim] for r in ranks)
        specs.append(TensorSpec(meta_to_hf_name(meta_name), tuple(shape),
                                dtype or ranks[0][meta_name].dtype, meta_name))
    with atomic_output_dir(output_dir, overwrite) as tmp:
        write_sharded_safetensors(tmp, specs, tensor, max_shard_size)
        config["dtype"] = str(specs[0].dtype).replace("torch.", "")
        atomic_write_json(tmp / "config.json", config)
        if llama3 is None:
            atomic_write_json(tmp / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
            write_hf_tokenizer(tok_model, tmp)
        else:
            atomic_write_json(tmp / "generation_config.json", {"bos_token_id": llama3.bos,
                                                               "eos_token_id": llama3.stops})
            write_llama3_tokenizer(llama3, token_ranks, tmp, config["max_position_embeddings"])
    return Path(output_dir)


def _meta_vocab(ranks: list[dict], params: dict, folder: Path, first_file: Path) -> int:
    """Rows of the vocabulary of a Meta checkpoint (all ranks), checked against params.json's vocab_size."""
    if "tok_embeddings.weight" not in ranks[0]:
        raise ZhtuneError("consolidated.00.pth has no tok_embeddings.weight", where=str(first_file),
                          expected="a LLaMA checkpoint")
    vocab = ranks[0]["tok_embeddings.weight"].shape[0]
    if len(ranks) > 1 and ranks[0]["tok_embeddings.weight"].shape[1] == int(params.get("dim", -1)):
        vocab *= len(ranks)  # LLaMA-3 shards the vocabulary (VocabParallelEmbedding)
    if isinstance(params.get("vocab_size"), int) and params["vocab_size"] > 0 and params["vocab_size"] != vocab:
        raise ZhtuneError(f"params.json vocab_size={params['vocab_size']} but tok_embeddings has {vocab} rows",
                          where=str(folder / "params.json"), expected="matching vocab sizes")
    return vocab


def main(argv: list[str]) -> int:
    from zhtune.args import bounded_int, existing_path, make_parser, parse_size

    parser = make_parser(
        "convert meta",
        """
        把 Meta 官方权重 (consolidated.*.pth + params.json + tokenizer.model) 转成 HF 格式 (safetensors)。
        Convert Meta's LLaMA checkpoint to a Hugging Face folder: merges model-parallel shards (13B has 2,
        70B has 8), handles grouped-query attention and the rotary q/k permutation; LLaMA-3.x: the tiktoken
        tokenizer.model becomes a byte-level tokenizer.json, use_scaled_rope rope_type llama3, 3.2's head tied.
        """,
        """
        zhtune convert meta --input llama-2-7b/ --output llama-2-7b-hf/
        zhtune convert meta --input LLaMA/ --model-size 13B --output llama-13b-hf/ --dtype float16
        zhtune convert meta --input Llama3.1-8B/ --output llama-3.1-8b-hf/   # tiktoken tokenizer, rope llama3
        """,
    )
    parser.add_argument("--input", required=True, type=existing_path,
                        help="folder with consolidated.*.pth and params.json")
    parser.add_argument("--output", required=True, help="new HF model folder")
    parser.add_argument("--model-size", default=None, help="subfolder of --input to convert (7B, 13B, ...)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="output dtype; None keeps the stored one")
    parser.add_argument("--max-shard-size", default="2GB", type=parse_size, help="largest output shard")
    parser.add_argument("--context-length", type=bounded_int("--context-length", 1, 1 << 24), default=None,
                        help="max_position_embeddings; None: 2048 for LLaMA-1, 4096 for LLaMA-2, 8192 for "
                             "LLaMA-3, 131072 for 3.1 onwards")
    parser.add_argument("--llama-version", choices=LLAMA3_VERSIONS, default=None,
                        help="LLaMA-3.x downloads (tiktoken tokenizer.model): its special tokens and rope "
                             "scaling; None: 3 without use_scaled_rope, 3.2 when at most 3072 wide, else 3.1")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output folder an earlier zhtune run wrote (never other files)")
    args = parser.parse_args(argv)
    import torch

    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = meta_to_hf(args.input, args.output, args.model_size, args.max_shard_size, dtype, args.overwrite,
                     args.context_length, args.llama_version)
    print(f"已转换 converted: {args.input} -> {out}")
    return 0
