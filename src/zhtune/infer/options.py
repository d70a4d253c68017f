"""The model / engine flags and the generation defaults of every front end (chat, webui, serve, rag,
eval), defined once: a front end adds them to its parser and builds its engine and GenParams from
the parsed args, so a flag means the same everywhere and a new one reaches every front end.

    p = make_parser("chat", ...)
    add_model_args(p)                       # --model --lora --backend --template --dtype ... --context-length
    add_gen_args(p, "chat")                 # --max-new-tokens --temperature ... with chat's defaults
    args = p.parse_args(argv)
    params = params_from_args(args, "chat") # GenParams, out-of-range values named by flag
    engine = engine_from_args(args)         # load_engine with the options the chosen backend takes
"""

from __future__ import annotations

import argparse

from zhtune.args import bounded_int
from zhtune.errors import ZhtuneError
from zhtune.infer.engine import Engine, GenParams
from zhtune.infer.resolve import BACKENDS, load_engine, pick_backend

# Generation defaults, one row per front end, over GenParams' own defaults (which is also what an
# API request gets for a field it leaves out). chat/webui/rag answer a person: a low temperature
# keeps answers on topic; rag keeps answers short so more of the context holds retrieved text.
# serve: a request without max_tokens gets the rest of the context (OpenAI's rule).
# Documented per front end in docs/guides/chat.md, serve.md and rag.md.
GEN_DEFAULTS: dict[str, dict] = {
    "chat": {"max_new_tokens": 512, "temperature": 0.2},
    "webui": {"max_new_tokens": 512, "temperature": 0.2},
    "rag": {"max_new_tokens": 256, "temperature": 0.2},
    "serve": {},
    "eval": {"temperature": 0.0},
}
# sampling flags a front end leaves out because its own flag has that name (they keep the default)
NOT_FLAGS: dict[str, tuple[str, ...]] = {"rag": ("top_k",)}   # rag qa --top-k: chunks to retrieve

DTYPES = ("auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16")
_GEN_FLAGS = (  # (flag, GenParams field, type, help)
    ("--max-new-tokens", "max_new_tokens", int, "longest answer, in tokens"),
    ("--temperature", "temperature", float, "0 = greedy"),
    ("--top-p", "top_p", float, "nucleus sampling: keep the smallest set of tokens reaching this probability"),
    ("--top-k", "top_k", int, "sample among the k most likely tokens (0 = all)"),
    ("--repetition-penalty", "repetition_penalty", float, "1.0 = off"),
    ("--seed", "seed", int, "sampling seed (default: random)"),
)


def add_model_args(p, model_group=None, context_help: str | None = None, several: bool = False) -> None:
    """--model and the loading options. `model_group`: a mutually exclusive group that --model joins
    (rag: --model or --api-base); without it --model is required. `several`: --model may be repeated
    (eval compares models side by side; args.model is then a list)."""
    (model_group or p).add_argument("--model", required=model_group is None, action="append" if several else "store",
                                    help="model folder, adapter folder (its base from run.yaml) or .gguf file"
                                         + (" (repeat to compare several)" if several else ""))
    p.add_argument("--lora", action="append", default=[], metavar="DIR",
                   help="LoRA adapter folder applied without merging (repeat for several; hf/vllm)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="default: llamacpp for .gguf, else hf")
    p.add_argument("--template", default=None,
                   help="chat template (default: run.yaml / the model's chat_template / default)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, metavar="{auto,fp32,bf16,fp16}",
                   help="hf/vllm: weight dtype")
    p.add_argument("--load-in-8bit", action="store_true", help="hf: 8-bit weights (bitsandbytes)")
    p.add_argument("--load-in-4bit", action="store_true", help="hf: 4-bit nf4 weights (bitsandbytes)")
    p.add_argument("--num-gpus", type=bounded_int("--num-gpus", 1, 1024), default=None,
                   help="hf/vllm: GPUs to spread the model over (default: all visible)")
    p.add_argument("--threads", type=bounded_int("--threads", 1, 1024), default=None,
                   help="llamacpp: CPU threads for steps of one token (default: half the logical CPUs)")
    p.add_argument("--threads-batch", type=bounded_int("--threads-batch", 1, 1024), default=None,
                   help="llamacpp: CPU threads for prompts and steps of several streams (default: --threads; "
                        "raise it only where cores are free)")
    p.add_argument("--context-length", "--max-model-len", dest="context_length", metavar="N", default=None,
                   type=bounded_int("--context-length", 1, 1 << 24),
                   help=context_help or "context in tokens (default: the model's; hf/vllm can only shorten it; "
                                        "llamacpp: the context of each sequence)")


def gen_defaults(front_end: str) -> GenParams:
    """The GenParams `front_end` starts from (GEN_DEFAULTS over GenParams' own defaults)."""
    return GenParams(**GEN_DEFAULTS[front_end])


def add_gen_args(p, front_end: str) -> None:
    """The sampling flags, with `front_end`'s defaults (GEN_DEFAULTS)."""
    defaults = gen_defaults(front_end)
    for flag, name, kind, help_text in _GEN_FLAGS:
        if name not in NOT_FLAGS.get(front_end, ()):
            p.add_argument(flag, type=kind, default=getattr(defaults, name), help=help_text)


def params_from_args(args: argparse.Namespace, front_end: str) -> GenParams:
    """GenParams from add_gen_args' flags, checked; an out-of-range value names its flag."""
    params = gen_defaults(front_end)
    for _, name, _, _ in _GEN_FLAGS:
        if name not in NOT_FLAGS.get(front_end, ()):
            setattr(params, name, getattr(args, name))
    try:
        return params.validate()
    except ZhtuneError as exc:   # name the flag, not the field
        exc.where = "--" + str(exc.where).replace("_", "-")
        raise


def check_front_end_args(args: argparse.Namespace, front_end: str) -> GenParams:
    """Every flag of add_model_args / add_gen_args that can be checked without loading anything (the sampling
    values, --backend against --model), for a front end with slow work before its engine loads (rag)."""
    if getattr(args, "model", None):
        pick_backend(args.model, args.backend)
    return params_from_args(args, front_end)


def engine_options(backend: str, args: argparse.Namespace, concurrency: int | None = None) -> dict:
    """The loading flags as the options `backend` takes (load_engine's docstring lists them all);
    `concurrency` (serve's --max-concurrency) sets how many streams decode together."""
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731  (front ends may lack a flag)
    if backend == "llamacpp":
        options = {"n_ctx": get("context_length") or 0, "n_threads": get("threads"),
                   "n_threads_batch": get("threads_batch")}
        if concurrency:
            options["n_parallel"] = min(concurrency, 256)
        return options
    options = {"dtype": get("dtype", "auto"), "num_gpus": get("num_gpus"), "max_model_len": get("context_length")}
    if backend == "hf":
        options.update(load_in_8bit=get("load_in_8bit", False), load_in_4bit=get("load_in_4bit", False))
        if concurrency:
            options["max_batch_size"] = concurrency
    return options


def engine_from_args(args: argparse.Namespace, concurrency: int | None = None) -> Engine:
    """load_engine with add_model_args' flags (only the options the chosen backend understands)."""
    backend = pick_backend(args.model, args.backend)
    return load_engine(args.model, loras=args.lora, backend=backend, template=args.template,
                       **engine_options(backend, args, concurrency))
