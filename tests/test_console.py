"""Output a person reads: library notices meant for library authors stay out of normal runs, --debug shows them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

from zhtune.console import quiet_libraries


def _warn_from(module: str) -> None:
    warnings.warn_explicit("`old` is deprecated, use `new`", FutureWarning, f"/site/{module}.py", 1, module=module)


def test_library_deprecations_are_filtered_ours_are_not(monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries(debug=False)
        for module in ("transformers.modeling_utils", "torch.nn.modules.module", "peft.tuners", "zhtune.train.sft"):
            _warn_from(module)
    assert [str(w.filename) for w in seen] == ["/site/zhtune.train.sft.py"], "zhtune's own warnings stay visible"
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"


def test_a_library_user_warning_is_kept_unless_it_only_reports_what_went_right():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries(debug=False)
        for text in ("Setting `save_embedding_layers` to `True` as the embedding layer has been resized",
                     "Could not find a config file in the model folder"):
            warnings.warn_explicit(text, UserWarning, "/site/peft/utils/save_and_load.py", 1,
                                   module="peft.utils.save_and_load")
    assert [str(w.message) for w in seen] == ["Could not find a config file in the model folder"]


def test_debug_shows_everything(monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries(debug=True)
        _warn_from("transformers.modeling_utils")
    assert len(seen) == 1 and "TRANSFORMERS_VERBOSITY" not in os.environ


def test_noise_of_library_loggers_is_dropped_and_the_rest_kept(caplog):
    quiet_libraries(debug=False)
    quiet_libraries(debug=False)   # idempotent: main() may run many times in one process
    logger = logging.getLogger("DeepSpeed")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="DeepSpeed"):
        logger.propagate, saved = True, logger.propagate
        try:
            logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
            logger.warning("ZeRO-3 offload needs more RAM")
        finally:
            logger.propagate = saved
    assert [r.getMessage() for r in caplog.records] == ["ZeRO-3 offload needs more RAM"]


def test_a_chat_run_prints_no_library_notices(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text('["你好"]', encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("ZHTUNE_DEBUG", "TRANSFORMERS_VERBOSITY")}
    env.pop("PYTHONWARNINGS", None)
    out = subprocess.run([sys.executable, "-m", "zhtune", "chat", "--model", str(tiny_model_dir), "--prompt-file",
                          str(prompts), "--max-new-tokens", "4", "--seed", "0"], capture_output=True, text=True,
                         timeout=300, env=env)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "助手 Assistant:" in out.stdout
    for noise in ("Warning", "deprecated", "[transformers]", "Setting accelerator", "Traceback"):
        assert noise not in text, text
