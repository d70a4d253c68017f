"""`zhtune rag qa` and `zhtune rag summarize` end to end with the tiny random model in-process (answers are
gibberish: we assert structure, citations, sources and the context budget) and bad inputs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from zhtune import tiny
from zhtune.cli import main as cli
from zhtune.errors import ZhtuneError

DOCS = tiny.asset("rag_docs")
GEN = ["--max-new-tokens", "8", "--temperature", "0", "--seed", "0"]


@pytest.fixture(scope="module")
def engine_llm(tiny_model_dir):
    import argparse

    from zhtune.rag.llm import add_llm_args, close_llm, open_llm

    parser = argparse.ArgumentParser()
    add_llm_args(parser)
    llm, budget = open_llm(parser.parse_args(["--model", str(tiny_model_dir), *GEN]))
    yield llm, budget
    close_llm(llm)


def _json_out(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def _qa(asset_index, model, *extra) -> list[str]:
    return ["rag", "qa", "--docs", str(DOCS), "--index", str(asset_index[1]), "--chunk-size", "300",
            "--chunk-overlap", "30", "--model", str(model), *GEN, *extra]


def test_qa_stuff_cites_sources(asset_index, tiny_model_dir, capsys):
    code = cli(_qa(asset_index, tiny_model_dir, "--question", "云溪镇的望云桥建于哪一年？", "--json"))
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert "retrieval: bm25 (auto" in captured.err  # no --embedding: the English-centric default -> bm25
    assert result["chain"] == "stuff" and isinstance(result["answer"], str)
    assert result["retrieved"] == 4 and 1 <= len(result["sources"]) <= 4
    for n, s in enumerate(result["sources"], start=1):
        assert s["n"] == n and Path(s["source"]).is_file() and Path(s["source"]).parent == DOCS
        assert s["chunk"] >= 1 and s["line"] >= 1 and s["text"]
        assert s["text"] in Path(s["source"]).read_text(encoding="utf-8")  # cited text is real document text
    # the top bm25 chunk of this question holds the answer; hybrid keeps it in the top 4
    sources = result["sources"]
    assert any("1583" in s["text"] or "万历" in s["text"] for s in sources) or sources[0]["truncated"]


def test_qa_text_output_lists_sources(asset_index, tiny_model_dir, capsys):
    assert cli(_qa(asset_index, tiny_model_dir, "-q", "星帆X3 怎么恢复出厂设置？", "--chain", "refine",
                   "--top-k", "2", "--retrieval", "bm25")) == 0
    out = capsys.readouterr().out
    assert "来源 Sources" in out and "[1] " in out and "xingfan_x3_manual.txt:" in out
    assert "[3] " not in out  # top-k 2


def test_qa_interactive(asset_index, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("开茶节在什么时候？\n\n"))
    assert cli(_qa(asset_index, tiny_model_dir, "--interactive", "--json")) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 1 and lines[0]["question"] == "开茶节在什么时候？"


def test_budget_is_respected(asset_index, engine_llm):
    """The stuff prompt never exceeds context - max_new_tokens (counted by engine.count_tokens), and a
    dropped chunk really would not have fit."""
    from langchain_core.documents import Document

    from zhtune.rag.qa import STUFF_PROMPT, answer_question, number_chunks

    llm, budget = engine_llm
    index = asset_index[0]
    question = "青禾智能科技的员工入职第一年有几天带薪年假？"
    result = answer_question(question, index, llm, budget, "stuff", 4, None, "hybrid")
    docs = [Document(page_content=s.text) for s in result.sources]
    used = budget.count(STUFF_PROMPT.format_messages(context=number_chunks(docs), question=question))
    assert 0 < used <= budget.room == budget.context - budget.max_new_tokens
    hits = index.search(question, 4, "hybrid")
    if len(result.sources) < len(hits) and not result.sources[-1].truncated:
        more = docs + [hits[len(docs)][0]]
        assert budget.count(STUFF_PROMPT.format_messages(context=number_chunks(more), question=question)) > budget.room
    if result.sources[0].truncated:  # cut to fit, so nearly full
        assert used > budget.room - 16


def test_citations_are_marked(asset_index, engine_llm):
    """Sources whose [n] appears in the answer are marked cited (the engine's text is what it is;
    the marking is checked on the rendered output of the same Answer)."""
    from zhtune.rag.qa import CITATION, answer_question

    llm, budget = engine_llm
    result = answer_question("望云桥建于哪一年？", asset_index[0], llm, budget, "stuff", 2, None, "bm25")
    cited = {int(n) for n in CITATION.findall(result.answer)}
    assert all(s.cited == (s.n in cited) for s in result.sources)
    assert "来源 Sources" in result.render()


def test_question_too_long_is_refused_with_numbers(asset_index, tiny_model_dir, capsys):
    long_question = "这个问题非常长。" * 80
    assert cli(_qa(asset_index, tiny_model_dir, "--question", long_question)) == 2
    err = capsys.readouterr().err
    assert "too long" in err and "512" in err and "--question" in err and "8 are kept for the answer" in err


def test_summarize_chains(tiny_model_dir, tmp_path, capsys):
    short = tmp_path / "short.md"
    short.write_text("云溪镇的望云桥建于1583年。开茶节在农历三月初三。", encoding="utf-8")
    base = ["rag", "summarize", "--model", str(tiny_model_dir), *GEN, "--json"]
    assert cli([*base, "--docs", str(short), "--chain", "stuff"]) == 0
    stuff = _json_out(capsys)
    assert stuff["llm_calls"] == 1 and stuff["sources"] == [str(short)] and isinstance(stuff["summary"], str)

    manual = tiny.asset("rag_docs/xingfan_x3_manual.txt")
    assert cli([*base, "--docs", str(manual), "--chain", "map_reduce", "--chunk-size", "200"]) == 0
    mr = _json_out(capsys)
    assert mr["chain"] == "map_reduce" and mr["chunks"] > 5 and mr["llm_calls"] >= 3

    assert cli([*base, "--docs", str(manual), "--chain", "refine", "--chunk-size", "200"]) == 0
    refine = _json_out(capsys)
    assert refine["chain"] == "refine" and refine["llm_calls"] >= 2

    # stuff cannot hold 4 KB of Chinese in 512 tokens: refused with the numbers and the alternative
    assert cli([*base, "--docs", str(manual), "--chain", "stuff"]) == 2
    err = capsys.readouterr().err
    assert "prompt tokens" in err and "--chain map_reduce" in err


def test_summarize_text_output(tiny_model_dir, tmp_path, capsys):
    doc = tmp_path / "a.txt"
    doc.write_text("开茶节在农历三月初三举行。", encoding="utf-8")
    assert cli(["rag", "summarize", "--docs", str(doc), "--chain", "stuff", "--model", str(tiny_model_dir), *GEN]) == 0
    out = capsys.readouterr().out
    assert "来源 Sources: 1 file(s)" in out and str(doc) in out


@pytest.mark.parametrize("argv, message", [
    (["--docs", "/no/such/folder", "-q", "x"], "document not found"),
    (["--docs", str(DOCS), "-q", "   "], "question is empty"),
    (["--docs", str(DOCS), "-q", "x", "--top-k", "0"], "--top-k"),
    (["-q", "x"], "no documents and no index"),
    (["--docs", str(DOCS), "-q", "x", "--embedding", "/no/such/model"], "embedding model folder not found"),
])
def test_qa_bad_input(argv, message, capsys):
    assert cli(["rag", "qa", *argv, "--api-base", "http://127.0.0.1:9/v1"]) == 2
    assert message in capsys.readouterr().err


def test_empty_docs_and_unreachable_server(tmp_path, capsys):
    (tmp_path / "empty.md").write_text("", encoding="utf-8")
    assert cli(["rag", "summarize", "--docs", str(tmp_path), "--api-base", "http://127.0.0.1:9/v1"]) == 2
    assert "no text" in capsys.readouterr().err
    (tmp_path / "ok.md").write_text("有内容。", encoding="utf-8")
    assert cli(["rag", "summarize", "--docs", str(tmp_path), "--api-base", "http://127.0.0.1:9/v1"]) == 2
    assert "cannot reach the server" in capsys.readouterr().err


def test_fit_text_never_exceeds(engine_llm):
    from zhtune.rag.llm import fit_text
    from zhtune.rag.summarize import SUMMARIZE_PROMPT

    budget = engine_llm[1]

    def build(t):
        return SUMMARIZE_PROMPT.format_messages(text=t)

    text = tiny.asset("rag_docs/yunxi_town.md").read_text(encoding="utf-8")
    cut = fit_text(budget, build, text)
    assert 0 < len(cut) < len(text) and text.startswith(cut)
    assert budget.count(build(cut)) <= budget.room < budget.count(build(text[: len(cut) + 1]))
    with pytest.raises(ZhtuneError):
        from zhtune.rag.llm import check_fixed_part
        check_fixed_part(budget, build("长" * 2000), "prompt", "--x")


def test_qa_and_summarize_on_a_gguf(asset_index, gguf_file, tmp_path, capsys):
    """Defect 8: rag on a GGUF ended in AttributeError threads_batch (its flags were a drifted copy of chat's)."""
    threads = ["--threads", "1", "--threads-batch", "1", "--context-length", "512"]
    assert cli(_qa(asset_index, gguf_file, "-q", "望云桥建于哪一年？", "--json", *threads)) == 0
    result = _json_out(capsys)
    assert result["chain"] == "stuff" and isinstance(result["answer"], str) and result["sources"]
    doc = tmp_path / "a.txt"
    doc.write_text("开茶节在农历三月初三举行。", encoding="utf-8")
    assert cli(["rag", "summarize", "--docs", str(doc), "--chain", "stuff", "--model", str(gguf_file), *GEN,
                *threads, "--json"]) == 0
    assert _json_out(capsys)["llm_calls"] == 1
