"""Documents for `zhtune rag`: load .txt/.md/.pdf files and folders, split them on Chinese sentence ends.

    docs = load_documents(["notes/", "faq.md"])          # list[langchain_core.documents.Document]
    chunks = split_documents(docs, chunk_size=300, chunk_overlap=50)

Each chunk's metadata says where it came from, so answers can cite it:
{"source": "notes/a.md", "chunk": 3 (1-based, per file), "line": 12 (first line of the chunk)}.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from langchain_core.documents import Document
from langchain_text_splitters import RecursiveCharacterTextSplitter

from zhtune.errors import ZhtuneError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text", ".rst")
FOLDER_SUFFIXES = TEXT_SUFFIXES + (".pdf",)

# Regexes tried in order: paragraphs, lines, sentence ends, clauses, words, characters. A sentence
# end is 。！？；… (plus a closing quote right after it) or .!?; followed by a space. The
# separators are zero-width look-behinds or trailing spaces, so "。" stays with the sentence it
# closes and a chunk is whole sentences unless one sentence alone is longer than chunk_size.
_CLOSERS = "”’」』）)"
SENTENCE_END = (rf"(?<=[。！？；…])(?![{_CLOSERS}…。！？])"   # 。 not followed by a closer
                rf"|(?<=[。！？；…][{_CLOSERS}])"              # 。” : split after the closer
                r"|(?<=[.;!?])\s+")                           # English: ". " "? "
CHINESE_SEPARATORS = [r"\n\s*\n", r"\n", SENTENCE_END, r"(?<=[，、：,:])", r"\s+", ""]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def collect_files(paths: list[str | os.PathLike]) -> list[Path]:
    """Files named, plus the .txt/.md/.pdf files under folders named (recursive, sorted)."""
    if not paths:
        raise ZhtuneError("no documents given", where="--docs", expected="one or more files or folders")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise ZhtuneError(f"no documents in folder {path}", where="--docs",
                                  expected=f"files ending in {', '.join(FOLDER_SUFFIXES)}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ZhtuneError(f"document not found: {raw}", where="--docs", expected="an existing file or folder")
    seen: set[Path] = set()
    return [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]


def read_text(path: Path) -> str:
    """The text of one file; UTF-8 (with or without BOM), else GB18030 (common for Chinese files)."""
    if path.suffix.lower() == ".pdf":
        return _read_pdf(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ZhtuneError(f"cannot read document: {exc.strerror or exc}", where=str(path),
                          expected="a readable file") from None
    if b"\x00" in data[:4096]:
        raise ZhtuneError("document looks binary, not text", where=str(path),
                          expected="a UTF-8 or GB18030 text file (.txt/.md) or a .pdf")
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise ZhtuneError("document is neither UTF-8 nor GB18030 text", where=str(path),
                      expected="a UTF-8 or GB18030 text file", hint="convert it: iconv -f <enc> -t utf-8")


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise ZhtuneError("reading .pdf needs pypdf", where=str(path),
                          hint="pip install pypdf (or convert the file to .txt)") from None
    try:
        reader = PdfReader(str(path))
        return "\n\n".join((page.extract_text() or "") for page in reader.pages)
    except Exception as exc:  # noqa: BLE001 - pypdf raises many types for damaged files
        raise ZhtuneError(f"cannot read PDF: {exc}", where=str(path), expected="a readable PDF with text") from None


def load_documents(paths: list[str | os.PathLike]) -> list[Document]:
    """One Document per non-empty file; empty files are skipped with a note, all empty is an error."""
    docs, empty = [], []
    for path in collect_files(paths):
        text = read_text(path)
        if not text.strip():
            empty.append(str(path))
            continue
        docs.append(Document(page_content=text, metadata={"source": str(path), "sha256": file_sha256(path)}))
    if empty:
        print(f"跳过空文件 skipped empty file(s): {', '.join(empty)}", file=sys.stderr)
    if not docs:
        raise ZhtuneError("the documents contain no text", where=", ".join(empty) or "--docs",
                          expected="at least one non-empty .txt/.md/.pdf file")
    return docs


def make_splitter(chunk_size: int = 300, chunk_overlap: int = 50) -> RecursiveCharacterTextSplitter:
    if chunk_size < 20:
        raise ZhtuneError(f"chunk size {chunk_size} is too small", where="--chunk-size", expected="an integer >= 20")
    if not 0 <= chunk_overlap < chunk_size:
        raise ZhtuneError(f"chunk overlap {chunk_overlap} is out of range", where="--chunk-overlap",
                          expected=f"an integer in [0, {chunk_size})")
    return RecursiveCharacterTextSplitter(
        separators=CHINESE_SEPARATORS, is_separator_regex=True, keep_separator="end", chunk_size=chunk_size,
        chunk_overlap=chunk_overlap, add_start_index=True, strip_whitespace=True,
    )


def split_documents(docs: list[Document], chunk_size: int = 300, chunk_overlap: int = 50) -> list[Document]:
    """Chunks with metadata source, chunk (1-based within its file) and line (where the chunk starts)."""
    splitter = make_splitter(chunk_size, chunk_overlap)
    chunks: list[Document] = []
    for doc in docs:
        text = doc.page_content
        for number, piece in enumerate(splitter.split_documents([doc]), start=1):
            start = piece.metadata.pop("start_index", -1)
            line = text.count("\n", 0, start) + 1 if start >= 0 else 0
            piece.metadata.update(chunk=number, line=line)
            piece.metadata.pop("sha256", None)
            chunks.append(piece)
    return chunks
