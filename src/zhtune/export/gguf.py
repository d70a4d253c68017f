"""`zhtune export gguf`: an HF LLaMA folder -> one .gguf for llama.cpp / Ollama, quantised by llama.cpp.

    zhtune export gguf --model merged/ --output chinese-7b.q4_k_m.gguf --quant q4_k_m --verify

The conversion is written with the `gguf` package (gguf-py: GGUFWriter, tensor-name map, special
vocab), tensor by tensor, so it needs nothing outside the installed packages (llama.cpp's own
convert_hf_to_gguf.py ships only inside the llama-cpp-python sdist, not in its installed wheel).
The vocabulary (export/gguf_vocab.py) is read from tokenizer.model or a byte-level tokenizer.json
plus the tokenizer's added tokens, so llama.cpp tokenizes the merged Chinese vocabulary like
transformers does. Quantised types go through llama.cpp's own quantizer
(llama_cpp.llama_model_quantize) from an f32 intermediate. Beside the .gguf goes an Ollama
Modelfile with the training template.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from zhtune.args import zhtune_command
from zhtune.errors import ZhtuneError
from zhtune.export.gguf_vocab import add_vocab, tokenizer_of
from zhtune.io import check_output_file, current_umask, output_lock

MODELFILE_HEADER = "# Ollama Modelfile written by zhtune"
DIRECT = ("f32", "f16", "bf16")  # written by us; everything else by llama.cpp's quantizer
QUANTS = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1",
          "q3_k_m", "q3_k_s", "q3_k_l", "q2_k", "iq4_nl", "iq4_xs")
# k-quants pack 256 weights per block: rows narrower than that fall back to these (llama.cpp's choice)
K_QUANTS = {"q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_xs"}
# model_type -> llama.cpp architecture (gguf.MODEL_ARCH name). llama.cpp runs Mistral as llama; llama rotates
# interleaved pairs (Meta's q/k layout: rows permuted, as convert meta does), qwen2/qwen3 rotate halves (as HF).
ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3"}
PERMUTED_QK = {"LLAMA"}
ROPE_TYPES = ("default", "llama3", "linear", "yarn")


def _read_config(model_dir: Path) -> dict:
    from zhtune.vocab.bytelevel import read_json

    if not (model_dir / "config.json").is_file():
        raise ZhtuneError(f"no config.json in {model_dir}", where="--model",
                          expected="an HF model folder (zhtune merge output)")
    return read_json(model_dir / "config.json", "config.json")


def _check_model_dir(model_dir: Path) -> dict:
    """config.json of a model folder llama.cpp can run; refuses other architectures and rope types by name."""
    from zhtune.model.load import check_architecture, check_weights_match_config

    config = _read_config(model_dir)
    where = str(model_dir / "config.json")
    check_architecture(config, where)  # ARCHS covers every supported model_type
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise ZhtuneError(f"rope_type {rope.get('rope_type')!r} is not supported by this exporter", where=where,
                          expected=f"rope_type one of: {', '.join(ROPE_TYPES)}")
    tokenizer_of(model_dir)
    check_weights_match_config(model_dir)
    return config


def _rope(config: dict) -> dict:
    """transformers 5's rope_parameters, or the older rope_theta + rope_scaling keys."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    return rope


def rope_factors(config: dict):
    """LLaMA-3.1's rope scaling as llama.cpp wants it: the divisor of every rotary frequency (rope_freqs),
    read off transformers' own llama3 inverse frequencies."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    skip = ("architectures", "transformers_version")
    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in skip})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta = _rope(config)["rope_theta"]
    plain = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return (plain / scaled.float()).float()


def _add_metadata(writer, config: dict, model_dir: Path, file_type: int) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = _rope(config)
    writer.add_name(model_dir.name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    if config.get("head_dim") and head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    kind = rope.get("rope_type", "default")
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        if kind == "yarn":
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    add_vocab(writer, model_dir, config["vocab_size"])


def _tensor_plan(model_dir: Path, config: dict, out_type: str):
    """[(gguf name, hf name, ggml type)]: 2-D weights in out_type, norms and biases (1-D) in f32 as llama.cpp
    expects. A tied head has no output.weight: llama.cpp then reads the token embeddings."""
    import gguf

    from zhtune.export.weights import WeightReader

    reader = WeightReader(model_dir)
    arch = getattr(gguf.MODEL_ARCH, ARCHS[config["model_type"]])
    names = gguf.TensorNameMap(arch, config["num_hidden_layers"])
    plan = []
    for hf in reader.names():
        if hf.endswith("rotary_emb.inv_freq"):
            continue
        if hf == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # transformers ignores a stored head when tied; so does llama.cpp
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ZhtuneError(f"tensor {hf!r} has no GGUF name for {config['model_type']}", where=str(model_dir),
                              expected=f"a {config['model_type']} tensor")
        qtype = out_type if len(reader.shape(hf)) == 2 else "f32"
        plan.append((name, hf, qtype))
    if _rope(config).get("rope_type") == "llama3":
        plan.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None, "f32"))
    return reader, plan


def write_gguf(model_dir: Path, out_file: Path, out_type: str = "f16") -> Path:
    """Write model_dir as an unquantised GGUF (f32 | f16 | bf16), one tensor in memory at a time."""
    import gguf
    import numpy as np
    import torch

    from zhtune.export.meta import to_meta_qk

    config = _check_model_dir(model_dir)
    arch_name = ARCHS[config["model_type"]]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[out_type]
    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch_name)])
    _add_metadata(writer, config, model_dir, int(file_type))
    reader, plan = _tensor_plan(model_dir, config, out_type)
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    raw = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
           "bf16": gguf.GGMLQuantizationType.BF16}

    def tensor(hf: str | None):
        if hf is None:
            return rope_factors(config)
        t = reader.get(hf).float()
        if arch_name in PERMUTED_QK:  # GGUF's llama rotates interleaved pairs, as Meta's checkpoints do
            if hf.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                t = to_meta_qk(t, heads)
            elif hf.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                t = to_meta_qk(t, kv)
        return t

    def array(hf: str | None, qtype: str):
        t = tensor(hf)
        if qtype == "bf16":
            return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return t.numpy().astype(np.float16 if qtype == "f16" else np.float32)

    for name, hf, qtype in plan:
        shape = reader.shape(hf) if hf is not None else (len(rope_factors(config)),)
        itemsize = 4 if qtype == "f32" else 2
        dtype = np.dtype(np.uint16 if qtype == "bf16" else np.float16 if qtype == "f16" else np.float32)
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * itemsize, raw_dtype=raw[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, hf, qtype in plan:
        writer.write_tensor_data(array(hf, qtype))
    writer.close()
    return out_file


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None) -> None:
    """llama.cpp's quantizer (llama_model_quantize) from an f32/f16 GGUF."""
    import ctypes

    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}", None)
    if ftype is None:
        raise ZhtuneError(f"this llama.cpp has no {quant} quantisation", where="--quant", expected=", ".join(QUANTS))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or min(os.cpu_count() or 1, 8)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ZhtuneError(f"llama.cpp failed to quantise to {quant} (code {rc})", where=str(src),
                          expected="a GGUF llama.cpp can load")


def tensor_types(gguf_file: Path) -> dict[str, int]:
    """{ggml type name: number of tensors} of a GGUF file, read back with gguf-py."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(gguf_file)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def export_gguf(model_dir: str | Path, output_file: str | Path, quant: str = "f16", verify: bool = False,
                overwrite: bool = False, modelfile: bool = True, log=print) -> Path:
    """Convert an HF LLaMA folder to `output_file` (.gguf) with `quant`; optionally verify; write a Modelfile."""
    model_dir, out = Path(model_dir), Path(output_file)
    quant = quant.lower()
    if quant not in DIRECT + QUANTS:
        raise ZhtuneError(f"unknown quantisation {quant!r}", where="--quant", expected=", ".join(DIRECT + QUANTS))
    if out.suffix != ".gguf":
        raise ZhtuneError(f"output must end in .gguf: {out}", where="--output", expected="FILE.gguf")
    with output_lock(out, log=log):  # a second export to the same file is refused by name; stale temps go
        check_output_file(out, overwrite, b"GGUF", "GGUF file")  # before the work; --overwrite: only a GGUF
        if modelfile:  # the Modelfile beside it: the same rule
            check_output_file(Path(f"{out}.Modelfile"), overwrite, MODELFILE_HEADER.encode(), "Modelfile")
        return _export(model_dir, out, quant, verify, modelfile, log)


def _export(model_dir: Path, out: Path, quant: str, verify: bool, modelfile: bool, log) -> Path:
    config = _check_model_dir(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.fchmod(fd, 0o666 & ~current_umask())  # not mkstemp's 0600: the file is for everyone who may read the folder
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if quant in DIRECT:
            write_gguf(model_dir, tmp, quant)
        else:
            f32 = tmp.with_suffix(".f32.tmp")
            try:
                write_gguf(model_dir, f32, "f32")
                quantize(f32, tmp, quant)
            finally:
                f32.unlink(missing_ok=True)
        counts = tensor_types(tmp)
        log(f"GGUF {quant}: {sum(counts.values())} tensors {counts}, {tmp.stat().st_size / 1e6:.1f} MB")
        fallback = {k: v for k, v in counts.items() if not (k.endswith("_K") or k in ("F32", "IQ4_XS"))}
        if quant in K_QUANTS and fallback:
            log(f"  注意 note: {sum(fallback.values())} tensors are narrower than a 256-weight k-quant block "
                f"(hidden {config['hidden_size']}); llama.cpp stored them as {fallback} instead")
        if verify:
            from zhtune.export.parity import verify_gguf

            verify_gguf(tmp, model_dir, quantised=quant not in DIRECT, log=log, name=out.name, out_type=quant)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if modelfile:
        write_modelfile(out, model_dir)
    hint = zhtune_command("chat", "--model", out) + (f"   ·   {ollama_create_line(out)}" if modelfile else "")
    log(f"已导出 exported {out} in {time.time() - t0:.1f}s\n下一步 next: {hint}")
    return out


# ---- Ollama ------------------------------------------------------------------------------------
def ollama_template(template, bos: str = "<s>", eos: str = "</s>") -> str:
    """The training template as an Ollama (Go text/template) TEMPLATE over .System and .Messages."""
    def lit(fmt: str, content: str = "", system: str = "") -> str:
        # the model's tokenizer adds BOS itself; later {bos} (llama2 turns) stay literal tokens
        out = fmt.replace("{eos}", eos).replace("{bos}", bos)
        return out.replace("{content}", content).replace("{system}", system)

    sys_var, content = "{{ $.System }}", "{{ .Content }}"
    prefix = template.prefix.replace("{bos}", "")
    if bos and prefix.startswith(bos):  # llama3's literal <|begin_of_text|>: llama.cpp adds BOS itself
        prefix = prefix[len(bos):]
    if template.first_user is not None:
        first = ("{{ if $.System }}" + lit(template.first_user, content, sys_var) + "{{ else }}"
                 + lit(template.user, content) + "{{ end }}")
    elif template.system_always:  # LLaMA-3.1: the system block (knowledge date) even without a system prompt
        first = lit(template.system, system=sys_var) + lit(template.user, content)
    else:
        first = "{{ if $.System }}" + lit(template.system, system=sys_var) + "{{ end }}" + lit(template.user, content)
    return (
        prefix + "{{- $first := true }}{{- range .Messages }}"
        '{{- if eq .Role "user" }}{{ if $first }}' + first + "{{ $first = false }}{{ else }}"
        + lit(template.separator) + lit(template.turn_prefix) + lit(template.user, content) + "{{ end }}"
        '{{- else if eq .Role "assistant" }}' + lit(template.assistant, content) + "{{ end }}{{- end }}"
    )


def _special_tokens(model_dir: Path) -> tuple[str, str]:
    """(bos, eos) text of the model's tokenizer (tokenizer_config.json), LLaMA's <s> </s> by default."""
    from zhtune.vocab.bytelevel import read_json

    cfg = read_json(model_dir / "tokenizer_config.json") if (model_dir / "tokenizer_config.json").is_file() else {}

    def text(value, default: str) -> str:
        if isinstance(value, dict):  # the older AddedToken form
            value = value.get("content")
        return value if isinstance(value, str) and value else default

    return text(cfg.get("bos_token"), "<s>" if "bos_token" not in cfg else ""), text(cfg.get("eos_token"), "</s>")


def ollama_create_line(gguf_file: Path) -> str:
    """The `ollama create` command for the Modelfile beside `gguf_file`, quoted for the shell."""
    return shlex.join(["ollama", "create", gguf_file.stem.split(".")[0] or "model", "-f", f"{gguf_file}.Modelfile"])


def write_modelfile(gguf_file: Path, model_dir: Path) -> Path:
    """Modelfile beside the .gguf: FROM, TEMPLATE (training template), SYSTEM, stop strings, PARAMETERs."""
    from zhtune.data.templates import template_for_model
    from zhtune.infer.engine import GenParams
    from zhtune.io import atomic_write_text, read_json

    template, source = template_for_model(model_dir)
    bos, eos = _special_tokens(model_dir)
    config = read_json(model_dir / "config.json", "config.json")
    g = GenParams()
    here = f"./{gguf_file.name}"
    lines = [f"{MODELFILE_HEADER} (template: {template.name}, from {source})",
             f"# {ollama_create_line(gguf_file)}",
             f"FROM {json.dumps(here, ensure_ascii=False) if any(c.isspace() for c in here) else here}",
             f"TEMPLATE {json.dumps(ollama_template(template, bos, eos), ensure_ascii=False)}"]
    if template.default_system:
        lines.append(f"SYSTEM {json.dumps(template.default_system, ensure_ascii=False)}")
    for stop in dict.fromkeys((eos,) + tuple(template.stop)):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    lines += [f"PARAMETER temperature {g.temperature}", f"PARAMETER top_p {g.top_p}", f"PARAMETER top_k {g.top_k}",
              f"PARAMETER repeat_penalty {g.repetition_penalty}",
              f"PARAMETER num_ctx {min(int(config.get('max_position_embeddings', 2048)), 4096)}"]
    return atomic_write_text(gguf_file.with_name(gguf_file.name + ".Modelfile"), "\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    from zhtune.args import existing_path, make_parser

    parser = make_parser(
        "export gguf",
        """
        把 HF 模型 (zhtune merge 的输出) 导出为 GGUF，可用 llama.cpp 量化；同时写出 Ollama Modelfile。
        Export an HF LLaMA folder (e.g. `zhtune merge` output) to GGUF for llama.cpp / Ollama; quantise
        with llama.cpp's own quantizer; --verify compares token ids and logits with transformers.
        """,
        f"""
        zhtune export gguf --model merged/ --output chinese.f16.gguf
        zhtune export gguf --model merged/ --output chinese.q4_k_m.gguf --quant q4_k_m --verify
        (quant: {', '.join(DIRECT + QUANTS)})
        """,
    )
    parser.add_argument("--model", required=True, type=existing_path, help="HF model folder with tokenizer.model")
    parser.add_argument("--output", required=True, help="the .gguf file to write")
    parser.add_argument("--quant", default="f16", type=str.lower,
                        help="f32 | f16 | bf16 | q8_0 | q4_k_m | q5_k_m | ...")
    parser.add_argument("--verify", action="store_true", help="load with llama.cpp and compare with transformers")
    parser.add_argument("--no-modelfile", action="store_true", help="do not write the Ollama Modelfile")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a GGUF file (and Modelfile) an earlier export wrote")
    args = parser.parse_args(argv)
    export_gguf(args.model, args.output, args.quant, args.verify, args.overwrite, not args.no_modelfile)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
