"""Issue 16's defects in merge / export / convert: a wrong base is refused (and --verify checks against the
adapter's own base), --overwrite replaces only zhtune's files, one writer per output, killed runs leave
temporaries the next run removes, SIGTERM cleans up like Ctrl-C, bad JSON is named, hints run as printed."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from zhtune.cli import main
from zhtune.errors import ZhtuneError
from zhtune.export import merge as M

QUIET = {"log": lambda *_: None}


def _zhtune(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "zhtune", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, **kw)


def _lone_adapter(src, dst):
    """The adapter folder alone (no run.yaml around it): only adapter_config.json names its base."""
    shutil.copytree(src, dst)
    return dst


# --- defect 3: an adapter trained on another base ---------------------------------------------------------

def test_adapter_of_another_vocabulary_is_refused_naming_both(tmp_path, tiny_model_dir, tokens_adapter):
    from zhtune.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other-base", vocab_size=1200, seed=5)
    with pytest.raises(ZhtuneError) as exc:
        M.merge(other, [tokens_adapter], tmp_path / "out", **QUIET)
    what = exc.value.what
    assert str(tiny_model_dir.resolve()) in what and str(other) in what
    assert "vocabulary 1000" in what and "vocabulary 1200" in what
    assert "--force" in exc.value.hint and not (tmp_path / "out").exists()


def test_adapter_config_naming_another_base_force_and_verify(tmp_path, tiny_model_dir, tokens_adapter, capsys):
    from zhtune.tiny import build_tiny_model

    twin = build_tiny_model(tmp_path / "twin", vocab_size=1000, seed=7)  # same shapes, other weights
    lone = _lone_adapter(tokens_adapter, tmp_path / "lone_adapter")
    assert json.loads((lone / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert main(["merge", "--base", str(twin), "--lora", str(lone), "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "holds other values" in err and str(twin) in err and not (tmp_path / "m").exists()
    # --force merges it, saying so; --verify then compares against the adapter's own base and fails
    assert main(["merge", "--base", str(twin), "--lora", str(lone), "--output", str(tmp_path / "m"), "--force",
                 "--verify"]) == 2
    out = capsys.readouterr()
    assert "--force" in out.out and "verify against the adapter's own base" in out.out
    assert "does not match" in out.err and not (tmp_path / "m").exists()
    assert main(["merge", "--base", str(twin), "--lora", str(lone), "--output", str(tmp_path / "m"), "--force"]) == 0
    # a copy of the right base under another path is the same model: accepted, verified
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy-of-base")
    assert main(["merge", "--base", str(copy), "--lora", str(lone), "--output", str(tmp_path / "c"), "--verify"]) == 0


# --- defect 6: the base of a run trained with a relative model_name_or_path ------------------------------

def test_base_found_from_a_relative_model_path(tmp_path, tiny_model_dir, tokens_adapter, monkeypatch):
    from zhtune.io import write_run_yaml

    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir, work / "base")
    out = work / "run"
    adapter = shutil.copytree(tokens_adapter, out / "sft_lora_model")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path="base")))
    monkeypatch.chdir(work)  # training ran here with model_name_or_path=base
    write_run_yaml(out, "sft", {"model_name_or_path": "base"}, {"model": "base"})
    monkeypatch.chdir(tmp_path)  # merge runs elsewhere
    assert M.find_base([out / "sft_lora_model"]) == (work / "base").resolve()
    assert main(["merge", "--lora", str(out), "--output", str(tmp_path / "m")]) == 0


# --- defect 11 and the audit: malformed JSON is named ------------------------------------------------------

@pytest.mark.parametrize("text,said", [('{"r": 8, "lora_alpha": ', "not valid JSON"),
                                        ('["r", 8]', "JSON list, not a JSON object"),
                                        ('{"r": 8, "lora_alpha": "big"}', "lora_alpha is 'big'")])
def test_malformed_adapter_config(tmp_path, tiny_model_dir, tokens_adapter, capsys, text, said):
    bad = _lone_adapter(tokens_adapter, tmp_path / "bad")
    (bad / "adapter_config.json").write_text(text)
    assert main(["merge", "--base", str(tiny_model_dir), "--lora", str(bad), "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert said in err and "adapter_config.json" in err and "Traceback" not in err


def test_truncated_base_shard_is_named_before_the_work(tmp_path, tiny_model_dir, tokens_adapter, capsys):
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert main(["merge", "--base", str(base), "--lora", str(tokens_adapter), "--output", str(tmp_path / "m")]) == 2
    assert "model.safetensors is truncated" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


# --- defect 2: --overwrite replaces only what an earlier zhtune output wrote ------------------------------

def test_overwrite_keeps_the_users_files(tmp_path, tiny_model_dir, tokens_adapter, capsys):
    out = tmp_path / "merged"
    args = ["merge", "--base", str(tiny_model_dir), "--lora", str(tokens_adapter), "--output", str(out)]
    assert main(args) == 0
    first = {p.name for p in out.iterdir()}
    assert main([*args, "--overwrite"]) == 0                         # an earlier merge: replaced
    assert {p.name for p in out.iterdir()} == first
    (out / "thesis.tex").write_text("three years of work")
    assert main([*args, "--overwrite"]) == 2                         # anything else: refused, named
    assert "thesis.tex" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "three years of work" and {p.name for p in out.iterdir()} > first
    home = tmp_path / "home"                                          # a folder that was never an output
    home.mkdir()
    (home / "photo.jpg").write_bytes(b"\xff\xd8")
    assert main(["merge", "--base", str(tiny_model_dir), "--lora", str(tokens_adapter), "--output", str(home),
                 "--overwrite"]) == 2
    assert "photo.jpg" in capsys.readouterr().err and (home / "photo.jpg").is_file()


# --- defect 1: one writer per output ----------------------------------------------------------------------

def test_a_second_merge_into_a_locked_output_is_refused(tmp_path, tiny_model_dir, tokens_adapter):
    out = tmp_path / "out"
    code = ("import time\nfrom zhtune.io import output_lock\n"
            f"with output_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = _zhtune("merge", "--base", tiny_model_dir, "--lora", tokens_adapter, "--output", out)
        assert done.returncode == 2 and "being written by another zhtune run" in done.stderr
        assert f"pid {holder.pid}" in done.stderr and str(out) in done.stderr
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


# --- defect 5: kill -9 and SIGTERM during merge -------------------------------------------------------------

def _start_and_wait_for_temp(args, parent, name):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "zhtune", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list(parent.glob(f".{name}.*.tmp")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    return proc


@pytest.mark.slow  # three merge processes, two of them killed early: ~40 s on 2 cores
def test_sigterm_cleans_up_and_a_killed_merges_temporaries_go_on_the_next_run(
        tmp_path, tiny_model_dir, pt_adapter, sft_adapter):
    out = tmp_path / "merged"
    # --verify keeps the temporary folder alive for seconds (peft reference + logits) after the weights
    args = ["merge", "--base", tiny_model_dir, "--lora", pt_adapter, "--lora", sft_adapter, "--output", out,
            "--verify"]
    proc = _start_and_wait_for_temp(args, tmp_path, "merged")
    proc.send_signal(signal.SIGTERM)   # handled like Ctrl-C: the temporary folder goes
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "interrupted (SIGTERM)" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    proc = _start_and_wait_for_temp(args, tmp_path, "merged")
    proc.send_signal(signal.SIGKILL)   # nothing runs: the temporary stays
    proc.communicate()
    stale = list(tmp_path.glob(".merged.*.tmp"))
    assert stale and not out.exists()

    done = _zhtune(*args)               # the next run removes it, and says so
    assert done.returncode == 0, done.stderr[-2000:]
    assert "removed a stale temporary" in done.stdout and str(stale[0]) in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"] and (out / "config.json").is_file()


# --- defect 13 and the Modelfile: export gguf checks its output before the work ---------------------------

def test_export_gguf_output_checked_before_the_work(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("gguf")
    folder = tmp_path / "model.gguf"
    folder.mkdir()
    args = ["export", "gguf", "--model", str(tiny_model_dir), "--output", str(folder), "--overwrite"]
    assert main(args) == 2
    assert "output path is a folder" in capsys.readouterr().err
    mine = tmp_path / "notes.gguf"
    mine.write_text("not a model")  # --overwrite never replaces a file that is not a GGUF
    assert main(["export", "gguf", "--model", str(tiny_model_dir), "--output", str(mine), "--overwrite"]) == 2
    assert "not a GGUF file" in capsys.readouterr().err and mine.read_text() == "not a model"
    own = tmp_path / "x.gguf"
    (tmp_path / "x.gguf.Modelfile").write_text("FROM llama3\n# my own")
    assert main(["export", "gguf", "--model", str(tiny_model_dir), "--output", str(own), "--overwrite"]) == 2
    assert "not a Modelfile zhtune wrote" in capsys.readouterr().err and not own.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "notes.gguf", "x.gguf.Modelfile"]


def test_export_hint_and_modelfile_commands_run_as_printed(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("gguf")
    out = tmp_path / "我的 模型" / "tiny.f16.gguf"
    assert main(["export", "gguf", "--model", str(tiny_model_dir), "--output", str(out)]) == 0
    hint = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("下一步 next:"))
    chat, ollama = (shlex.split(part) for part in hint.removeprefix("下一步 next:").split("   ·   "))
    assert chat == ["zhtune", "chat", "--model", str(out)]
    assert ollama == ["ollama", "create", "tiny", "-f", str(out) + ".Modelfile"]
    create = (tmp_path / "我的 模型" / "tiny.f16.gguf.Modelfile").read_text(encoding="utf-8").splitlines()[1]
    assert shlex.split(create.removeprefix("# ")) == ollama


def test_merge_hint_runs_as_printed(tmp_path, tiny_model_dir, tokens_adapter, capsys):
    from zhtune.infer.chat import build_parser

    out = tmp_path / "合并 结果"
    assert main(["merge", "--base", str(tiny_model_dir), "--lora", str(tokens_adapter), "--output", str(out)]) == 0
    hint = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("下一步 next:"))
    chat = shlex.split(hint.removeprefix("下一步 next:").split("   ·   ")[0])
    assert chat[:2] == ["zhtune", "chat"] and build_parser().parse_args(chat[2:]).model == str(out)


# --- defect 12: convert meta with a malformed params.json ---------------------------------------------------

def test_convert_meta_malformed_params_json(tmp_path, capsys):
    src = tmp_path / "llama-7b"
    src.mkdir()
    (src / "consolidated.00.pth").write_bytes(b"")
    (src / "tokenizer.model").write_bytes(b"")
    (src / "params.json").write_text('{"dim": 4096, "n_layers": 32,,}')
    assert main(["convert", "meta", "--input", str(src), "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "params.json is not valid JSON" in err and f"{src / 'params.json'}:1:" in err
    assert not (tmp_path / "hf").exists()


def test_an_adapter_trained_on_the_merge_of_the_earlier_ones_is_accepted(tmp_path, tiny_model_dir, pt_adapter,
                                                                          sft_adapter):
    """Chinese-LLaMA-Alpaca's recipe: pt -> merge -> sft on the merged model -> merge pt + sft into the base."""
    from zhtune.io import write_run_yaml

    merged_pt = M.merge(tiny_model_dir, [pt_adapter], tmp_path / "merged_pt", **QUIET)
    sft = shutil.copytree(sft_adapter, tmp_path / "sft_out" / "sft_lora_model")
    write_run_yaml(sft.parent, "sft", {"model_name_or_path": str(merged_pt), "template": "alpaca"},
                   {"model": str(merged_pt)})
    out = M.merge(tiny_model_dir, [pt_adapter, sft], tmp_path / "both", **QUIET)
    assert (out / "config.json").is_file()
    with pytest.raises(ZhtuneError, match="was trained on"):  # alone, its base is the merged model, not tiny
        M.merge(tiny_model_dir, [sft], tmp_path / "sft_only", **QUIET)


# --- issue 12: a model folder whose config.json is not its weights' -------------------------------------------

def test_config_that_is_not_the_weights_is_refused_by_every_stage(tmp_path, tiny_model_dir, pt_adapter, copy_of,
                                                                 zh_corpus, capsys):
    """train, merge --base, export gguf and chat/serve (hf) name the tensor and both shapes before any work;
    merge used to copy the wrong config.json beside the merged weights, chat to print transformers' report."""
    bad = copy_of(tiny_model_dir)
    config = json.loads((bad / "config.json").read_text(encoding="utf-8"))
    config["intermediate_size"] += 32
    (bad / "config.json").write_text(json.dumps(config), encoding="utf-8")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["你好"]), encoding="utf-8")
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (["train", "stage=pt", f"model_name_or_path={bad}", f"dataset=[{zh_corpus}]",
                  "max_steps=1", f"output_dir={tmp_path / 'pt'}"],
                 ["merge", "--lora", pt_adapter, "--base", bad, "--output", tmp_path / "merged"],
                 ["export", "gguf", "--model", bad, "--output", tmp_path / "m.gguf"],
                 ["chat", "--model", bad, "--prompt-file", prompts]):
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert "model.layers.0.mlp.gate_proj.weight is" in err and str(config["intermediate_size"]) in err, err
        assert "config.json" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing written"


def test_pth_of_another_architecture_is_refused_before_the_work(tmp_path, pt_adapter, capsys):
    """--format pth is Meta's LLaMA layout: a qwen2 base is named with --format before anything is merged."""
    from zhtune.tiny import build_tiny_model

    qwen2 = build_tiny_model(tmp_path / "qwen2", vocab_size=300, arch="qwen2", hidden_size=32, intermediate_size=64)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["merge", "--lora", str(pt_adapter), "--base", str(qwen2), "--output", str(tmp_path / "out"),
                 "--format", "pth"]) == 2
    out = capsys.readouterr()
    assert "--format pth" in out.err and "'qwen2'" in out.err and "Traceback" not in out.err
    assert "merging" not in out.out + out.err  # refused before any tensor was merged
    assert sorted(p.name for p in tmp_path.iterdir()) == before
