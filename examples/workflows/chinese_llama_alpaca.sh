#!/usr/bin/env bash
# Chinese-LLaMA-Alpaca, end to end: vocab -> PT -> merge -> SFT -> merge -> chat / webui / LangChain / llama.cpp
# 中文 LLaMA/Alpaca 全流程。Run from the repository root; LLAMA points at an HF LLaMA(-2) folder with
# tokenizer.model (`zhtune convert meta --input META/7B --output llama-7b-hf` makes one from Meta's files).
set -euo pipefail
LLAMA=${LLAMA:-llama-2-7b-hf}
ZH=${ZH:-data/zh_corpus/}          # plain Chinese text: a document per line (.txt) or {"text": ...} jsonl
SFT=${SFT:-data/alpaca_zh.json}    # alpaca records: instruction / input / output

zhtune vocab train --corpus "$ZH" --vocab-size 20000 --output work/vocab
zhtune vocab merge --base "$LLAMA" --add work/vocab/zh_sp.model --output work/tokenizer
zhtune vocab stats --tokenizer "$LLAMA" --tokenizer work/tokenizer/merged_tokenizer_hf --text "$ZH"
zhtune estimate examples/chinese_llama_pt_lora.yaml model_name_or_path="$LLAMA" --gpu-memory 24
zhtune train examples/chinese_llama_pt_lora.yaml model_name_or_path="$LLAMA" \
    tokenizer_name_or_path=work/tokenizer/merged_tokenizer_hf dataset="$ZH" output_dir=work/pt
zhtune merge --lora work/pt/pt_lora_model --output work/chinese-llama --verify
zhtune train examples/chinese_alpaca_sft_lora.yaml model_name_or_path=work/chinese-llama \
    dataset="$SFT" output_dir=work/sft
zhtune merge --lora work/sft/sft_lora_model --output work/chinese-alpaca --verify
zhtune chat --model work/chinese-alpaca                         # terminal
# zhtune webui --model work/chinese-alpaca                      # browser
zhtune rag qa --docs src/zhtune/assets/rag_docs --question "云溪镇的望云桥建于哪一年？" --model work/chinese-alpaca
zhtune rag summarize --docs src/zhtune/assets/rag_docs/yunxi_town.md --chain map_reduce --model work/chinese-alpaca
zhtune export gguf --model work/chinese-alpaca --output work/chinese-alpaca.q4_k_m.gguf --quant q4_k_m --verify
zhtune chat --model work/chinese-alpaca.q4_k_m.gguf             # llama.cpp on CPU
