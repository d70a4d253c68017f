"""Peak memory and time of `zhtune merge` vs peft's load + merge_and_unload, on the same random model.

    python benchmarks/merge_memory.py                 # ~1.1 GB fp32 model in 5 shards, 2 adapters
    python benchmarks/merge_memory.py --layers 8      # smaller, quicker

The base is a random LLaMA (vocab 32000) written as safetensors shards; adapter 1 ("pt") grows the
vocabulary to 40000 (full embed_tokens/lm_head in modules_to_save, LoRA on every linear layer),
adapter 2 ("sft") is LoRA on q/v/down. Each side runs in a fresh subprocess that first imports
torch, transformers and peft; its peak RSS above the floor of those imports alone is reported,
as a fraction of the model's size. Both outputs are then compared tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

FLOOR = "import time, torch, transformers, peft\n_t0 = time.perf_counter()\n"
# VmHWM: this process's own peak RSS (kB). ru_maxrss would not do: Linux carries the parent's peak
# across fork+exec into the child's ru_maxrss, and the parent here holds the model builder's memory.
REPORT = ("\nprint('SECONDS', time.perf_counter() - _t0)"
          "\nprint('MAXRSS', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n")

ZHTUNE = """
from zhtune.export.merge import merge
merge({base!r}, [{a1!r}, {a2!r}], {out!r}, max_shard_size=250_000_000, log=lambda *_: None)
"""

# Chinese-LLaMA-Alpaca's way (merge_llama_with_chinese_lora.py, in spirit): the whole model in memory
PEFT = """
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.float32)
model.resize_token_embeddings({vocab}, mean_resizing=False)
for adapter in [{a1!r}, {a2!r}]:
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained({out!r}, max_shard_size="250MB")
"""


def build(root: Path, hidden: int, layers: int, inter: int, vocab: int, new_vocab: int) -> tuple[Path, Path, Path]:
    """Random base (safetensors shards) + two adapter folders written directly in peft's format."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from zhtune import tiny
    from zhtune.export.weights import TensorSpec, write_sharded_safetensors
    from zhtune.vocab.hf import write_hf_tokenizer

    cfg = tiny.tiny_llama_config(vocab, hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                                 num_kv_heads=hidden // 64, intermediate_size=inter, max_position=2048)
    cfg.architectures = ["LlamaForCausalLM"]
    base = root / "base"
    base.mkdir()
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    lin = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
           "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
           "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{m}.weight": s for m, s in lin.items()})
        shapes.update({f"model.layers.{i}.input_layernorm.weight": (hidden,),
                       f"model.layers.{i}.post_attention_layernorm.weight": (hidden,)})
    g = torch.Generator().manual_seed(0)
    specs = [TensorSpec(n, s, torch.float32) for n, s in shapes.items()]
    write_sharded_safetensors(base, specs, lambda s: torch.randn(s.shape, generator=g) * 0.02, 250_000_000)
    cfg.save_pretrained(base)
    # tokenizers: a real SentencePiece model padded with pieces to `vocab`, then grown to `new_vocab`
    sp = tiny.train_base_sp(tiny.asset_lines("en_corpus.txt"), root / "sp0.model", vocab_size=1000)
    proto = pb.ModelProto()
    proto.ParseFromString(sp.read_bytes())
    for n, path in ((vocab, root / "sp1.model"), (new_vocab, root / "sp2.model")):
        while len(proto.pieces) < n:
            k = len(proto.pieces)
            proto.pieces.append(pb.ModelProto.SentencePiece(piece=f"▁w{k}", score=-1e4 - k))
        path.write_bytes(proto.SerializeToString())
    write_hf_tokenizer(root / "sp1.model", base)
    a1 = _adapter(root / "pt_lora_model", shapes, list(lin), layers, 8, new_vocab, hidden, root / "sp2.model", 1)
    a2 = _adapter(root / "sft_lora_model", shapes, ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"],
                  layers, 8, None, hidden, root / "sp2.model", 2)
    return base, a1, a2


def _adapter(folder: Path, shapes, modules, layers, r, new_vocab, hidden, sp, seed) -> Path:
    from safetensors.torch import save_file

    from zhtune.vocab.hf import write_hf_tokenizer

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(layers):
        for m in modules:
            out_f, in_f = shapes[f"model.layers.{i}.{m}.weight"]
            key = f"base_model.model.model.layers.{i}.{m}"
            sd[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.02
            sd[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.02
    save = None
    if new_vocab:
        save = ["embed_tokens", "lm_head"]
        sd["base_model.model.model.embed_tokens.weight"] = torch.randn(new_vocab, hidden, generator=g) * 0.02
        sd["base_model.model.lm_head.weight"] = torch.randn(new_vocab, hidden, generator=g) * 0.02
    folder.mkdir()
    save_file(sd, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
              "target_modules": sorted({m.split(".")[1] for m in modules}), "modules_to_save": save,
              "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": None}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    write_hf_tokenizer(sp, folder)
    return folder


def run(code: str) -> tuple[float, float]:
    """(peak RSS in MiB, seconds after the imports) of `code` in a fresh python."""
    proc = subprocess.run([sys.executable, "-c", FLOOR + code + REPORT], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    found = {line.split()[0]: float(line.split()[1]) for line in proc.stdout.splitlines()
             if line.startswith(("MAXRSS", "SECONDS"))}
    return found["MAXRSS"] / 1024, found["SECONDS"]


def same_tensors(a: Path, b: Path) -> float:
    from zhtune.export.weights import WeightReader

    ra, rb = WeightReader(a), WeightReader(b)
    assert sorted(ra.names()) == sorted(rb.names()), "different tensor names"
    return max(float((ra.get(n).float() - rb.get(n).float()).abs().max()) for n in ra.names())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="zhtune-merge-bench-") as tmp:
        root = Path(tmp)
        base, a1, a2 = build(root, args.hidden, args.layers, args.intermediate, 32000, 40000)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
        adapters = sum(f.stat().st_size for f in root.glob("*_lora_model/*.safetensors")) / 2**20
        shards = len(list(base.glob("*.safetensors")))
        floor = statistics.median(run("")[0] for _ in range(args.repeats))
        rows = {}
        for name, template in (("zhtune merge", ZHTUNE), ("peft merge_and_unload", PEFT)):
            runs = []
            for i in range(args.repeats):
                out = root / f"out-{name.split()[0]}-{i}"
                runs.append(run(template.format(base=str(base), a1=str(a1), a2=str(a2), out=str(out), vocab=40000)))
            rows[name] = (statistics.median(r[0] for r in runs) - floor, statistics.median(r[1] for r in runs))
        diff = same_tensors(root / "out-zhtune-0", root / "out-peft-0")
    print(f"\nbase {size:.0f} MiB fp32 in {shards} shards; adapters {adapters:.0f} MiB; "
          f"import floor {floor:.0f} MiB; median of {args.repeats}; max |Δ| between outputs {diff:.3g}")
    print("| method | peak RSS above floor (MiB) | × model size | time (s) |")
    print("| --- | --- | --- | --- |")
    for name, (mem, sec) in rows.items():
        print(f"| {name} | {mem:.0f} | {mem / size:.2f} | {sec:.1f} |")
    z, p = rows["zhtune merge"], rows["peft merge_and_unload"]
    print(f"| ratio zhtune / peft | {z[0] / p[0]:.2f} | | {z[1] / p[1]:.2f} |")


if __name__ == "__main__":
    main()
