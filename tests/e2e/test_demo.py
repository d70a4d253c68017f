"""The whole pipeline end to end: `zhtune demo` with 1-2 steps per stage writes every stage's files."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_every_stage(tmp_path):
    work = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "zhtune", "demo", "--workdir", str(work),
                          "--steps", "pt=2,sft=2,dpo=1"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    expected = [
        "base_tokenizer/tokenizer.json", "base_model/config.json",
        "zh_vocab/zh_sp.model", "tokenizer/merged_tokenizer_hf/tokenizer.model",
        "tokenizer/merged_tokenizer_hf/zhtune_vocab.json",
        "pt/pt_lora_model/adapter_model.safetensors", "pt/trainer_state.json", "pt/training_loss.png",
        "merged_pt/config.json", "merged_pt/run.yaml",
        "sft/sft_lora_model/adapter_config.json", "sft/all_results.json",
        "dpo/dpo_lora_model/adapter_model.safetensors", "dpo/train_results.json",
        "merged/config.json", "merged/tokenizer.model", "gguf/zhtune-demo.f16.gguf", "serve.log",
    ]
    missing = [p for p in expected if not (work / p).is_file()]
    assert not missing, missing
    # the summary table names every step with a verification figure
    for figure in ("tokens/中文字", "merge max|Δlogit|", "reward accuracy", "llama.cpp vs transformers",
                   "answers right"):
        assert figure in out.stdout
    assert "合计 total" in out.stdout
    # what a person reads: no library notices meant for library authors (zhtune/console.py), no traceback
    for noise in ("Warning", "warnings.warn", "[transformers]", "Setting accelerator", "Traceback"):
        assert noise not in out.stdout + out.stderr, noise
    # re-running into the same folder is refused (nothing overwritten silently)
    again = subprocess.run([sys.executable, "-m", "zhtune", "demo", "--workdir", str(work)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr
