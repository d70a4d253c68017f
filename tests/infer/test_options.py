"""The model / engine flags are defined once (zhtune.infer.options) and every front end takes them: the
same option strings, types, choices and defaults in chat, webui, serve and rag; generation defaults per
front end from GEN_DEFAULTS; each backend gets only the options it understands."""

from __future__ import annotations

import argparse

import pytest

from zhtune.errors import ZhtuneError
from zhtune.infer import options
from zhtune.infer.engine import GenParams

MODEL_FLAGS = ("--model", "--lora", "--backend", "--template", "--dtype", "--load-in-8bit", "--load-in-4bit",
               "--num-gpus", "--threads", "--threads-batch", "--context-length")


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from zhtune.eval.run import build_parser as eval_
    from zhtune.infer.chat import build_parser as chat
    from zhtune.rag.qa import build_parser as rag_qa
    from zhtune.rag.summarize import build_parser as rag_summarize
    from zhtune.serve.api import build_parser as serve
    from zhtune.serve.webui import build_parser as webui

    return {"chat": chat(), "webui": webui(), "serve": serve(), "rag": rag_qa(), "rag summarize": rag_summarize(),
            "eval": eval_()}


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def _shape(action: argparse.Action) -> tuple:
    return (action.dest, action.nargs, action.const, action.choices, action.default,
            getattr(action.type, "__qualname__", action.type))


def test_every_front_end_has_the_same_model_flags():
    reference = options.add_model_args
    base = argparse.ArgumentParser()
    reference(base)
    want = {flag: _shape(a) for flag, a in _actions(base).items() if flag in MODEL_FLAGS}
    assert set(want) == set(MODEL_FLAGS)
    for name, parser in _parsers().items():
        have = _actions(parser)
        for flag in MODEL_FLAGS:
            assert flag in have, f"{name} lacks {flag}"
            assert _shape(have[flag]) == want[flag], f"{name} {flag} differs from zhtune.infer.options"


@pytest.mark.parametrize("front_end", ["chat", "webui", "serve", "rag", "eval"])
def test_generation_defaults_have_one_home(front_end):
    parser = argparse.ArgumentParser()
    options.add_model_args(parser)
    options.add_gen_args(parser, front_end)
    args = parser.parse_args(["--model", "m"])
    params = options.params_from_args(args, front_end)
    expected = GenParams(**options.GEN_DEFAULTS[front_end])
    assert params == expected
    assert (params.max_new_tokens, params.temperature) == {
        "chat": (512, 0.2), "webui": (512, 0.2), "rag": (256, 0.2), "serve": (512, 0.7), "eval": (512, 0.0)}[front_end]


def test_the_guide_documents_each_front_ends_generation_defaults():
    from pathlib import Path

    guide = Path(__file__).resolve().parents[2] / "docs" / "guides" / "chat.md"
    rows = [line.split("|")[1:7] for line in guide.read_text(encoding="utf-8").splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in options.GEN_DEFAULTS]
    assert {r[0].strip() for r in rows} == set(options.GEN_DEFAULTS), "one row per front end"
    for name, *values in rows:
        d = options.gen_defaults(name.strip())
        want = [d.max_new_tokens, d.temperature, d.top_p, d.top_k, d.repetition_penalty]
        assert [float(v) for v in values] == [float(w) for w in want], name


def test_front_ends_write_no_generation_default_of_their_own():
    """GenParams(...) with a literal value in a front end would be a second home for a default."""
    import ast
    from pathlib import Path

    src = Path(options.__file__).resolve().parents[1]
    for path in [src / "infer" / "chat.py", *(src / "serve").glob("*.py"), *(src / "rag").glob("*.py"),
                 *(src / "eval").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "GenParams":
                literal = [k.arg for k in node.keywords if isinstance(k.value, ast.Constant)]
                assert not literal, f"{path.name}:{node.lineno} sets {literal} itself; use GEN_DEFAULTS"


def test_out_of_range_sampling_flag_is_named():
    parser = argparse.ArgumentParser()
    options.add_gen_args(parser, "chat")
    with pytest.raises(ZhtuneError) as exc:
        options.params_from_args(parser.parse_args(["--top-p", "1.5"]), "chat")
    assert exc.value.where == "--top-p"


@pytest.mark.parametrize("argv, flag", [(["--threads", "0"], "--threads"),
                                        (["--threads-batch", "x"], "--threads-batch"),
                                        (["--context-length", "-1"], "--context-length"),
                                        (["--num-gpus", "0"], "--num-gpus")])
def test_out_of_range_model_flag_is_named(argv, flag):
    parser = argparse.ArgumentParser()
    options.add_model_args(parser)
    with pytest.raises(ZhtuneError) as exc:
        parser.parse_args(["--model", "m", *argv])
    assert exc.value.where == flag


def test_each_backend_gets_only_its_options():
    parser = argparse.ArgumentParser()
    options.add_model_args(parser)
    args = parser.parse_args(["--model", "m", "--threads", "3", "--threads-batch", "4", "--context-length", "256",
                              "--dtype", "bf16", "--load-in-4bit", "--num-gpus", "2"])
    assert options.engine_options("llamacpp", args, concurrency=4) == {
        "n_ctx": 256, "n_threads": 3, "n_threads_batch": 4, "n_parallel": 4}
    assert options.engine_options("hf", args, concurrency=4) == {
        "dtype": "bf16", "num_gpus": 2, "max_model_len": 256, "load_in_8bit": False, "load_in_4bit": True,
        "max_batch_size": 4}
    assert options.engine_options("vllm", args) == {"dtype": "bf16", "num_gpus": 2, "max_model_len": 256}


def test_context_length_shortens_the_hf_context_and_never_stretches_it(tiny_model_dir):
    parser = argparse.ArgumentParser()
    options.add_model_args(parser)
    with options.engine_from_args(parser.parse_args(["--model", str(tiny_model_dir), "--context-length", "100"])) as e:
        assert e.max_model_len == 100
    with pytest.raises(ZhtuneError) as exc:
        options.engine_from_args(parser.parse_args(["--model", str(tiny_model_dir), "--context-length", "99999"]))
    assert exc.value.where == "--context-length"
