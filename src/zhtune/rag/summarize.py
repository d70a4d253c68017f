"""`zhtune rag summarize`: summarize documents with the stuff, refine or map_reduce chain (LangChain
runnables), with the zhtune engine in-process (--model) or an OpenAI-compatible server (--api-base).

    zhtune rag summarize --docs report.md --model out/merged
    zhtune rag summarize --docs docs/ --chain map_reduce --api-base http://127.0.0.1:8000/v1

Chunks (split on Chinese sentence ends) are packed, in document order, into as few windows as fit
the model's context. stuff needs one window and refuses with the numbers otherwise; refine improves
a running summary window by window; map_reduce summarizes windows in a batch, then merges the
summaries (in several rounds if they do not fit one prompt).
"""

from __future__ import annotations

import argparse
import json
import sys

from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from zhtune.args import make_parser
from zhtune.errors import ZhtuneError
from zhtune.rag.docs import load_documents, split_documents
from zhtune.rag.llm import (
    Budget,
    add_llm_args,
    call_llm,
    check_fixed_part,
    close_llm,
    fit_text,
    open_llm,
)

SUM_SYSTEM = "你是一个擅长归纳的中文助手。摘要要忠实于原文，保留关键事实、数字和结论，不添加原文没有的内容。"
SUMMARIZE_PROMPT = ChatPromptTemplate.from_messages([
    ("system", SUM_SYSTEM),
    ("human", "请为下面的文字写一段简洁的中文摘要：\n\n{text}\n\n摘要："),
])
REFINE_PROMPT = ChatPromptTemplate.from_messages([
    ("system", SUM_SYSTEM),
    ("human", ("已有的摘要：\n{existing_summary}\n\n补充的文字：\n{text}\n\n"
               "请结合补充的文字完善已有的摘要，仍用简洁的中文；"
               "如果补充的文字没有新信息，就原样给出已有的摘要。")),
])
REDUCE_PROMPT = ChatPromptTemplate.from_messages([
    ("system", SUM_SYSTEM),
    ("human", "下面是同一批文档各部分的摘要：\n\n{text}\n\n请把它们合并成一段连贯、简洁的中文总摘要："),
])
MAX_REDUCE_ROUNDS = 4
BATCH = {"max_concurrency": 8}


def pack(texts: list[str], budget: Budget, build) -> list[str]:
    """Consecutive texts joined into as few windows as fit: count(build(window)) <= budget.room.
    A single text too long for a window is cut to fit (it is at most one chunk, so little is lost)."""
    windows: list[str] = []
    current = ""
    for text in texts:
        trial = f"{current}\n\n{text}" if current else text
        if budget.count(build(trial)) <= budget.room:
            current = trial
            continue
        if current:
            windows.append(current)
        current = text if budget.count(build(text)) <= budget.room else fit_text(budget, build, text)
    if current:
        windows.append(current)
    return windows


def summarize_stuff(texts: list[str], llm, budget: Budget, stream_to=None) -> tuple[str, int]:
    def build(t):
        return SUMMARIZE_PROMPT.format_messages(text=t)

    check_fixed_part(budget, build(""), "prompt", "--max-new-tokens")
    whole = "\n\n".join(texts)
    used = budget.count(build(whole))
    if used > budget.room:
        raise ZhtuneError(f"the documents take {used} prompt tokens; the stuff chain needs them in one prompt "
                          f"but only {budget.room} fit ({budget.describe()})", where="--chain stuff",
                          expected="documents that fit one prompt", hint="use --chain map_reduce or --chain refine")
    return call_llm(SUMMARIZE_PROMPT | llm | StrOutputParser(), {"text": whole}, stream_to).strip(), 1


def summarize_refine(texts: list[str], llm, budget: Budget, stream_to=None) -> tuple[str, int]:
    def first(t):
        return SUMMARIZE_PROMPT.format_messages(text=t)

    check_fixed_part(budget, first(""), "prompt", "--max-new-tokens")
    windows = pack(texts, budget, first)
    summary = call_llm(SUMMARIZE_PROMPT | llm | StrOutputParser(), {"text": windows[0]},
                       stream_to if len(windows) == 1 else None).strip()
    calls = 1
    refine = REFINE_PROMPT | llm | StrOutputParser()
    rest = "\n\n".join(windows[1:])
    while rest:  # re-pack the remaining text around the current summary, which changes every step
        def build(t, s=summary):
            return REFINE_PROMPT.format_messages(existing_summary=s, text=t)

        window = fit_text(budget, build, rest)
        if not window:  # the running summary fills the context: stop rather than loop forever
            print("注意 note: summary fills the context; refine stopped early", file=sys.stderr)
            break
        rest = rest[len(window):].lstrip()
        print(f"refine {calls + 1}: {len(rest)} characters left", file=sys.stderr)
        summary = call_llm(refine, {"existing_summary": summary, "text": window},
                           stream_to if not rest else None).strip()
        calls += 1
    return summary, calls


def summarize_map_reduce(texts: list[str], llm, budget: Budget, stream_to=None) -> tuple[str, int]:
    def build_map(t):
        return SUMMARIZE_PROMPT.format_messages(text=t)

    def build_reduce(t):
        return REDUCE_PROMPT.format_messages(text=t)

    check_fixed_part(budget, build_reduce(""), "prompt", "--max-new-tokens")
    windows = pack(texts, budget, build_map)
    print(f"map: {len(windows)} window(s)", file=sys.stderr)
    mapper = SUMMARIZE_PROMPT | llm | StrOutputParser()
    # concurrent calls: the hf engine decodes them in one batch; a server gets at most 8 at a time
    summaries = [s.strip() for s in mapper.batch([{"text": w} for w in windows], config=BATCH)]
    calls = len(windows)
    reducer = REDUCE_PROMPT | llm | StrOutputParser()
    for _ in range(MAX_REDUCE_ROUNDS):
        groups = pack(summaries, budget, build_reduce)
        if len(groups) == 1:
            return call_llm(reducer, {"text": groups[0]}, stream_to).strip(), calls + 1
        print(f"reduce: {len(summaries)} summaries -> {len(groups)}", file=sys.stderr)
        summaries = [s.strip() for s in reducer.batch([{"text": g} for g in groups], config=BATCH)]
        calls += len(groups)
    raise ZhtuneError(f"the summaries did not fit one prompt after {MAX_REDUCE_ROUNDS} reduce rounds",
                      where="--chain map_reduce", hint="raise --context-length or lower --max-new-tokens")


CHAINS = {"stuff": summarize_stuff, "refine": summarize_refine, "map_reduce": summarize_map_reduce}


def summarize(chunks: list[Document], llm, budget: Budget, chain: str = "map_reduce", stream_to=None) -> dict:
    """The summary of `chunks` (in document order) and how it was made."""
    if chain not in CHAINS:
        raise ZhtuneError(f"unknown chain {chain!r}", where="--chain", expected=" | ".join(CHAINS))
    summary, calls = CHAINS[chain]([c.page_content for c in chunks], llm, budget, stream_to)
    files = list(dict.fromkeys(c.metadata.get("source", "?") for c in chunks))
    return {"summary": summary, "chain": chain, "llm_calls": calls, "chunks": len(chunks), "sources": files}


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "rag summarize",
        """
        文档摘要：切分文档，用 stuff / refine / map_reduce 链生成中文摘要。
        Summarize documents with the stuff, refine or map_reduce chain. Never downloads anything.
        """,
        """
        zhtune rag summarize --docs report.md --model out/merged
        zhtune rag summarize --docs docs/ --chain refine --model out/model.gguf
        zhtune rag summarize --docs docs/ --chain map_reduce --api-base http://127.0.0.1:8000/v1
        """,
    )
    group = parser.add_argument_group("documents / 文档")
    group.add_argument("--docs", "--file_path", nargs="+", required=True, help=".txt/.md/.pdf files or folders")
    group.add_argument("--chain", "--chain_type", choices=list(CHAINS), default="map_reduce",
                       help="stuff: one prompt (short documents); refine: a running summary; "
                            "map_reduce: summarize parts, then merge")
    group.add_argument("--chunk-size", "--chunk_size", type=int, default=600, help="characters per chunk")
    group.add_argument("--chunk-overlap", "--chunk_overlap", type=int, default=0,
                       help="characters shared by neighbours")
    parser.add_argument("--json", action="store_true", help="print the summary and its sources as one JSON object")
    add_llm_args(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from zhtune.infer.options import check_front_end_args

    check_front_end_args(args, "rag")   # before the documents are read and split
    chunks = split_documents(load_documents(args.docs), args.chunk_size, args.chunk_overlap)
    llm, budget = open_llm(args, sample=SUM_SYSTEM + "".join(c.page_content for c in chunks[:3]))
    stream_to = None if args.json else sys.stdout
    try:
        result = summarize(chunks, llm, budget, args.chain, stream_to)
    finally:
        close_llm(llm)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(f"\n\n来源 Sources: {len(result['sources'])} file(s), "
              f"{result['chunks']} chunks, {result['llm_calls']} LLM call(s), chain {result['chain']}")
        for f in result["sources"]:
            print(f"  - {f}")
    return 0
