"""`zhtune eval`: benchmarks in their public layouts (C-Eval, CMMLU, MMLU), bits per character and
generation metrics, over the one inference engine (zhtune.infer). The command is zhtune.eval.run."""
