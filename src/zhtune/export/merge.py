"""`zhtune merge`: fold 1..n LoRA adapters into a base model tensor by tensor, in little memory.

    zhtune merge --lora out/pt/pt_lora_model --lora out/sft/sft_lora_model --output merged/
    zhtune merge --base llama-7b-hf --lora sft_lora_model --output merged-pth --format pth

The whole model is never in memory: every output tensor's shape is known before any weight is read
(base headers + adapter shapes), so each output shard's safetensors header is written first and the
tensors are streamed into it one at a time. Safetensors bases are read with positioned file reads
(an mmap would count every page it touched as resident memory); .bin bases one shard at a time.
Peak RAM ≈ the largest tensor (as fp32, ×2) + the adapters (+ one .bin shard for .bin bases).
The tensor I/O lives in export/weights.py, adapter reading in export/adapters.py; this module plans,
checks and runs the merge.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.errors import ZhtuneError
from zhtune.export.adapters import (EMBED, HEAD, Adapter, load_adapter, read_run_yaml_near, resolve_adapter_dir,
                                    tokenizer_size, trained_base)
from zhtune.export.weights import TensorSpec, WeightReader, write_sharded_safetensors
from zhtune.io import read_json
from zhtune.model.load import check_local_model

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")


# ---- plan: validate everything before writing anything ---------------------------------------
@dataclass
class Plan:
    vocab: int                    # rows of the output vocabulary
    rows_after: list[int]         # vocabulary rows after each adapter
    tokenizer_dir: Path           # whose tokenizer files the output gets
    template: str | None
    specs: list[TensorSpec]


def _padded_ok(rows: int, n_tok: int) -> bool:
    """Rows match a tokenizer of n_tok tokens exactly or padded to a multiple of 8..128."""
    return rows == n_tok or (rows > n_tok and any(rows == -(-n_tok // m) * m for m in (8, 16, 32, 64, 128)))


def plan_merge(base_dir: Path, reader: WeightReader, config: dict, adapters: list[Adapter], dtype) -> Plan:
    arch = (config.get("architectures") or [None])[0]
    rows = reader.shape(EMBED)[0] if EMBED in reader.names() else config["vocab_size"]
    tied = HEAD not in reader.names()
    tok_dir, template, rows_after = base_dir, None, []
    for ad in adapters:
        where = str(ad.path)
        want = (ad.config.get("auto_mapping") or {}).get("base_model_class")
        if want and arch and want != arch:
            raise ZhtuneError(f"adapter was trained on {want}, the base is {arch}", where=where,
                              expected=f"an adapter for {arch}", hint="check --base / the adapter's run.yaml")
        _check_lora_shapes(ad, reader, rows, where)
        if tied:
            _check_tied_head(ad, where)
        new = ad.vocab_rows(rows)
        if new is not None:
            if ad.tokenizer_size is None:
                raise ZhtuneError(f"adapter carries a {new}-row vocabulary but no tokenizer", where=where,
                                  expected="the tokenizer files it was trained with "
                                           "(tokenizer.model, tokenizer_config.json)")
            if not _padded_ok(new, ad.tokenizer_size):
                raise ZhtuneError(f"adapter's embeddings have {new} rows but its tokenizer has "
                                  f"{ad.tokenizer_size} tokens", where=where,
                                  expected="embedding rows = len(tokenizer) (or padded to a multiple of 64)")
            if new < rows:
                raise ZhtuneError(f"adapter would shrink the vocabulary from {rows} to {new} rows", where=where,
                                  expected=f"at least {rows} rows", hint="apply the adapters in training order")
            if new > rows and not tied and HEAD not in ad.full and HEAD not in ad.tokens:
                raise ZhtuneError(f"adapter resizes embed_tokens to {new} rows but carries no lm_head", where=where,
                                  expected="lm_head in modules_to_save (or trainable tokens) when the vocabulary grows")
            for name in (EMBED, HEAD):
                if name in ad.tokens and new > rows:
                    covered = set(ad.tokens[name][0].tolist())
                    if not set(range(rows, new)) <= covered:
                        raise ZhtuneError(f"trainable tokens of {name} do not cover the new rows {rows}..{new - 1}",
                                          where=where, expected="every added token in trainable_token_indices")
                if name in ad.full and ad.full[name].shape[0] != new:
                    raise ZhtuneError(f"{name} has {ad.full[name].shape[0]} rows, embed_tokens has {new}", where=where)
            rows, tok_dir = new, ad.path
        elif ad.tokenizer_size is not None:
            if ad.tokenizer_size > rows:
                raise ZhtuneError(f"adapter's tokenizer has {ad.tokenizer_size} tokens but the model has {rows} rows",
                                  where=where,
                                  expected="resized embed_tokens/lm_head saved with the adapter (modules_to_save)")
            tok_dir = ad.path
        template = ad.template or template
        rows_after.append(rows)
    specs = []
    for name in reader.names():
        shape = list(reader.shape(name))
        if name in (EMBED, HEAD):
            shape[0] = rows
        src_dtype = reader.dtype(name)
        out = dtype if (dtype is not None and src_dtype.is_floating_point) else src_dtype
        specs.append(TensorSpec(name, tuple(shape), out, name))
    return Plan(rows, rows_after, tok_dir, template, specs)


def _check_lora_shapes(ad: Adapter, reader: WeightReader, rows: int, where: str) -> None:
    names = set(reader.names())
    for param, (a, b, _, emb) in ad.lora.items():
        if param not in names:
            raise ZhtuneError(f"adapter targets {param.removesuffix('.weight')}, which the base does not have",
                              where=where, expected=f"modules of the base, e.g. {min(names)}",
                              hint="was it trained on another model (layer count / module names)?")
        out_f, in_f = reader.shape(param)
        if emb:
            out_f = rows  # the vocabulary may have grown in an earlier adapter
            ok = b.shape[0] == in_f and a.shape[1] in (out_f, ad.vocab_rows(rows))
        else:
            ok = b.shape[0] == out_f and a.shape[1] == in_f
        if not ok:
            raise ZhtuneError(f"adapter's {param} expects a different hidden size (lora_A {tuple(a.shape)}, "
                              f"lora_B {tuple(b.shape)}; base weight {tuple(reader.shape(param))})",
                              where=where, expected="an adapter trained on this base (same hidden size)")
    for param in list(ad.full) + list(ad.tokens):
        if param not in names and not (param == HEAD and EMBED in names):
            raise ZhtuneError(f"adapter saves {param}, which the base does not have", where=where,
                              expected="modules_to_save / trainable tokens of this base")
        full = ad.full.get(param)
        base_shape = reader.shape(param if param in names else EMBED)  # a tied head is the embedding
        if full is not None and tuple(full.shape[1:]) != base_shape[1:]:
            raise ZhtuneError(f"adapter's {param} has shape {tuple(full.shape)}, base has {base_shape}",
                              where=where, expected="an adapter trained on this base (same hidden size)")


def _check_tied_head(ad: Adapter, where: str) -> None:
    """A tied base keeps one matrix for embeddings and head: an adapter that trained them apart (peft without
    ensure_weight_tying) cannot be merged into it without dropping its head."""
    if HEAD not in ad.full or EMBED not in ad.full:
        return
    import torch

    if not torch.equal(ad.full[HEAD].load(), ad.full[EMBED].load()):
        raise ZhtuneError("the adapter trained lm_head apart from embed_tokens, but the base ties them",
                          where=where, expected="one shared matrix (zhtune trains tied heads tied)",
                          hint="retrain with this zhtune (it sets peft's ensure_weight_tying for tied bases)")


def merge_tensor(name: str, load_base: Callable[[], Any], adapters: list[Adapter], rows_after: list[int]):
    """Apply the adapters, in order, to one base tensor, in fp32, in place; returns the fp32 result.

    A tensor an adapter saves whole (modules_to_save) starts from that adapter's copy: the base and
    earlier adapters are not even read for it.
    """
    import torch

    start = max((k for k, ad in enumerate(adapters) if name in ad.full), default=None)
    if start is None:
        w = load_base().float()
    else:
        w = adapters[start].full[name].load().float()
    for k, (ad, rows) in enumerate(zip(adapters, rows_after)):
        if start is not None and k < start:
            continue
        if name in ad.tokens:
            idx, new_rows = ad.tokens[name]
            if name in (EMBED, HEAD) and rows > w.shape[0]:
                w = torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])])
            w.index_copy_(0, idx, new_rows.float())
        if name in ad.lora:
            _add_lora(w, *ad.lora[name], transpose=bool(ad.config.get("fan_in_fan_out")))
    return w


def _add_lora(w, a, b, scale: float, emb: bool, transpose: bool, chunk: int = 4096) -> None:
    """w += scale * B @ A (embeddings: its transpose), a few thousand rows at a time so the
    full-size delta never exists; the arithmetic per element is peft's own (B @ A, then * scale)."""
    a, b = a.float(), b.float()
    if emb or transpose:            # delta = (B @ A).T = A.T @ B.T: rows of w come from A's columns
        a, b = b.T, a.T
    for i in range(0, w.shape[0], chunk):
        w[i:i + chunk] += (b[i:i + chunk] @ a) * scale


# ---- the command -------------------------------------------------------------------------------
def find_base(adapters: list[Path]) -> Path:
    """The base model the first adapter was trained on (run.yaml parents.model, its config, adapter_config)."""
    name, found = trained_base(adapters[0])
    if found is not None:
        return found
    raise ZhtuneError("--base is not given and the adapter does not name an existing base model folder",
                      where=f"{adapters[0]}/../run.yaml (parents.model)", expected="--base DIR",
                      hint=f"the adapter names {name or 'nothing'}")


def _vocab_rows(model_dir: Path) -> int | None:
    reader = WeightReader(model_dir)
    if EMBED in reader.names():
        return reader.shape(EMBED)[0]
    return read_json(model_dir / "config.json").get("vocab_size")


def _weights_differ(a: Path, b: Path, probes: list[str]) -> str | None:
    """Where two model folders differ: a tensor's shape, or the bytes of a few small tensors (final norm, the
    first projection an adapter changes); None when they look like the same model."""
    ra, rb = WeightReader(a), WeightReader(b)
    if set(ra.names()) != set(rb.names()):
        return "their tensors differ"
    for name in ra.names():
        if ra.shape(name) != rb.shape(name):
            return f"{name} is {list(ra.shape(name))} vs {list(rb.shape(name))}"
    for name in [n for n in ("model.norm.weight", *probes) if n in ra.names()][:3]:
        if not ra.get(name).equal(rb.get(name)):
            return f"{name} holds other values"
    return None


def _merge_output_of(folder: Path, base: Path, earlier: list[Path]) -> bool:
    """True when `folder` is a `zhtune merge` of `earlier` adapters into `base` (an adapter trained on that
    merged model is merged into the original base after them: Chinese-LLaMA-Alpaca's pt -> sft recipe)."""
    from zhtune.io import read_run_yaml

    run = read_run_yaml(folder)
    parents = run.get("parents") or {}
    if run.get("stage") != "merge" or not isinstance(parents, dict):
        return False
    loras = [Path(v).resolve() for k, v in sorted(parents.items()) if k.startswith("lora_")]
    return Path(str(parents.get("base", ""))).resolve() == base.resolve() and \
        loras == [d.resolve() for d in earlier]


def check_bases(base: Path, adapters: list[Adapter], force: bool, log=print) -> dict[int, Path]:
    """Refuse an adapter trained on another base (another vocabulary, another model) naming both bases and
    both vocabulary sizes, unless --force. Returns {adapter index: the base it was trained on, found here}."""
    rows = _vocab_rows(base)
    trained: dict[int, Path] = {}
    for k, ad in enumerate(adapters):
        name, found = trained_base(ad.path)
        if found is not None:
            trained[k] = found
            if found == base.resolve() or _merge_output_of(found, base, [a.path for a in adapters[:k]]):
                continue
            names = WeightReader(base).names()
            probes = [n for n in ad.lora if n in names] + [n for n in names if n.endswith("proj.weight")][:1]
            differs = _weights_differ(found, base, probes)
            if differs is None:
                continue  # a copy of the same model under another path
            problem = (f"adapter {ad.path} was trained on {found} (vocabulary {_vocab_rows(found)}), "
                       f"not on the base {base} (vocabulary {rows}): {differs}")
        elif ad.tokenizer_size is not None and ad.vocab_rows(rows) is None and k == 0:
            base_tok = _tokenizer_size(base)
            if base_tok is None or base_tok == ad.tokenizer_size:
                continue
            problem = (f"adapter {ad.path} was trained on {name or 'an unrecorded base'} with a {ad.tokenizer_size}-"
                       f"token vocabulary, the base {base} has a {base_tok}-token one ({rows} embedding rows)")
        else:
            continue
        if force:
            log(f"警告 warning (--force): {problem}")
            continue
        raise ZhtuneError(problem, where=f"--lora {ad.path}", expected="the adapter's own base as --base",
                          hint=f"pass --base {found or name}, or --force if you really mean to merge it into {base}")
    return trained


def _tokenizer_size(folder: Path) -> int | None:
    if not any((folder / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        return None
    return tokenizer_size(folder, f"--base {folder}")


def _check_chain(dirs: list[Path]) -> None:
    """Refuse merging an adapter twice: one trained from another (peft_path) already contains it."""
    for k, d in enumerate(dirs):
        peft_path = ((read_run_yaml_near(d).get("config") or {}).get("peft_path"))
        if not peft_path:
            continue
        start = Path(peft_path).expanduser().resolve()
        for j, earlier in enumerate(dirs):
            if j != k and start in (earlier.resolve(), earlier.parent.resolve()):
                raise ZhtuneError(f"{d} was trained on top of {earlier} (peft_path), so it already contains it",
                                  where=f"--lora {earlier}", expected="each adapter's changes once",
                                  hint=f"merge only {d}")


def _write_tokenizer(plan: Plan, out: Path) -> str | None:
    """Copy the chosen tokenizer files and set the training template's chat_template."""
    from zhtune.data.templates import get_template

    for n in TOKENIZER_FILES:
        if (plan.tokenizer_dir / n).is_file():
            shutil.copyfile(plan.tokenizer_dir / n, out / n)
    chat = get_template(plan.template).jinja() if plan.template else None
    cfg_path = out / "tokenizer_config.json"
    if chat and cfg_path.is_file():
        cfg = read_json(cfg_path, "tokenizer_config.json")
        cfg["chat_template"] = chat
        cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        if (out / "chat_template.jinja").is_file():
            (out / "chat_template.jinja").write_text(chat, encoding="utf-8")
    return chat


def merge(base: str | Path | None, loras: list[str | Path], output: str | Path, fmt: str = "hf",
          dtype: str | None = None, max_shard_size: int = 2 * 1000**3, verify: bool = False,
          overwrite: bool = False, num_shards: int | None = None, force: bool = False, log=print) -> Path:
    """Merge `loras` (in order) into `base`; write an HF (or Meta pth) folder at `output`.

    The output is locked for the whole run (a second merge into it is refused) and checked before any work."""
    from zhtune.io import check_output_dir, output_lock

    if fmt not in ("hf", "pth"):
        raise ZhtuneError(f"unknown format {fmt!r}", where="--format", expected="hf or pth")
    if not loras:
        raise ZhtuneError("no adapter given", where="--lora", expected="one or more --lora DIR")
    with output_lock(output, log=log):
        check_output_dir(output, overwrite)
        return _merge(base, loras, Path(output), fmt, dtype, max_shard_size, verify, overwrite, num_shards,
                      force, log)


def _merge(base, loras, output: Path, fmt, dtype, max_shard_size, verify, overwrite, num_shards, force, log):
    import torch

    from zhtune.io import atomic_output_dir, write_run_yaml

    dirs = [resolve_adapter_dir(p) for p in loras]
    _check_chain(dirs)
    base = Path(base) if base else find_base(dirs)
    if not (base / "config.json").is_file():
        raise ZhtuneError(f"no config.json in {base}", where="--base", expected="an HF model folder")
    config = read_json(base / "config.json", "config.json", where=f"--base {base}")
    check_local_model(base, where=f"--base {base}")  # else a wrong config.json is copied beside merged weights
    if fmt == "pth" and config.get("model_type") not in ("llama", None):  # before the work, not after it
        raise ZhtuneError(f"--format pth writes Meta's LLaMA layout; {base} is a {config.get('model_type')!r} model",
                          where="--format pth", expected="--format hf for mistral / qwen2 / qwen3 models",
                          hint="llama.cpp and Ollama take `zhtune export gguf` of the hf output")
    t0 = time.time()
    adapters = [load_adapter(d) for d in dirs]
    reader = WeightReader(base)
    out_dtype = getattr(torch, dtype) if dtype else None
    plan = plan_merge(base, reader, config, adapters, out_dtype)  # what cannot fit at all, with its own reason
    trained = check_bases(base, adapters, force, log)            # what would fit and silently be wrong
    log(f"合并 merging {len(adapters)} adapter(s) into {base}: {len(plan.specs)} tensors, vocab {plan.vocab}")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(plan.specs), unit="tensor", desc="merge", file=sys.stderr, leave=False)

    def make(spec: TensorSpec):
        w = merge_tensor(spec.name, lambda: reader.get(spec.name), adapters, plan.rows_after).to(spec.dtype)
        bar.update()
        return w

    with atomic_output_dir(output, overwrite, log=log) as tmp:
        hf_dir = tmp if fmt == "hf" else tmp / ".hf"
        hf_dir.mkdir(exist_ok=True)
        write_sharded_safetensors(hf_dir, plan.specs, make, max_shard_size)
        bar.close()
        out_cfg = dict(config, vocab_size=plan.vocab)
        dtype = next((s.dtype for s in plan.specs if s.dtype.is_floating_point), "float32")
        out_cfg["dtype"] = str(dtype).replace("torch.", "")
        (hf_dir / "config.json").write_text(json.dumps(out_cfg, indent=2) + "\n", encoding="utf-8")
        if (base / "generation_config.json").is_file():
            shutil.copyfile(base / "generation_config.json", hf_dir / "generation_config.json")
        _write_tokenizer(plan, hf_dir)
        if verify:
            _verify(base, dirs, hf_dir, trained.get(0), log)
        if fmt == "pth":
            from zhtune.export.meta import hf_to_meta

            hf_to_meta(hf_dir, tmp, num_shards=num_shards)
            shutil.rmtree(hf_dir)
        write_run_yaml(tmp, "merge", {"format": fmt, "dtype": out_cfg["dtype"], "template": plan.template,
                                      "vocab_size": plan.vocab, "model_name_or_path": str(base)},
                       {"base": str(base), **{f"lora_{i + 1}": str(d) for i, d in enumerate(dirs)}})
    log(f"已完成 done in {time.time() - t0:.1f}s -> {output}")
    if fmt == "hf":
        from zhtune.args import zhtune_command

        gguf = output.with_name(output.name + ".gguf")
        log(f"下一步 next: {zhtune_command('chat', '--model', output)}   ·   "
            f"{zhtune_command('export', 'gguf', '--model', output, '--output', gguf)}")
    return output


def _verify(base: Path, dirs: list[Path], merged: Path, trained_on: Path | None, log) -> None:
    """--verify: logits of the output vs the adapters applied through peft to the base the first one was
    trained on, not to --base: a wrong --base would otherwise be checked against itself and pass."""
    from zhtune.export.parity import verify_merge

    if trained_on is None:
        log(f"注意 note: the base the adapter was trained on is not recorded or not found here; "
            f"verifying against --base {base}")
    elif trained_on != base.resolve():
        log(f"校验 verify against the adapter's own base {trained_on} (not --base {base})")
    verify_merge(trained_on or base, dirs, merged, log=log)


def main(argv: list[str]) -> int:
    from zhtune.args import make_parser, parse_size

    parser = make_parser(
        "merge",
        """
        把一个或多个 LoRA 依次合并进基座模型；逐个张量流式处理，内存占用约为最大张量加上 LoRA。
        Merge 1..n LoRA adapters (in order) into the base model, streaming tensor by tensor: peak memory is
        about the largest tensor plus the adapters. The output takes the vocabulary and tokenizer of the
        last adapter that carries one, and the chat template of the training template.
        """,
        """
        zhtune merge --lora out/sft/sft_lora_model --output merged/            # base from run.yaml
        zhtune merge --base llama-7b-hf --lora pt_lora_model --lora sft_lora_model --output merged/ --verify
        zhtune merge --base llama-13b-hf --lora sft_lora_model --output merged-pth/ --format pth --dtype float16
        """,
    )
    parser.add_argument("--base", default=None,
                        help="HF base model folder; when omitted, the one the adapter's run.yaml names")
    parser.add_argument("--lora", action="append", required=True,
                        help="adapter folder; repeat to apply several in order")
    parser.add_argument("--output", required=True, help="new output folder")
    parser.add_argument("--format", choices=["hf", "pth"], default="hf", help="hf: safetensors; pth: Meta's layout")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="output dtype; None keeps the base's")
    parser.add_argument("--max-shard-size", type=parse_size, default="2GB", help="largest safetensors shard (hf)")
    parser.add_argument("--num-shards", type=int, default=None,
                        help="model-parallel consolidated.NN.pth files (pth); None: as Meta ships that size")
    parser.add_argument("--verify", action="store_true", help="compare logits with base + adapters through peft")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output folder an earlier zhtune run wrote (never other files)")
    parser.add_argument("--force", action="store_true",
                        help="merge even an adapter trained on another base (vocabulary or weights differ)")
    args = parser.parse_args(argv)
    if args.num_shards is not None and args.num_shards < 1:
        raise ZhtuneError(f"--num-shards {args.num_shards}", where="--num-shards", expected="an integer >= 1")
    merge(args.base, args.lora, args.output, args.format, args.dtype, args.max_shard_size, args.verify,
          args.overwrite, args.num_shards, args.force)
    return 0
