"""`zhtune train CONFIG.yaml [key=value ...]`: read the config and hand it to the stage's file.

    zhtune train examples/tiny/sft.yaml max_steps=5
    zhtune train stage=pt model_name_or_path=tiny/base dataset=src/zhtune/assets/zh_corpus.txt output_dir=out/pt
"""

from __future__ import annotations

import importlib
import os

from zhtune.args import make_parser
from zhtune.config import TRAIN_ALIASES, TrainConfig, config_help, load_config

# stage -> "module:function(cfg)"; a new stage is one line here and one file in train/
STAGES: dict[str, str] = {
    "pt": "zhtune.train.pt:run",
    "sft": "zhtune.train.sft:run",
    "dpo": "zhtune.train.dpo:run",
}

DESCRIPTION = """
继续预训练 (pt) / 指令精调 (sft)，LoRA、QLoRA 或全量微调，基于 transformers Trainer 与 peft。
Continued pre-training (pt) or instruction tuning (sft) with LoRA, QLoRA or full fine-tuning.

CONFIG.yaml holds keys named like transformers' TrainingArguments (output_dir, learning_rate,
max_steps, ...) plus stage, model_name_or_path, finetuning_type, dataset, template, ...;
`key=value` arguments override it (or give the whole config without a file). Chinese-LLaMA-Alpaca's
run_pt.sh / run_sft.sh names are accepted too (pretrained_model, chinese_tokenizer_path, dataset_dir,
block_size, lora_trainable, ...). Re-running the same command resumes from the last checkpoint.
Outputs: output_dir/{pt,sft}_lora_model/ (adapter + tokenizer + run.yaml), trainer_state.json,
*_results.json, training_loss.png, checkpoint-N/.
"""

EXAMPLES = """
python -m zhtune.tiny tiny/base                              # a tiny base model to try things on CPU
zhtune train examples/tiny/pt.yaml                           # continued pre-training, seconds on CPU
zhtune train examples/tiny/sft.yaml learning_rate=1e-3 max_steps=20
zhtune train examples/chinese_llama_pt_lora.yaml model_name_or_path=/models/llama-7b-hf
zhtune train examples/qlora_sft_24gb.yaml                    # QLoRA on one 24 GB GPU
zhtune train --help-config                                   # every key, its type, default and meaning
zhtune train --help-templates                                # the chat templates for sft
"""


def _templates_text() -> str:
    from zhtune.data.templates import TEMPLATES

    return "\n".join(f"  {name:<16} {t.description}" for name, t in TEMPLATES.items())


def _launch_torchrun(cfg: TrainConfig, argv: list[str]) -> int:
    """nproc_per_node=N: re-run this command under torchrun with N processes on this machine
    (train/launch.py; NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT describe several machines)."""
    from zhtune.train.launch import launch_torchrun

    return launch_torchrun(cfg.nproc_per_node, argv)


def main(argv: list[str]) -> int:
    parser = make_parser("train", DESCRIPTION, EXAMPLES)
    parser.add_argument("config", nargs="?", help="YAML config file (optional when every key is given as key=value)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config keys overriding the file")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("--help-templates", action="store_true", help="list the chat templates and exit")
    args = parser.parse_args(argv)
    if args.help_config:
        print("zhtune train config keys (YAML or key=value):\n" + config_help(TrainConfig))
        print("\naliases (Chinese-LLaMA-Alpaca names): "
              + ", ".join(f"{a} -> {b}" for a, b in TRAIN_ALIASES.items()))
        return 0
    if args.help_templates:
        print("templates / 对话模板 (template=NAME):\n" + _templates_text())
        return 0
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # everything given as key=value
        config, overrides = None, [config, *overrides]
    if config is None and not overrides:
        parser.print_help()
        return 2
    cfg = load_config(TrainConfig, config, overrides, TRAIN_ALIASES)
    if cfg.nproc_per_node and cfg.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_torchrun(cfg, argv)
    return run(cfg)


def run(cfg: TrainConfig) -> int:
    """Dispatch a validated config (its stage is one of STAGES: config.py checks it) to the stage's run(cfg)."""
    from zhtune.train.common import lock_output_dir

    module_name, func_name = STAGES[cfg.stage].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    with lock_output_dir(cfg):  # the whole run: a second run into the same output_dir is refused by name
        func(cfg)
    return 0
