"""`zhtune export gguf`: an HF LLaMA folder -> one .gguf for llama.cpp / Ollama, quantised by llama.cpp.

    zhtune export gguf --model merged/ --output chinese-7b.q4_k_m.gguf --quant q4_k_m --verify

The conversion is written with the `gguf` package (gguf-py: GGUFWriter, tensor-name map, special
vocab), tensor by tensor, so it needs nothing outside the installed packages (llama.cpp's own
convert_hf_to_gguf.py ships only inside the llama-cpp-python sdist, not in its installed wheel).
The vocabulary is read from tokenizer.model (pieces, scores and types exactly as sentencepiece
has them) plus the tokenizer's added tokens, so llama.cpp tokenizes the merged Chinese vocabulary
like transformers does. Quantised types go through llama.cpp's own quantizer
(llama_cpp.llama_model_quantize) from an f32 intermediate. Beside the .gguf goes an Ollama
Modelfile with the training template.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from zhtune.errors import ZhtuneError

DIRECT = ("f32", "f16", "bf16")  # written by us; everything else by llama.cpp's quantizer
QUANTS = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1",
          "q3_k_m", "q3_k_s", "q3_k_l", "q2_k", "iq4_nl", "iq4_xs")
# k-quants pack 256 weights per block: rows narrower than that fall back to these (llama.cpp's choice)
K_QUANTS = {"q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_xs"}


def _check_model_dir(model_dir: Path) -> dict:
    if not (model_dir / "config.json").is_file():
        raise ZhtuneError(f"no config.json in {model_dir}", where="--model", expected="an HF model folder (zhtune merge output)")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise ZhtuneError(f"model_type {config.get('model_type')!r} is not supported", where=str(model_dir / "config.json"),
                          expected="a LLaMA-family model (model_type llama)")
    if not (model_dir / "tokenizer.model").is_file():
        raise ZhtuneError(f"tokenizer.model missing in {model_dir}", where=str(model_dir),
                          expected="the SentencePiece tokenizer.model beside config.json",
                          hint="without it llama.cpp would tokenize Chinese differently; copy it from the "
                               "tokenizer folder (zhtune merge copies it for you)")
    return config


def _vocab(model_dir: Path, n_vocab: int):
    """(tokens, scores, types) for tokenizer.ggml.*: sentencepiece pieces, then added tokens, then padding."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer

    proto = pb.ModelProto()
    proto.ParseFromString((model_dir / "tokenizer.model").read_bytes())
    # ModelProto.SentencePiece.Type numbers equal gguf.TokenType's (NORMAL=1 ... BYTE=6)
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(p.type) or int(gguf.TokenType.NORMAL) for p in proto.pieces]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    extra = sorted((i, t) for t, i in tok.get_vocab().items() if i >= len(tokens))
    special = set(tok.all_special_tokens)
    for i, text in extra:
        if i != len(tokens):
            raise ZhtuneError(f"added token {text!r} has id {i}, expected {len(tokens)}", where=str(model_dir),
                              expected="added tokens numbered right after the sentencepiece pieces")
        tokens.append(text.encode("utf-8"))
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.CONTROL if text in special else gguf.TokenType.USER_DEFINED))
    if len(tokens) > n_vocab:
        raise ZhtuneError(f"tokenizer has {len(tokens)} tokens but the model only {n_vocab} rows",
                          where=str(model_dir), expected="config vocab_size >= len(tokenizer)")
    for i in range(len(tokens), n_vocab):  # embedding rows padded past the tokenizer
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return tokens, scores, types


def _add_metadata(writer, config: dict, model_dir: Path, file_type: int) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise ZhtuneError(f"rope_type {rope.get('rope_type')!r} is not supported by this exporter",
                          where=str(model_dir / "config.json"), expected="rope_type default")
    writer.add_name(model_dir.name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    tokens, scores, types = _vocab(model_dir, config["vocab_size"])
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _tensor_plan(model_dir: Path, config: dict, out_type: str):
    """[(gguf name, hf name, ggml type)]: 2-D weights in out_type, norms (1-D) in f32 as llama.cpp expects."""
    import gguf

    from zhtune.export.merge import WeightReader

    reader = WeightReader(model_dir)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    plan = []
    for hf in reader.names():
        if hf.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ZhtuneError(f"tensor {hf!r} has no GGUF name", where=str(model_dir), expected="a LLaMA tensor")
        qtype = out_type if len(reader.shape(hf)) == 2 else "f32"
        plan.append((name, hf, qtype))
    return reader, plan


def write_gguf(model_dir: Path, out_file: Path, out_type: str = "f16") -> Path:
    """Write model_dir as an unquantised GGUF (f32 | f16 | bf16), one tensor in memory at a time."""
    import gguf
    import numpy as np
    import torch

    from zhtune.export.meta import to_meta_qk

    config = _check_model_dir(model_dir)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[out_type]
    writer = gguf.GGUFWriter(str(out_file), "llama")
    _add_metadata(writer, config, model_dir, int(file_type))
    reader, plan = _tensor_plan(model_dir, config, out_type)
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    raw = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
           "bf16": gguf.GGMLQuantizationType.BF16}

    def array(hf: str, qtype: str):
        t = reader.get(hf).float()
        if hf.endswith("self_attn.q_proj.weight"):
            t = to_meta_qk(t, heads)  # GGUF rotates interleaved pairs, as Meta's checkpoints do
        elif hf.endswith("self_attn.k_proj.weight"):
            t = to_meta_qk(t, kv)
        if qtype == "bf16":
            return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return t.numpy().astype(np.float16 if qtype == "f16" else np.float32)

    for name, hf, qtype in plan:
        shape = reader.shape(hf)
        itemsize = 4 if qtype == "f32" else 2
        writer.add_tensor_info(name, shape, np.dtype(np.uint16 if qtype == "bf16" else np.float16 if qtype == "f16"
                                                     else np.float32), int(np.prod(shape)) * itemsize, raw_dtype=raw[qtype])
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


def _template_name(model_dir: Path) -> str | None:
    from zhtune.io import read_run_yaml

    return ((read_run_yaml(model_dir).get("config") or {}).get("template"))


def export_gguf(model_dir: str | Path, output_file: str | Path, quant: str = "f16", verify: bool = False,
                overwrite: bool = False, modelfile: bool = True, log=print) -> Path:
    """Convert an HF LLaMA folder to `output_file` (.gguf) with `quant`; optionally verify; write a Modelfile."""
    model_dir, out = Path(model_dir), Path(output_file)
    quant = quant.lower()
    if quant not in DIRECT + QUANTS:
        raise ZhtuneError(f"unknown quantisation {quant!r}", where="--quant", expected=", ".join(DIRECT + QUANTS))
    if out.exists() and not overwrite:
        raise ZhtuneError(f"output file exists: {out}", where="--output", expected="a new file path",
                          hint="choose another path or pass --overwrite")
    if out.suffix != ".gguf":
        raise ZhtuneError(f"output must end in .gguf: {out}", where="--output", expected="FILE.gguf")
    config = _check_model_dir(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
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

            verify_gguf(tmp, model_dir, quantised=quant not in DIRECT, log=log, name=out.name)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if modelfile:
        write_modelfile(out, model_dir)
    log(f"已导出 exported {out} in {time.time() - t0:.1f}s")
    return out


# ---- Ollama ------------------------------------------------------------------------------------
def ollama_template(template) -> str:
    """The training template as an Ollama (Go text/template) TEMPLATE over .System and .Messages."""
    def lit(fmt: str, content: str = "", system: str = "") -> str:
        # the model's tokenizer adds BOS itself; later {bos} (llama2 turns) stay literal tokens
        out = fmt.replace("{eos}", "</s>").replace("{bos}", "<s>")
        return out.replace("{content}", content).replace("{system}", system)

    sys_var, content = "{{ $.System }}", "{{ .Content }}"
    prefix = template.prefix.replace("{bos}", "")
    if template.first_user is not None:
        first = ("{{ if $.System }}" + lit(template.first_user, content, sys_var) + "{{ else }}"
                 + lit(template.user, content) + "{{ end }}")
    else:
        first = "{{ if $.System }}" + lit(template.system, system=sys_var) + "{{ end }}" + lit(template.user, content)
    return (
        prefix + "{{- $first := true }}{{- range .Messages }}"
        '{{- if eq .Role "user" }}{{ if $first }}' + first + "{{ $first = false }}{{ else }}"
        + lit(template.separator) + lit(template.turn_prefix) + lit(template.user, content) + "{{ end }}"
        '{{- else if eq .Role "assistant" }}' + lit(template.assistant, content) + "{{ end }}{{- end }}"
    )


def write_modelfile(gguf_file: Path, model_dir: Path) -> Path:
    """Modelfile beside the .gguf: FROM, TEMPLATE (training template), SYSTEM, stop strings, PARAMETERs."""
    from zhtune.data.templates import get_template
    from zhtune.infer.engine import GenParams
    from zhtune.io import atomic_write_text

    name = _template_name(model_dir) or "default"
    template = get_template(name)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    g = GenParams()
    lines = [f"# Ollama Modelfile written by zhtune (template: {name})",
             f"# ollama create {gguf_file.stem.split('.')[0]} -f {gguf_file.name}.Modelfile",
             f"FROM ./{gguf_file.name}", f"TEMPLATE {json.dumps(ollama_template(template), ensure_ascii=False)}"]
    if template.default_system:
        lines.append(f"SYSTEM {json.dumps(template.default_system, ensure_ascii=False)}")
    for stop in ("</s>",) + tuple(template.stop):
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
    parser.add_argument("--quant", default="f16", type=str.lower, help="f32 | f16 | bf16 | q8_0 | q4_k_m | q5_k_m | ...")
    parser.add_argument("--verify", action="store_true", help="load with llama.cpp and compare with transformers")
    parser.add_argument("--no-modelfile", action="store_true", help="do not write the Ollama Modelfile")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    export_gguf(args.model, args.output, args.quant, args.verify, args.overwrite, not args.no_modelfile)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
