"""`zhtune merge`: fold 1..n LoRA adapters into a base model tensor by tensor, in little memory.

    zhtune merge --lora out/pt/pt_lora_model --lora out/sft/sft_lora_model --output merged/
    zhtune merge --base llama-7b-hf --lora sft_lora_model --output merged-pth --format pth

The whole model is never in memory: every output tensor's shape is known before any weight is read
(base headers + adapter shapes), so each output shard's safetensors header is written first and the
tensors are streamed into it one at a time. Safetensors bases are read with positioned file reads
(an mmap would count every page it touched as resident memory); .bin bases one shard at a time.
Peak RAM ≈ the largest tensor (as fp32, ×2) + the adapters (+ one .bin shard for .bin bases).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zhtune.errors import ZhtuneError

# ---- streaming safetensors I/O -----------------------------------------------------------------
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _torch_dtype(code: str):
    import torch

    return getattr(torch, _ST_DTYPES[code])


def _st_code(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return next(k for k, v in _ST_DTYPES.items() if v == name)


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header json, byte offset of the data) of a .safetensors file."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ZhtuneError(f"not a safetensors file (too short): {path}", where=str(path))
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise ZhtuneError(f"corrupt safetensors header: {path}", where=str(path)) from None
    return header, 8 + n


@dataclass
class TensorSpec:
    """One output tensor: its name, shape and dtype are fixed before any data is written."""
    name: str
    shape: tuple[int, ...]
    dtype: Any            # torch.dtype
    source: Any = None    # whatever the producer needs to build it

    @property
    def nbytes(self) -> int:
        import torch

        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class WeightReader:
    """The tensors of an HF model folder (model.safetensors[.index.json] or pytorch_model*.bin), one at a time."""

    def __init__(self, model_dir: str | Path, files: list[Path] | None = None):
        self.dir = Path(model_dir)
        self._where: dict[str, tuple[Path, Any]] = {}   # name -> (file, header entry | None)
        self._cache: tuple[Path | None, dict] = (None, {})
        files = files or self._files()
        for f in files:
            if f.suffix == ".safetensors":
                header, start = read_safetensors_header(f)
                for name, entry in header.items():
                    if name != "__metadata__":
                        self._where[name] = (f, dict(entry, start=start))
            else:  # .bin: read the shapes from an mmapped load (data pages are not touched)
                from zhtune.io import load_state_dict

                for name, t in load_state_dict(f).items():
                    self._where[name] = (f, {"shape": list(t.shape), "dtype": _st_code(t.dtype)})

    def _files(self) -> list[Path]:
        for index, single in (("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if (self.dir / index).is_file():
                data = json.loads((self.dir / index).read_text(encoding="utf-8"))
                names = list(dict.fromkeys(data.get("weight_map", {}).values()))
                missing = [n for n in names if not (self.dir / n).is_file()]
                if missing:
                    raise ZhtuneError(f"shard {missing[0]} listed in {index} is missing", where=str(self.dir / index),
                                      expected="every shard of the index beside it")
                return [self.dir / n for n in names]
            if (self.dir / single).is_file():
                return [self.dir / single]
        raise ZhtuneError(f"no model weights in {self.dir}", where=str(self.dir),
                          expected="model.safetensors, model.safetensors.index.json or pytorch_model*.bin")

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def dtype(self, name: str):
        return _torch_dtype(self._where[name][1]["dtype"])

    def file(self, name: str) -> Path:
        return self._where[name][0]

    def get(self, name: str):
        """The tensor `name` (a fresh CPU tensor)."""
        import torch

        path, entry = self._where[name]
        if path.suffix == ".safetensors":
            begin, end = entry["data_offsets"]
            buf = bytearray(end - begin)
            with open(path, "rb") as fh:
                fh.seek(entry["start"] + begin)
                if fh.readinto(buf) != len(buf):
                    raise ZhtuneError(f"{path} is truncated (tensor {name})", where=str(path))
            if not buf:
                return torch.empty(entry["shape"], dtype=self.dtype(name))
            return torch.frombuffer(buf, dtype=self.dtype(name)).view(entry["shape"])
        if self._cache[0] != path:  # one .bin shard at a time
            from zhtune.io import load_state_dict

            self._cache = (None, {})
            self._cache = (path, load_state_dict(path))
        return self._cache[1][name]


def write_sharded_safetensors(out_dir: Path, specs: list[TensorSpec], make: Callable[[TensorSpec], Any],
                              max_shard_size: int, prefix: str = "model") -> dict[str, str]:
    """Write `specs` as safetensors shards (+ index when more than one), calling make(spec) per tensor.

    Headers are written first from the specs, then each tensor's bytes as it is made: only one
    tensor is in memory at a time. Returns the weight map {name: file}.
    """
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for spec in shard:
            header[spec.name] = {"dtype": _st_code(spec.dtype), "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # the data must start 8-byte aligned
        with open(out_dir / fname, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)) + blob)
            for spec in shard:
                t = make(spec)
                if tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.dtype:
                    raise RuntimeError(f"{spec.name}: made {tuple(t.shape)} {t.dtype}, planned {spec.shape} {spec.dtype}")
                if spec.nbytes:
                    fh.write(t.contiguous().view(-1).view(_u8()).numpy().data)
                weight_map[spec.name] = fname
    if n > 1:
        total = sum(s.nbytes for s in specs)
        (out_dir / f"{prefix}.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n",
            encoding="utf-8")
    return weight_map


def _u8():
    import torch

    return torch.uint8


# ---- adapters ----------------------------------------------------------------------------------
@dataclass
class Lazy:
    """A tensor of the adapter file read only when the merge reaches it (embeddings can be huge)."""
    shape: tuple[int, ...]
    load: Callable[[], Any]   # -> a fresh tensor the caller may modify


EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")


@dataclass
class Adapter:
    """A LoRA adapter folder, read into what the merge needs."""
    path: Path
    config: dict
    lora: dict[str, tuple[Any, Any, float, bool]] = field(default_factory=dict)  # param -> (A, B, scale, is_embedding)
    full: dict[str, Lazy] = field(default_factory=dict)    # param -> whole new tensor (modules_to_save)
    tokens: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # param -> (row ids, new rows)
    tokenizer_size: int | None = None   # len(tokenizer) of the tokenizer in the folder, if any
    template: str | None = None          # training template name (run.yaml)
    run: dict = field(default_factory=dict)

    def vocab_rows(self, current: int) -> int | None:
        """Rows of the vocabulary this adapter changes to: full embeddings of another size than
        `current`, or trainable rows past it (None: the vocabulary stays as it is)."""
        if EMBED in self.full:
            return self.full[EMBED].shape[0] if self.full[EMBED].shape[0] != current else None
        if EMBED in self.tokens and int(self.tokens[EMBED][0].max()) + 1 > current:
            return int(self.tokens[EMBED][0].max()) + 1
        return None


def resolve_adapter_dir(path: str | Path) -> Path:
    """The adapter folder: `path` itself, or the one *_lora_model folder inside a training output."""
    path = Path(path)
    if not path.exists():
        raise ZhtuneError(f"adapter folder not found: {path}", where="--lora", expected="an existing folder")
    if (path / "adapter_config.json").is_file():
        return path
    inner = sorted(p.parent for p in path.glob("*_lora_model/adapter_config.json"))
    if len(inner) == 1:
        return inner[0]
    raise ZhtuneError(f"no adapter_config.json in {path}", where=f"--lora {path}",
                      expected="a peft adapter folder (adapter_config.json + adapter_model.safetensors)",
                      hint=f"found {len(inner)} *_lora_model folders; pass one of them" if inner else
                      "pass the pt_lora_model / sft_lora_model folder that training wrote")


def _run_yaml(adapter_dir: Path) -> dict:
    from zhtune.io import read_run_yaml

    return read_run_yaml(adapter_dir) or read_run_yaml(adapter_dir.parent)


def _pattern_value(patterns: dict, module: str, default):
    for pat, value in (patterns or {}).items():  # peft matches a pattern against the module's name suffix
        if re.match(rf"(.*\.)?({pat})$", module):
            return value
    return default


def load_adapter(path: str | Path) -> Adapter:
    """Read adapter_config.json + weights; classify every tensor; refuse what cannot be merged."""
    import torch

    from zhtune.io import load_state_dict

    path = resolve_adapter_dir(path)
    config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    where = str(path / "adapter_config.json")
    if config.get("peft_type", "LORA") != "LORA":
        raise ZhtuneError(f"adapter type {config.get('peft_type')} cannot be merged", where=where,
                          expected="a LoRA adapter (peft_type LORA)")
    if config.get("use_dora"):
        raise ZhtuneError("DoRA adapters are not supported by the streaming merge", where=f"{where}: use_dora",
                          expected="use_dora: false", hint="merge a DoRA adapter with peft's merge_and_unload")
    weights = next((path / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (path / n).is_file()), None)
    if weights is None:
        raise ZhtuneError(f"adapter weights missing in {path}", where=str(path),
                          expected="adapter_model.safetensors (or adapter_model.bin) beside adapter_config.json")
    run = _run_yaml(path)
    ad = Adapter(path=path, config=config, run=run, template=(run.get("config") or {}).get("template"))
    if weights.suffix == ".safetensors":  # headers now, tensors on demand
        file = WeightReader(path, [weights])
        keys, shape_of, get = file.names(), file.shape, file.get
    else:
        state = load_state_dict(weights)
        keys, shape_of = list(state), (lambda k: tuple(state[k].shape))

        def get(key):
            return state[key].clone()
    pairs: dict[str, dict[str, Any]] = {}
    trained: dict[str, Lazy] = {}
    for key in keys:
        name = key.removeprefix("base_model.model.")
        lazy = Lazy(shape_of(key), lambda key=key: get(key))
        t = None if name.endswith(".weight") and "lora_" not in name else get(key)  # LoRA/tokens: small, load now
        if m := re.match(r"(.+)\.lora_(A|B)(\.[^.]+)?\.weight$", name) or \
                re.match(r"(.+)\.lora_embedding_(A|B)(\.[^.]+)?$", name):
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
            pairs[m.group(1)]["embedding"] = "lora_embedding" in name
        elif name.endswith(".token_adapter.trainable_tokens_delta"):
            module = name.removesuffix(".token_adapter.trainable_tokens_delta")
            ad.tokens[module + ".weight"] = (torch.tensor(_token_indices(config, module, where)), t)
        elif name.endswith(".original_module.weight"):
            continue  # the untrained copy peft keeps beside a modules_to_save module
        elif name.endswith(".modules_to_save.weight"):  # the trained copy (wins over a plain duplicate)
            trained[name.removesuffix(".modules_to_save.weight") + ".weight"] = lazy
        elif name.endswith(".base_layer.weight"):  # the (resized) weight under a LoRA / token adapter
            module = name.removesuffix(".base_layer.weight").removesuffix(".token_adapter")
            ad.full[module + ".weight"] = lazy
        elif name.endswith(".weight") and "lora_" not in name:
            ad.full[name] = lazy
        else:
            raise ZhtuneError(f"adapter tensor {key!r} cannot be merged", where=str(weights),
                              expected="LoRA A/B, modules_to_save weights or trainable-token rows")
    ad.full.update(trained)
    alpha = config.get("lora_alpha", 8)
    for module, p in pairs.items():
        if "A" not in p or "B" not in p:
            raise ZhtuneError(f"adapter has lora_A without lora_B (or the reverse) for {module}", where=str(weights))
        r = p["A"].shape[0]
        a = _pattern_value(config.get("alpha_pattern"), module, alpha)
        scale = a / math.sqrt(r) if config.get("use_rslora") else a / r
        ad.lora[module + ".weight"] = (p["A"], p["B"], scale, p["embedding"])
    if any((path / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        from transformers import AutoTokenizer

        ad.tokenizer_size = len(AutoTokenizer.from_pretrained(str(path)))
    return ad


def _token_indices(config: dict, module: str, where: str) -> list[int]:
    spec = config.get("trainable_token_indices")
    if isinstance(spec, list):
        return spec
    for key, ids in (spec or {}).items():
        if module == key or module.endswith("." + key):
            return ids
    raise ZhtuneError(f"trainable-token rows for {module} but no trainable_token_indices for it", where=where)


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
                                  expected="the tokenizer files it was trained with (tokenizer.model, tokenizer_config.json)")
            if not _padded_ok(new, ad.tokenizer_size):
                raise ZhtuneError(f"adapter's embeddings have {new} rows but its tokenizer has {ad.tokenizer_size} tokens",
                                  where=where, expected="embedding rows = len(tokenizer) (or padded to a multiple of 64)")
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
                                  where=where, expected="resized embed_tokens/lm_head saved with the adapter (modules_to_save)")
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
    """The base model named by the first adapter's run.yaml (or its adapter_config.json)."""
    first = adapters[0]
    run = _run_yaml(first)
    cands = [(run.get("config") or {}).get("model_name_or_path"), (run.get("parents") or {}).get("base"),
             json.loads((first / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")]
    for c in cands:
        if c and Path(c).is_dir():
            return Path(c)
    raise ZhtuneError("--base is not given and the adapter does not name an existing base model folder",
                      where=f"{first}/../run.yaml (config.model_name_or_path)", expected="--base DIR",
                      hint=f"the adapter names {next((c for c in cands if c), 'nothing')}")


def _check_chain(dirs: list[Path]) -> None:
    """Refuse merging an adapter twice: one trained from another (peft_path) already contains it."""
    for k, d in enumerate(dirs):
        peft_path = ((_run_yaml(d).get("config") or {}).get("peft_path"))
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
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["chat_template"] = chat
        cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        if (out / "chat_template.jinja").is_file():
            (out / "chat_template.jinja").write_text(chat, encoding="utf-8")
    return chat


def merge(base: str | Path | None, loras: list[str | Path], output: str | Path, fmt: str = "hf",
          dtype: str | None = None, max_shard_size: int = 2 * 1000**3, verify: bool = False,
          overwrite: bool = False, num_shards: int | None = None, log=print) -> Path:
    """Merge `loras` (in order) into `base`; write an HF (or Meta pth) folder at `output`."""
    import torch

    from zhtune.io import atomic_output_dir, check_output_dir, write_run_yaml

    check_output_dir(output, overwrite)
    if fmt not in ("hf", "pth"):
        raise ZhtuneError(f"unknown format {fmt!r}", where="--format", expected="hf or pth")
    if not loras:
        raise ZhtuneError("no adapter given", where="--lora", expected="one or more --lora DIR")
    dirs = [resolve_adapter_dir(p) for p in loras]
    _check_chain(dirs)
    base = Path(base) if base else find_base(dirs)
    if not (base / "config.json").is_file():
        raise ZhtuneError(f"no config.json in {base}", where="--base", expected="an HF model folder")
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    t0 = time.time()
    adapters = [load_adapter(d) for d in dirs]
    reader = WeightReader(base)
    out_dtype = getattr(torch, dtype) if dtype else None
    plan = plan_merge(base, reader, config, adapters, out_dtype)
    log(f"合并 merging {len(adapters)} adapter(s) into {base}: {len(plan.specs)} tensors, vocab {plan.vocab}")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(plan.specs), unit="tensor", desc="merge", file=sys.stderr, leave=False)

    def make(spec: TensorSpec):
        w = merge_tensor(spec.name, lambda: reader.get(spec.name), adapters, plan.rows_after).to(spec.dtype)
        bar.update()
        return w

    with atomic_output_dir(output, overwrite) as tmp:
        hf_dir = tmp if fmt == "hf" else tmp / ".hf"
        hf_dir.mkdir(exist_ok=True)
        write_sharded_safetensors(hf_dir, plan.specs, make, max_shard_size)
        bar.close()
        out_cfg = dict(config, vocab_size=plan.vocab)
        out_cfg["dtype"] = str(next((s.dtype for s in plan.specs if s.dtype.is_floating_point), "float32")).replace("torch.", "")
        (hf_dir / "config.json").write_text(json.dumps(out_cfg, indent=2) + "\n", encoding="utf-8")
        if (base / "generation_config.json").is_file():
            shutil.copyfile(base / "generation_config.json", hf_dir / "generation_config.json")
        _write_tokenizer(plan, hf_dir)
        if verify:
            from zhtune.export.parity import verify_merge

            verify_merge(base, dirs, hf_dir, log=log)
        if fmt == "pth":
            from zhtune.export.meta import hf_to_meta

            hf_to_meta(hf_dir, tmp, num_shards=num_shards)
            shutil.rmtree(hf_dir)
        write_run_yaml(tmp, "merge", {"format": fmt, "dtype": out_cfg["dtype"], "template": plan.template,
                                      "vocab_size": plan.vocab, "model_name_or_path": str(base)},
                       {"base": str(base), **{f"lora_{i + 1}": str(d) for i, d in enumerate(dirs)}})
    log(f"已完成 done in {time.time() - t0:.1f}s -> {output}")
    return Path(output)


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
    parser.add_argument("--base", default=None, help="HF base model folder; when omitted, the one the adapter's run.yaml names")
    parser.add_argument("--lora", action="append", required=True, help="adapter folder; repeat to apply several in order")
    parser.add_argument("--output", required=True, help="new output folder")
    parser.add_argument("--format", choices=["hf", "pth"], default="hf", help="hf: safetensors; pth: Meta's layout")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="output dtype; None keeps the base's")
    parser.add_argument("--max-shard-size", type=parse_size, default="2GB", help="largest safetensors shard (hf)")
    parser.add_argument("--num-shards", type=int, default=None,
                        help="model-parallel consolidated.NN.pth files (pth); None: as Meta ships that size")
    parser.add_argument("--verify", action="store_true", help="compare logits with base + adapters through peft")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    if args.num_shards is not None and args.num_shards < 1:
        raise ZhtuneError(f"--num-shards {args.num_shards}", where="--num-shards", expected="an integer >= 1")
    merge(args.base, args.lora, args.output, args.format, args.dtype, args.max_shard_size, args.verify,
          args.overwrite, args.num_shards)
    return 0
