"""Parity checks for exported models: logits of the output vs its source (used by merge/export --verify).

- verify_merge: the merged folder vs base + adapters applied through peft (fp32 on CPU);
- verify_gguf: llama.cpp's token ids and logits of a .gguf vs transformers on the HF folder.
Both run a few Chinese and English prompts and print one row per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zhtune.errors import ZhtuneError

PROMPTS = [
    "人工智能正在改变我们的生活方式。",
    "请用三句话介绍一下长城的历史。",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # 中英混合 mixed",
]


@dataclass
class Parity:
    max_abs_diff: float      # over every position and vocabulary entry
    top1_agreement: float    # fraction of positions whose argmax token agrees
    max_abs_logit: float     # scale of the reference logits, to judge the diff
    ids_equal: bool = True   # tokenizers agree on every prompt

    def line(self) -> str:
        return (f"max |Δlogit| {self.max_abs_diff:.3g} (logits up to {self.max_abs_logit:.3g}), "
                f"top-1 agreement {self.top1_agreement:.1%}, token ids {'equal' if self.ids_equal else 'DIFFER'}")


def compare(ref_rows, out_rows, tie: float = 0.0) -> Parity:
    """ref/out: lists of [positions, vocab] float arrays (numpy or torch), one per prompt. A position agrees
    on the top token when the output scores the reference's top token within `tie` of its own best: new
    Chinese rows that start alike (the same first-piece row) leave near-ties that rounding may flip."""
    import numpy as np

    diff, agree, total, scale = 0.0, 0, 0, 0.0
    for r, o in zip(ref_rows, out_rows):
        r, o = np.asarray(r, dtype=np.float64), np.asarray(o, dtype=np.float64)
        diff = max(diff, float(np.abs(r - o).max()))
        scale = max(scale, float(np.abs(r).max()))
        top = np.take_along_axis(o, r.argmax(-1)[:, None], -1)[:, 0]
        agree += int((top >= o.max(-1) - tie).sum())
        total += r.shape[0]
    return Parity(diff, agree / max(total, 1), scale)


def hf_logits(model, ids_list: list[list[int]]):
    """[positions, vocab] fp32 logits of each id list, one forward per prompt."""
    import torch

    rows = []
    with torch.no_grad():
        for ids in ids_list:
            rows.append(model(torch.tensor([ids])).logits[0].float().numpy())
    return rows


def peft_reference(base: Path, adapter_dirs: list[Path]):
    """base + adapters through peft, as training would see them: resize the vocabulary when an adapter
    carries a bigger one, load it, and merge_and_unload every adapter but the last."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zhtune.export.adapters import load_adapter

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    for i, d in enumerate(adapter_dirs):
        rows = load_adapter(d).vocab_rows(model.get_input_embeddings().weight.shape[0])
        if rows and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows, mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(d))
        if i < len(adapter_dirs) - 1:
            model = model.merge_and_unload()
    return model.eval()


def verify_merge(base: Path, adapter_dirs: list[Path], merged: Path, log=print) -> Parity:
    """Logits of `merged` vs base + adapters through peft; raises ZhtuneError if they disagree."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged))
    ids = [tok(p).input_ids for p in PROMPTS]
    ref = hf_logits(peft_reference(base, adapter_dirs), ids)
    out = hf_logits(AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval(), ids)
    result = compare(ref, out)
    dtype = json.loads((merged / "config.json").read_text(encoding="utf-8")).get("dtype", "float32")
    log(f"校验 verify (merged {dtype} vs base+LoRA through peft, {len(PROMPTS)} zh/en prompts): {result.line()}")
    # fp32 must agree to rounding; half precision outputs are judged by their argmax
    ok = (result.max_abs_diff <= 1e-4 * max(1.0, result.max_abs_logit / 10)) if dtype == "float32" \
        else result.top1_agreement >= 0.9
    if not ok:
        raise ZhtuneError(f"merged model does not match base + adapters: {result.line()}", where=str(merged),
                          expected="max |Δlogit| <= 1e-4 (float32) or >= 90% top-1 agreement (half precision)")
    return result


def llama_cpp_logits(gguf: Path, texts: list[str], n_threads: int = 2):
    """(token ids, [positions, vocab] logits) per text from llama.cpp through llama-cpp-python."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, logits_all=True, verbose=False, n_threads=n_threads,
                n_batch=512, seed=0)
    ids, rows = [], []
    for text in texts:
        toks = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        llm.reset()
        llm.eval(toks)
        ids.append(list(toks))
        rows.append(np.array(llm.scores[: len(toks)], dtype=np.float32))
    del llm
    return ids, rows


# llama.cpp vs transformers fp32, max |Δlogit| as a share of the largest logit, per GGUF type: f32 differs by
# summation order only, f16 by rounding every weight to 11 bits, bf16 to 8. Measured on the tiny fixtures of
# every architecture: f32 ~0.003%, f16 ~0.03%, bf16 ~0.2-0.4% (and near-ties flip: top-1 98.7%); a missing
# rope_freqs (LLaMA-3.1 scaling) gives 1.6%, q/k rows left unpermuted 3%. (share, top-1 agreement)
LOGIT_TOLERANCE = {"f32": (0.002, 0.99), "f16": (0.005, 0.99), "bf16": (0.01, 0.95)}


def verify_gguf(gguf: Path, model_dir: Path, quantised: bool, log=print, name: str | None = None,
                out_type: str = "f16") -> Parity:
    """llama.cpp on the .gguf vs transformers on the HF folder: token ids and next-token logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    hf_ids = [tok(p).input_ids for p in PROMPTS]
    cpp_ids, cpp_rows = llama_cpp_logits(gguf, PROMPTS)
    if hf_ids != cpp_ids:
        bad = next(i for i, (a, b) in enumerate(zip(hf_ids, cpp_ids)) if a != b)
        raise ZhtuneError(f"llama.cpp tokenizes differently from transformers: {PROMPTS[bad]!r}",
                          where=str(gguf), expected=f"{hf_ids[bad]}", hint=f"llama.cpp gave {cpp_ids[bad]}")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ref = hf_logits(model, hf_ids)
    share, top1 = LOGIT_TOLERANCE.get(out_type, LOGIT_TOLERANCE["bf16"])
    scale = max(1.0, max(float(abs(r).max()) for r in ref))
    # top-1 agreement up to ties within twice the allowed |Δlogit| (quantised: the exact argmax)
    result = compare(ref, cpp_rows, tie=0.0 if quantised else 2 * share * scale)
    log(f"校验 verify (llama.cpp {name or gguf.name} vs transformers fp32, {len(PROMPTS)} zh/en prompts): "
        f"{result.line()}")
    ok = result.top1_agreement >= (0.75 if quantised else top1) and \
        (quantised or result.max_abs_diff <= share * max(1.0, result.max_abs_logit))
    if not ok:
        raise ZhtuneError(f"GGUF logits do not match transformers: {result.line()}", where=str(gguf),
                          expected=f"{out_type}: max |Δlogit| <= {share:.1%} of the logit scale and >= {top1:.0%} "
                                   "top-1 agreement" if not quantised else "quantised: >= 75% top-1 agreement")
    return result
