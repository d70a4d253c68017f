#!/usr/bin/env bash
# PT -> SFT -> DPO -> merge -> an OpenAI-compatible server on vLLM.  预训练 → 精调 → 偏好 → 合并 → vLLM 服务。
# Multi-GPU: add nproc_per_node=8 (and deepspeed=examples/deepspeed/ds_zero2.json) to each train line.
set -euo pipefail
BASE=${BASE:-llama-2-7b-hf}

zhtune train examples/chinese_llama_pt_lora.yaml model_name_or_path="$BASE" \
    dataset=data/zh_corpus/ output_dir=work/pt
zhtune merge --lora work/pt/pt_lora_model --output work/pt-merged
zhtune train examples/chinese_alpaca_sft_lora.yaml model_name_or_path=work/pt-merged \
    dataset=data/alpaca_zh.json template=llama2-zh output_dir=work/sft
zhtune train examples/dpo_lora_7b.yaml model_name_or_path=work/pt-merged \
    peft_path=work/sft/sft_lora_model dataset=data/prefs.jsonl template=llama2-zh output_dir=work/dpo
zhtune merge --lora work/dpo/dpo_lora_model --output work/final --dtype bfloat16 --verify
zhtune serve --model work/final --backend vllm --port 8000        # vLLM's engine, our template
# or vLLM's own server with our chat template:
zhtune serve --model work/final --print-vllm-command
