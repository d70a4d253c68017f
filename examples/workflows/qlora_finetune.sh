#!/usr/bin/env bash
# QLoRA fine-tuning on one 24 GB card -> merge -> chat / webui.  单卡 24G QLoRA 微调。
# Needs a CUDA GPU (bitsandbytes 4-bit); on CPU use examples/tiny/qlora.yaml instead.
set -euo pipefail
BASE=${BASE:-llama-2-7b-hf}
DATA=${DATA:-data/alpaca_zh.json}

zhtune estimate examples/qlora_sft_24gb.yaml model_name_or_path="$BASE" --gpu-memory 24
zhtune train examples/qlora_sft_24gb.yaml model_name_or_path="$BASE" dataset="$DATA" output_dir=work/qlora
zhtune merge --lora work/qlora/sft_lora_model --output work/qlora-merged --dtype float16 --verify
zhtune chat --model work/qlora-merged
zhtune webui --model work/qlora-merged --port 7860
