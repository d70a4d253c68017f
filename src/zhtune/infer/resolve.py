"""Which model a path is, and the engine for it: base model, adapters, tokenizer folder, template and
backend worked out from what earlier stages wrote (run.yaml, adapter_config.json, chat_template).

    engine = load_engine("out/sft_run")               # an adapter folder: its base from run.yaml, hf backend
    engine = load_engine("model.q4_k_m.gguf")         # llama.cpp, picked by the suffix
    spec = resolve_model("base", loras=["out/sft/sft_lora_model"])

Front ends take their flags from zhtune.infer.options, which calls load_engine.
"""

from __future__ import annotations

import json
from pathlib import Path

from zhtune.data.templates import TEMPLATES, Template, get_template, match_chat_template, tokenizer_chat_template
from zhtune.errors import ZhtuneError
from zhtune.infer.engine import Engine, ModelSpec
from zhtune.io import read_run_yaml

BACKENDS = ("hf", "llamacpp", "vllm")


def _is_hf_model(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def _is_adapter(p: Path) -> bool:
    return p.is_dir() and (p / "adapter_config.json").is_file()


def _adapter_dir(p: Path) -> Path:
    """An adapter folder, or a training output folder holding exactly one *_lora_model/ adapter."""
    if _is_adapter(p):
        return p
    inner = sorted(q for q in p.glob("*_lora_model") if _is_adapter(q)) if p.is_dir() else []
    if len(inner) == 1:
        return inner[0]
    return p


def _run_yaml_near(p: Path) -> dict:
    """run.yaml of an adapter (written beside it, or one level up in the training output folder)."""
    return read_run_yaml(p) or (read_run_yaml(p.parent) if p.parent != p else {})


def _run_config(p: Path) -> dict:
    """The `config` mapping of the run.yaml near `p` ({} when there is none or it is not a mapping)."""
    config = _run_yaml_near(p).get("config")
    return config if isinstance(config, dict) else {}


def _base_of_adapter(adapter: Path, flag: str) -> Path:
    parents = _run_yaml_near(adapter).get("parents")
    candidates = [_run_config(adapter).get("model_name_or_path"),
                  *(parents.values() if isinstance(parents, dict) else ())]
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None   # a broken adapter_config.json is reported by whoever loads the adapter
    if isinstance(config, dict):
        candidates.append(config.get("base_model_name_or_path"))
    for c in candidates:
        if not c:
            continue
        p = Path(str(c)).expanduser()
        if not p.is_absolute():  # relative paths in run.yaml are relative to where training ran
            p = p if p.exists() else adapter.parent / p
        if _is_hf_model(p):
            return p
    raise ZhtuneError(f"cannot find the base model of adapter {adapter}", where=flag,
                      expected="run.yaml config.model_name_or_path (or adapter_config.json "
                               "base_model_name_or_path) pointing at an existing HF model folder",
                      hint="pass the base as --model BASE and the adapter as --lora ADAPTER")


def _check_readable(base: Path, loras: list[Path]) -> None:
    """config.json and every adapter's config and weights can be read, before any loading: a bad config.json
    is not blamed on the tokenizer, a truncated or pickled adapter is named (not a library traceback)."""
    from zhtune.export.adapters import check_adapter
    from zhtune.io import read_json

    read_json(base / "config.json", "config.json", where=f"--model {base / 'config.json'}")
    for lo in loras:
        check_adapter(lo)


def _has_tokenizer(p: Path) -> bool:
    return any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def resolve_model(model: str | Path, loras=(), template: str | None = None) -> ModelSpec:
    """Work out base, adapters, tokenizer folder and template from what earlier stages wrote."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ZhtuneError(f"model path does not exist: {model}", where="--model",
                          expected="an HF model folder, an adapter folder or a .gguf file")
    lora_paths = []
    for i, lo in enumerate(loras):
        lp = _adapter_dir(Path(lo).expanduser())
        if not _is_adapter(lp):
            raise ZhtuneError(f"not an adapter folder: {lo}", where=f"--lora #{i + 1}",
                              expected="a folder with adapter_config.json (e.g. OUTPUT/sft_lora_model)")
        lora_paths.append(lp)
    adapter = _adapter_dir(path)
    if _is_adapter(adapter):        # an adapter alone: its base comes from run.yaml
        lora_paths.insert(0, adapter)
        base = _base_of_adapter(adapter, "--model")
    elif _is_hf_model(path):
        base = path
    else:
        raise ZhtuneError(f"not a model: {model}", where="--model",
                          expected="a folder with config.json (HF model), an adapter folder "
                                   "(adapter_config.json) or a .gguf file")
    _check_readable(base, lora_paths)
    tokenizer = next((lp for lp in reversed(lora_paths) if _has_tokenizer(lp)), base)
    found = match_chat_template(*tokenizer_chat_template(tokenizer)) if tokenizer.is_dir() else None
    return ModelSpec(base, lora_paths, *pick_template(template, [base, *lora_paths], found), tokenizer=tokenizer)


def pick_template(name: str | None, folders: list[Path], found: Template | None,
                  chat_template_first: bool = False) -> tuple[Template, str]:
    """(template, where it came from): --template, else the run.yaml of the last stage among `folders`
    that names one, else `found` (the registry template the model's chat_template renders like), else
    "default". A GGUF's embedded chat_template is the file's own record and comes before run.yaml
    (chat_template_first); a tokenizer's may be the base's, so run.yaml wins for folders."""
    if name:
        try:
            return get_template(name), "--template"
        except ZhtuneError as exc:
            exc.where = "--template"
            raise
    if found and chat_template_first:
        return found, "chat_template"
    for folder in reversed(folders):   # the last stage's choice wins
        run_name = _run_config(folder).get("template")
        if isinstance(run_name, str) and run_name in TEMPLATES:
            return TEMPLATES[run_name], "run.yaml"
    if found:
        return found, "chat_template"
    return TEMPLATES["default"], "default"


def gguf_template(name: str | None, path: str | Path):
    """The template chooser the llamacpp backend calls with the GGUF's embedded chat_template and
    its BOS/EOS text (known only once llama.cpp has read the file): --template, the embedded one,
    the run.yaml of the folder it was exported into (or the one above), else default."""
    if name:   # checked now, before llama.cpp spends time loading the file
        chosen = pick_template(name, [], None)[0]
        return lambda _chat_template, _bos, _eos: chosen
    folder = Path(path).expanduser().parent

    def choose(chat_template: str | None, bos: str, eos: str) -> Template:
        found = match_chat_template(chat_template, bos or "<s>", eos or "</s>")
        return pick_template(name, [folder], found, chat_template_first=True)[0]

    return choose


def pick_backend(model: str | Path, backend: str | None) -> str:
    gguf = str(model).lower().endswith(".gguf")
    if not backend:
        return "llamacpp" if gguf else "hf"
    if backend not in BACKENDS:
        raise ZhtuneError(f"unknown backend {backend!r}", where="--backend", expected=" | ".join(BACKENDS))
    if backend != "llamacpp" and gguf and Path(model).is_file():
        raise ZhtuneError(f"--backend {backend} cannot run a GGUF file: {model}", where="--backend",
                          expected="--backend llamacpp (the default for .gguf)",
                          hint="or give --model the HF folder the GGUF was exported from")
    if backend == "llamacpp" and Path(model).is_dir():
        raise ZhtuneError(f"--backend llamacpp runs a .gguf file; {model} is a folder", where="--backend",
                          expected="a .gguf file (zhtune export gguf), or no --backend for an HF folder")
    return backend


def load_engine(model: str, loras: list[str] | tuple[str, ...] = (), backend: str | None = None,
                template: str | None = None, **options) -> Engine:
    """Open `model` with the backend named, or the one its path implies (.gguf -> llamacpp, else hf).

    options go to the backend: hf: dtype ("auto"|"fp32"|"bf16"|"fp16"), load_in_8bit, load_in_4bit,
    num_gpus, device, max_batch_size (16); llamacpp: n_ctx (per sequence; 0 = the model's),
    n_threads, n_threads_batch, n_batch, n_parallel (8); vllm: num_gpus, dtype, gpu_memory_utilization,
    max_model_len.
    """
    name = pick_backend(model, backend)
    if name == "llamacpp":
        from zhtune.infer.llamacpp import LlamaCppEngine

        return LlamaCppEngine(model, loras=loras, template=gguf_template(template, model), **options)
    spec = resolve_model(model, loras, template)
    if name == "vllm":
        from zhtune.infer.vllm import VllmEngine

        return VllmEngine(spec, **options)
    from zhtune.infer.hf import HFEngine

    return HFEngine(spec, **options)
