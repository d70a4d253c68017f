"""lm-evaluation-harness (from the registry) scores a local multiple-choice task against `zhtune serve`
(its local-completions model: token-id prompts, echo, logprobs) and with its own hf model on the same
weights: the same accuracy, and per choice the same log-likelihood."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

TASK = """
task: zhtune_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\n答案："
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _write_task(root):
    import random

    rng = random.Random(0)
    words = ["山", "水", "火", "木", "金", "土", "日", "月", "cat", "dog", "sun", "moon"]
    docs = []
    for i in range(10):
        a, b, c, d = rng.sample(words, 4)
        docs.append({"question": f"第{i}题 question {i}: which one?", "A": a, "B": b, "C": c, "D": d,
                     "answer": rng.choice("ABCD")})
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (root / "zhtune_mc.yaml").write_text(TASK.format(data=data), encoding="utf-8")
    return root


def _run(model: str, model_args: str, include: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=["zhtune_mc"], batch_size=4,
                          task_manager=TaskManager(include_path=include), log_samples=True)
    samples = sorted(out["samples"]["zhtune_mc"], key=lambda s: s["doc_id"])
    return {"acc": out["results"]["zhtune_mc"]["acc,none"],
            "ll": [[float(r[0][0]) for r in s["resps"]] for s in samples]}


def test_local_completions_against_zhtune_serve_agrees_with_hf(tiny_model_dir, api_url, tmp_path):
    include = str(_write_task(tmp_path))
    ours = _run("local-completions", f"model=tiny,base_url={api_url}/v1/completions,tokenizer={tiny_model_dir},"
                                     "tokenized_requests=True,add_bos_token=True,num_concurrent=2,max_retries=1",
                include)
    theirs = _run("hf", f"pretrained={tiny_model_dir},dtype=float32,device=cpu", include)
    assert ours["acc"] == theirs["acc"]
    assert len(ours["ll"]) == 10 and all(len(x) == 4 for x in ours["ll"])
    for a, b in zip(ours["ll"], theirs["ll"]):
        assert a == pytest.approx(b, abs=1e-3)
