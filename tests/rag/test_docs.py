"""Loaders and the Chinese-aware splitter of `zhtune rag` (no model needed)."""

from __future__ import annotations

import re

import pytest

from zhtune import tiny
from zhtune.errors import ZhtuneError
from zhtune.rag.docs import collect_files, load_documents, split_documents

SENTENCE = re.compile(r"[^。！？；\n]+[。！？；]+[”’」』）)]?")


def test_splitter_keeps_chinese_sentences_whole():
    docs = load_documents([tiny.asset("rag_docs")])
    chunks = split_documents(docs, chunk_size=120, chunk_overlap=30)
    assert len(chunks) > len(docs)
    texts = [c.page_content for c in chunks]
    checked = 0
    for doc in docs:
        for sentence in SENTENCE.findall(doc.page_content):
            sentence = sentence.strip()
            if 4 < len(sentence) <= 120:  # longer ones must be cut at commas; that is allowed
                assert any(sentence in t for t in texts), f"sentence split across chunks: {sentence}"
                checked += 1
    assert checked > 30
    for c in chunks:  # every chunk ends at a sentence end, a line end or a clause end (for long sentences)
        assert len(c.page_content) <= 120
        assert re.search(r"[。！？；…”’」』）)\.!?:：，、,]$|\S$", c.page_content)
    whole = [c for c in chunks if c.page_content[-1] in "。！？；”"]
    assert len(whole) >= 0.7 * len(chunks)


def test_split_metadata_and_overlap():
    from langchain_core.documents import Document

    text = "第一句话在这里。第二句话也在这里！第三句话呢？\n第四句话在第二行。第五句；第六句……第七句。"
    chunks = split_documents([Document(page_content=text, metadata={"source": "x.md"})], 20, 10)
    assert [c.metadata["chunk"] for c in chunks] == list(range(1, len(chunks) + 1))
    assert all(c.metadata["source"] == "x.md" for c in chunks)
    assert chunks[0].metadata["line"] == 1 and chunks[-1].metadata["line"] == 2
    assert chunks[0].page_content == "第一句话在这里。第二句话也在这里！"
    # overlap is made of whole sentences: chunk 2 starts with the sentence chunk 1 ended with
    assert chunks[1].page_content.startswith("第二句话也在这里！")
    assert chunks[2].page_content == "第四句话在第二行。第五句；第六句……"   # a line end is a chunk end
    assert chunks[3].page_content == "第五句；第六句……第七句。"
    assert not any(c.page_content.startswith(("。", "！", "？", "；", "…")) for c in chunks)


def test_folders_recursive_encodings_and_empty(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "a.md").write_text("甲文件。", encoding="utf-8")
    (tmp_path / "sub" / "deeper" / "b.txt").write_bytes("乙文件，GB18030 编码。".encode("gb18030"))
    (tmp_path / "sub" / "bom.txt").write_bytes("\ufeff带 BOM 的文件。".encode("utf-8"))
    (tmp_path / "sub" / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG\x00\x00")
    (tmp_path / ".hidden" / "secret.md").write_text("不应被读到。", encoding="utf-8")
    files = collect_files([tmp_path])
    assert [f.name for f in files] == ["a.md", "bom.txt", "b.txt", "empty.txt"] or \
        sorted(f.name for f in files) == ["a.md", "b.txt", "bom.txt", "empty.txt"]
    docs = load_documents([tmp_path, tmp_path / "a.md"])  # the same file twice is read once
    texts = sorted(d.page_content for d in docs)
    assert texts == sorted(["甲文件。", "乙文件，GB18030 编码。", "带 BOM 的文件。"])
    assert all(len(d.metadata["sha256"]) == 64 for d in docs)


@pytest.mark.parametrize("content, message", [
    (b"abc\x00\x01\x02binary", "binary"),
    (b"\xff\xfe\xfa\xfb\x80\x81 bad bytes \xff", "neither UTF-8 nor GB18030"),
])
def test_unreadable_files_are_named(tmp_path, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    (tmp_path / "good.txt").write_text("好的。", encoding="utf-8")
    with pytest.raises(ZhtuneError) as info:
        load_documents([tmp_path])
    assert message in info.value.what and info.value.where == str(bad)


def _pdf(text: str) -> bytes:
    """A one-page PDF 1.4 file showing `text` in Helvetica (written by hand: no PDF writer needed)."""
    content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
             b"/Resources << /Font << /F1 5 0 R >> >> >>"),
            b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def test_pdf_text_is_loaded(tmp_path):
    pytest.importorskip("pypdf")
    (tmp_path / "manual.pdf").write_bytes(_pdf("The X3 robot runs for 150 minutes."))
    docs = load_documents([tmp_path])  # folders pick up .pdf too
    assert [d.page_content.strip() for d in docs] == ["The X3 robot runs for 150 minutes."]


def test_damaged_pdf_is_named(tmp_path):
    pytest.importorskip("pypdf")
    pdf = tmp_path / "broken.pdf"
    pdf.write_bytes(b"%PDF-1.4 this is not really a pdf")
    with pytest.raises(ZhtuneError) as info:
        load_documents([pdf])
    assert info.value.where == str(pdf)


@pytest.mark.parametrize("make, where", [
    (lambda p: [], "--docs"),
    (lambda p: [p / "missing.md"], "--docs"),
    (lambda p: [p], "--docs"),                                   # a folder with no documents
])
def test_no_documents(tmp_path, make, where):
    (tmp_path / "notes.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ZhtuneError) as info:
        load_documents(make(tmp_path))
    assert info.value.where == where


def test_only_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("", encoding="utf-8")
    (tmp_path / "b.md").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ZhtuneError) as info:
        load_documents([tmp_path])
    assert "no text" in info.value.what and "a.txt" in info.value.where and "b.md" in info.value.where


def test_bad_chunk_flags():
    from langchain_core.documents import Document

    doc = [Document(page_content="一句话。", metadata={"source": "x"})]
    with pytest.raises(ZhtuneError, match="overlap"):
        split_documents(doc, 100, 100)
    with pytest.raises(ZhtuneError, match="too small"):
        split_documents(doc, 5, 0)
