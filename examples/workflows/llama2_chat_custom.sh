#!/usr/bin/env bash
# Llama-2-chat fine-tuning on your own multi-turn data (sharegpt or OpenAI messages) with the
# Chinese-Alpaca-2 prompt, then chat with the adapter unmerged.  用自己的多轮数据微调 Llama-2-chat。
set -euo pipefail
BASE=${BASE:-llama-2-7b-chat-hf}
DATA=${DATA:-data/my_conversations.jsonl}   # {"conversations": [{"from": "human", "value": ...}, ...]}

zhtune train examples/multiturn_sft.yaml model_name_or_path="$BASE" dataset="$DATA" \
    template=llama2-zh output_dir=work/llama2-chat
zhtune chat --model "$BASE" --lora work/llama2-chat/sft_lora_model --system "你是一个乐于助人的助手。"
zhtune merge --lora work/llama2-chat/sft_lora_model --output work/llama2-chat-merged --verify
zhtune serve --model work/llama2-chat-merged --port 8000
