"""`zhtune serve --print-vllm-command`: vLLM's own OpenAI server with zhtune's chat template.

Writes the template registry's Jinja (the exact prompt training used) to a file and returns the
command line, so GPU users can run vLLM's server directly and get the same prompts as `zhtune serve`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from zhtune.errors import ZhtuneError
from zhtune.io import atomic_write_text


def vllm_command(args, template_dir: str | Path = ".") -> str:
    """The `python -m vllm.entrypoints.openai.api_server ...` line for these `zhtune serve` args."""
    from zhtune.infer.resolve import resolve_model

    if str(args.model).lower().endswith(".gguf"):
        raise ZhtuneError("vLLM serves HF model folders here, not GGUF files", where="--model",
                          expected="a merged HF model folder (zhtune merge) or a base + --lora adapters")
    spec = resolve_model(args.model, args.lora, args.template)
    out = Path(template_dir) / f"zhtune-{spec.template.name}.chat_template.jinja"
    atomic_write_text(out, spec.template.jinja())
    # with adapters, vLLM serves the base under its name and each adapter under its own
    name = spec.base.name if spec.loras else (args.served_model_name or spec.base.name)
    lora_names = [lo.name for lo in spec.loras]
    if len(lora_names) == 1 and args.served_model_name:
        lora_names = [args.served_model_name]
    cmd = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(spec.base.resolve()),
           "--served-model-name", name, "--chat-template", str(out.resolve()),
           "--host", args.host, "--port", str(args.port)]
    if spec.tokenizer != spec.base:
        cmd += ["--tokenizer", str(spec.tokenizer.resolve())]
    if args.context_length:
        cmd += ["--max-model-len", str(args.context_length)]
    if args.max_concurrency:
        cmd += ["--max-num-seqs", str(args.max_concurrency)]
    if spec.loras:
        # vLLM applies one adapter per request (selected by model name); several stacked adapters
        # must be merged first (zhtune merge), which is what the note below says
        cmd += ["--enable-lora", "--lora-modules", *(f"{n}={lo.resolve()}" for n, lo in zip(lora_names, spec.loras))]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    note = (f"# chat template '{spec.template.name}' written to {out}\n"
            "# vLLM 需要 GPU / needs a CUDA GPU: pip install vllm\n")
    if spec.loras:
        note += ("# adapters are served as separate model names (one per request); to stack them,\n"
                 "# merge first: zhtune merge ... and serve the merged folder\n")
    return note + " ".join(shlex.quote(c) for c in cmd)
