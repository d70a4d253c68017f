"""What a person reads in the terminal: library notices meant for library authors are kept out of normal runs.

    quiet_libraries(debug)   # zhtune.cli.main, before a subcommand imports anything heavy

Deprecation notices from inside transformers / peft / torch (about their own internals, or about an argument
that the installed version renamed), a CPU-accelerator notice DeepSpeed prints on every import once it is
installed, peft announcing that it saves the resized embeddings, and transformers' informational warnings
say nothing a user can act on. Without --debug they are
filtered here, at one place; with --debug (or ZHTUNE_DEBUG=1) everything is shown. Warnings raised in
zhtune's own modules are never filtered: those are ours to fix.
"""

from __future__ import annotations

import logging
import os
import warnings

# the modules whose FutureWarning / DeprecationWarning a user cannot act on
LIBRARIES = (r"(transformers|peft|trl|accelerate|datasets|torch|huggingface_hub|tokenizers|bitsandbytes|deepspeed"
             r"|gguf|sentence_transformers|langchain\w*|gradio|uvicorn|fastapi|pydantic)(\.|$)")

# UserWarnings of libraries that report what the library did right on its own
MESSAGES = (
    r"Setting `save_embedding_layers` to `True`",   # peft saving the resized embeddings of a grown vocabulary
)

# library loggers -> fragments of messages that only describe the library's own state
NOISE: dict[str, tuple[str, ...]] = {
    "DeepSpeed": ("Setting accelerator to CPU",),   # on every `import transformers` once deepspeed is installed
    "bitsandbytes.backends.cpu.ops": ("gemm_4bit_forward",),   # an optional CPU kernel it would fetch from the Hub
    "gguf.vocab": ("Unknown separator token", "TemplateProcessing"),   # BERT-style pair templates, unused by us
}


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


def quiet_libraries(debug: bool) -> None:
    """Filter the notices above for the rest of this process (and transformers' in child processes)."""
    if debug:
        return
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
    for message in MESSAGES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=LIBRARIES)
    # transformers' logger.warning notes (a pad token aligned with the tokenizer, a renamed argument): errors stay
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name, fragments in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):   # main() may run many times in one process
            logger.addFilter(_Drop(fragments))
