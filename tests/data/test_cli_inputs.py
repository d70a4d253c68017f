"""What a new user runs: `zhtune train stage=pt|sft|dpo dataset=[FOLDER]` on folders holding the formats big
corpora ship in (nested folders of .txt, .json, .jsonl.gz, .jsonl.zst, parquet and save_to_disk datasets).
The run prints the progress bar (ETA, tokens/s) and one data block (documents, tokens, blocks, time, the
cache folder and its size); a second run reuses the cache without tokenising again."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from zhtune import tiny
from zhtune.train.run import main


def _train(model: Path, out: Path, cache: Path, stage: str, data: Path, *extra: str) -> list[str]:
    return [f"model_name_or_path={model}", f"stage={stage}", f"dataset=[{data}]", f"output_dir={out}",
            f"data_cache={cache}", "max_steps=1", "per_device_train_batch_size=2", "report_to=none",
            "save_steps=1000", *extra]


@pytest.fixture(scope="module")
def corpus_folder(tmp_path_factory) -> tuple[Path, list[str]]:
    """260 Chinese documents over six files in six formats, two folders deep."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = tiny.asset_lines("zh_corpus.txt")[:260]
    folder = tmp_path_factory.mktemp("cli") / "语料 corpus"
    (folder / "sub" / "deep").mkdir(parents=True)
    (folder / "a.txt").write_text("\n".join(lines[:80]) + "\n", encoding="utf-8")
    with gzip.open(folder / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": x}, ensure_ascii=False) + "\n" for x in lines[80:120])
    pq.write_table(pa.table({"text": lines[120:160]}), folder / "sub" / "c.parquet", row_group_size=10)
    blob = "".join(json.dumps({"text": x}, ensure_ascii=False) + "\n" for x in lines[160:200]).encode("utf-8")
    (folder / "sub" / "deep" / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(blob))
    (folder / "f.json").write_text(json.dumps([{"text": x} for x in lines[200:230]], ensure_ascii=False),
                                   encoding="utf-8")
    datasets.Dataset.from_dict({"text": lines[230:]}).save_to_disk(str(folder / "saved"))
    return folder, lines


def test_pt_from_a_folder_of_every_format_prints_progress_and_summary_then_reuses(
        corpus_folder, tiny_model_dir, tmp_path, capsys):
    folder, lines = corpus_folder
    cache = tmp_path / "cache"
    assert main(_train(tiny_model_dir, tmp_path / "o1", cache, "pt", folder, "cutoff_len=32")) == 0
    got = capsys.readouterr()
    assert "分词 tokenising: 100%" in got.err and re.search(r"<\d\d:\d\d, .*[\d,]+ tokens/s\]", got.err)  # ETA
    head = re.search(r"数据 data \(pt\): (\d+) records → (\d+) documents → ([\d,]+) tokens → ([\d,]+) blocks of 32 "
                     r"in \d+s", got.out)
    assert head and int(head[1]) == int(head[2]) == len(lines)
    tokens, blocks = int(head[3].replace(",", "")), int(head[4].replace(",", ""))
    assert blocks == -(-tokens // 32)
    entry = re.search(r"缓存 cache: (\S+) \(([\d.]+ [KMG]?B), built 新建", got.out)
    assert entry and Path(entry[1]).parent == cache and (Path(entry[1]) / "train").is_dir()
    assert "数据 data." not in got.out                   # one data block, not a dump of the stats dict

    assert main(_train(tiny_model_dir, tmp_path / "o2", cache, "pt", folder, "cutoff_len=32")) == 0
    again = capsys.readouterr()
    assert f"缓存 cache: {entry[1]} ({entry[2]}, reused 复用" in again.out and "分词 tokenising" not in again.err
    assert f"{len(lines)} records → {len(lines)} documents → {head[3]} tokens → {head[4]} blocks" in again.out


def test_sft_and_dpo_from_folders_name_records_by_file_and_row(tiny_model_dir, tmp_path, capsys):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in tiny.asset("sft_qa.jsonl").read_text(encoding="utf-8").splitlines()]
    sft = tmp_path / "sft"
    (sft / "more").mkdir(parents=True)
    with gzip.open(sft / "a.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:24])
    pq.write_table(pa.Table.from_pylist(rows[24:]), sft / "more" / "b.parquet")
    assert main(_train(tiny_model_dir, tmp_path / "o1", tmp_path / "cache", "sft", sft, "cutoff_len=128")) == 0
    out = capsys.readouterr().out
    assert f"数据 data (sft): {len(rows)} records → " in out
    assert re.search(r"\(first at \S+/more/b\.parquet:row \d+\)", out)   # a skip or cut names its file:row

    nouns = ["river", "garden", "house", "teacher", "window", "market", "engine", "letter"]
    pairs = [{"prompt": f"Tell me about the {n}.", "chosen": f"The {n} is good.", "rejected": f"Stupid {n}."}
             for n in nouns]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs)}).save_to_disk(str(tmp_path / "dpo" / "saved"))
    assert main(_train(tiny_model_dir, tmp_path / "o2", tmp_path / "cache", "dpo", tmp_path / "dpo",
                       "cutoff_len=64")) == 0
    out = capsys.readouterr().out
    assert f"数据 data (dpo): {len(pairs)} records → {len(pairs)} pairs" in out and "缓存 cache:" in out
