"""Data at corpus scale: the cached path (units tokenised in parallel, blocks cut in one ordered pass) and the
streaming path give exactly the blocks of the in-memory path zhtune had before; every input format reads
the same records; a corrupt file among many keeps the others' work; a killed preparation resumes; one
process builds the cache while the others wait; preparation fits under a memory cap the old path did not."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from zhtune import tiny
from zhtune.config import TrainConfig
from zhtune.data import files, pretrain
from zhtune.data.pretrain import build_pretrain_dataset
from zhtune.data.readers import read_records
from zhtune.data.streaming import build_streaming_dataset
from zhtune.errors import ZhtuneError

IGNORE = -100


@pytest.fixture(scope="module")
def tok(base_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_tokenizer_dir))


@pytest.fixture(scope="module")
def lines() -> list[str]:
    text = tiny.asset("zh_corpus.txt").read_text(encoding="utf-8").splitlines()
    return [x if i % 37 else "  " for i, x in enumerate(text)]          # a few blank documents too


def reference_blocks(texts: list[str], tok, size: int) -> list[tuple[list, list, list]]:
    """The in-memory path zhtune had before data/prepare.py (whole-corpus numpy arrays), kept as the reference."""
    eos = tok.eos_token_id
    docs = [d if d[-1] == eos else d + [eos] for d in tok([t for t in texts if t.strip()])["input_ids"]]
    lengths = np.array([len(d) for d in docs])
    flat = np.concatenate([np.array(d) for d in docs])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    labels = flat.copy()
    labels[starts] = IGNORE
    total = len(flat)
    position = np.arange(total) - np.maximum(np.repeat(starts, lengths), np.arange(total) // size * size)
    return [(flat[a:a + size].tolist(), labels[a:a + size].tolist(), position[a:a + size].tolist())
            for a in range(0, total, size)]


def rows_of(ds) -> list[tuple[list, list, list]]:
    return [(list(r["input_ids"]), list(r["labels"]), list(r["position_ids"])) for r in ds]


def write_formats(folder: Path, lines: list[str]) -> list[str]:
    """The corpus over four files in four formats, in the order a folder is read; the texts in that order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    parts = [lines[:150], lines[150:250], lines[250:330], lines[330:]]
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("\n".join(parts[0]) + "\n", encoding="utf-8")
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": x}, ensure_ascii=False) + "\n" for x in parts[1])
    pq.write_table(pa.table({"text": parts[2]}), folder / "c.parquet", row_group_size=20)
    (folder / "d").mkdir()
    blob = "".join(json.dumps({"text": x}, ensure_ascii=False) + "\n" for x in parts[3]).encode("utf-8")
    (folder / "d" / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(blob))
    return [x for part in parts for x in part]


def test_cached_and_streaming_blocks_equal_the_in_memory_path(tok, lines, tmp_path, monkeypatch):
    monkeypatch.setattr(files, "MIN_CHUNK", 4096)        # a.txt is cut into byte ranges: several units
    monkeypatch.setattr(pretrain, "BATCH_DOCS", 5)       # many batches: the unfinished block is carried over
    texts = write_formats(tmp_path / "corpus", lines)
    want = reference_blocks(texts, tok, 64)
    cfg = TrainConfig(stage="pt", dataset=[str(tmp_path / "corpus")], cutoff_len=64, preprocessing_num_workers=2,
                      data_cache=str(tmp_path / "cache"))
    data = build_pretrain_dataset(cfg, tok)
    assert len(list((tmp_path / "cache" / "units").iterdir())) > 6
    assert rows_of(data.train) == want
    files_used = [f["filename"] for f in data.train.cache_files]
    assert files_used and all(f.startswith(str(tmp_path / "cache")) for f in files_used)   # memory-mapped
    assert data.stats["skipped"]["empty text"] == {"count": 11, "first": str(tmp_path / "corpus" / "a.txt") + ":1"}

    stream = build_streaming_dataset(TrainConfig(stage="pt", dataset=[str(tmp_path / "corpus")], cutoff_len=64,
                                                 streaming=True, max_steps=1), tok).train
    got = [(r["input_ids"].tolist(), r["labels"].tolist(), r["position_ids"].tolist())
           for r in itertools.islice(iter(stream), len(want) + 2)]
    assert got[:len(want) - 1] == want[:-1]
    # the cached path ends with a short block; the stream goes on into the next pass over the corpus
    assert [g[:len(want[-1][0])] for g in got[len(want) - 1]] == list(want[-1])


def test_every_input_format_reads_the_same_records(tmp_path, lines):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = lines[:60]
    rows = [{"text": x} for x in texts]
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    (tmp_path / "a.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    (tmp_path / "a.json.xz").write_bytes(__import__("lzma").compress(json.dumps(rows).encode()))
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", row_group_size=7)
    with pa.OSFile(str(tmp_path / "a.arrow"), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("text", pa.string())])) \
            as writer:                                   # the IPC file format (Feather v2), not datasets' stream
        writer.write_table(pa.table({"text": texts}))
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp_path / "dict"))
    for name in ("a.txt", "a.json", "a.jsonl.gz", "a.jsonl.zst", "a.json.xz", "a.parquet", "a.arrow", "saved", "dict"):
        recs = list(read_records([str(tmp_path / name)]))
        assert [r.data["text"] for r in recs] == texts, name
    assert [r.source for r in read_records([str(tmp_path / "a.parquet")])][8] == f"{tmp_path / 'a.parquet'}:row 8"
    assert list(read_records([str(tmp_path / "a.jsonl.gz")]))[3].source == f"{tmp_path / 'a.jsonl.gz'}:4"


def test_bad_files_are_named_with_their_line_or_row(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:-30])
    with pytest.raises(ZhtuneError, match="cannot read gz file") as err:
        list(read_records([str(tmp_path / "cut.jsonl.gz")]))
    assert err.value.where == str(tmp_path / "cut.jsonl.gz")
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n{"text": \n'))
    with pytest.raises(ZhtuneError, match="malformed JSON") as err:
        list(read_records([str(tmp_path / "bad.jsonl.gz")]))
    assert err.value.where == f"{tmp_path / 'bad.jsonl.gz'}:2"
    pq.write_table(pa.table({"body": ["fine", "also fine"], "text": [1, 2]}), tmp_path / "t.parquet")
    with pytest.raises(ZhtuneError, match="'text' is a int") as err:
        build_pretrain_dataset(TrainConfig(stage="pt", dataset=[str(tmp_path / "t.parquet")]), tok)
    assert err.value.where == f"{tmp_path / 't.parquet'}:row 0"
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ZhtuneError, match="cannot read parquet"):
        list(read_records([str(tmp_path / "broken.parquet")]))


def test_a_corrupt_file_among_many_keeps_the_work_on_the_others(tok, lines, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(files, "MIN_CHUNK", 1024)        # every file is its own unit (or several)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    chunks = [lines[i:i + 40] for i in range(0, 240, 40)]
    for i, chunk in enumerate(chunks):
        (corpus / f"part{i}.txt").write_text("\n".join(chunk) + "\n", encoding="utf-8")
    good = (corpus / "part3.txt").read_bytes()
    (corpus / "part3.txt").write_bytes(good.replace("。".encode(), b"\xff", 1))
    cfg = TrainConfig(stage="pt", dataset=[str(corpus)], cutoff_len=64, data_cache=str(tmp_path / "cache"))
    with pytest.raises(ZhtuneError, match="not UTF-8") as err:
        build_pretrain_dataset(cfg, tok)
    assert "part3.txt:" in err.value.where
    done = len(list((tmp_path / "cache" / "units").glob("*/meta.json")))
    assert done >= 3                                     # part0-2 are tokenised and kept
    (corpus / "part3.txt").write_bytes(good)
    capsys.readouterr()
    data = build_pretrain_dataset(cfg, tok)
    assert f"resuming: {done} of" in capsys.readouterr().out
    assert rows_of(data.train) == reference_blocks([x for c in chunks for x in c], tok, 64)


def test_line_ranges_of_a_big_file_are_remembered(tmp_path, lines, monkeypatch):
    """The second plan of a file reads its ranges from data_cache/plans (no newline scan); a damaged plan is
    scanned again and rewritten, and a changed file gets a plan of its own."""
    monkeypatch.setattr(files, "MIN_CHUNK", 4096)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    plans = tmp_path / "plans"
    first = files.plan_units([str(corpus)], "dataset", None, plans)
    assert len(first) > 3 and len(list(plans.glob("*.json"))) == 1
    scans = []
    real = files.line_ranges
    monkeypatch.setattr(files, "line_ranges", lambda source: scans.append(source) or real(source))
    assert [u.segments for u in files.plan_units([str(corpus)], "dataset", None, plans)] == \
        [u.segments for u in first] and not scans
    for damage in ("[[0, 5", "{}", "[[0, 99, 1], [7, null, 3]]", "[]"):
        next(plans.glob("*.json")).write_text(damage)
        assert [u.segments for u in files.plan_units([str(corpus)], "dataset", None, plans)] == \
            [u.segments for u in first]
    assert len(scans) == 4 and json.loads(next(plans.glob("*.json")).read_text())[0][0] == 0
    corpus.write_text("\n".join(lines[::-1]) + "\n", encoding="utf-8")
    os.utime(corpus, ns=(1, 1))
    files.plan_units([str(corpus)], "dataset", None, plans)
    assert len(scans) == 5 and len(list(plans.glob("*.json"))) == 2


def test_a_damaged_cache_is_rebuilt_not_a_traceback(tok, lines, tmp_path, monkeypatch, capsys):
    """Issue 16's leftover: a cut-short stats.json, a unit's meta.json edited by hand, a final arrow file cut
    short: each is a stale cache (said, rebuilt, the same blocks); a rank that may not rebuild names it."""
    from zhtune.data import cache

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(lines[:120]) + "\n", encoding="utf-8")
    cfg = TrainConfig(stage="pt", dataset=[str(corpus)], cutoff_len=64, data_cache=str(tmp_path / "cache"))
    want = rows_of(build_pretrain_dataset(cfg, tok).train)
    entry = next((tmp_path / "cache").glob("pt-*/"))
    unit = next((tmp_path / "cache" / "units").glob("pt-*/"))
    damages = [lambda: (entry / "stats.json").write_text('{"stage": "pt", "rows'),
               lambda: (entry / "stats.json").write_text("[]"),
               lambda: ((unit / "meta.json").write_text('{"records": 1, "colour": 2}'),
                        (entry / "stats.json").unlink()),
               lambda: (entry / "train" / "data-00000.arrow").write_bytes(b"ARROW1\x00\x00 cut")]
    for damage in damages:
        damage()
        capsys.readouterr()
        data = build_pretrain_dataset(cfg, tok)
        said = capsys.readouterr().out
        assert "the data cache is damaged" in said, (damages.index(damage), said)
        assert rows_of(data.train) == want and data.stats["cache"] == "miss"
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp-" in p.name]    # nothing left aside
    (entry / "stats.json").write_text("{")
    monkeypatch.setenv("LOCAL_RANK", "1")               # may not rebuild: waits TAKEOVER_S, then names it
    monkeypatch.setattr(cache, "TAKEOVER_S", 0)
    monkeypatch.setattr(__import__("zhtune.data.prepare", fromlist=["x"]), "TAKEOVER_S", 0)
    with pytest.raises(ZhtuneError, match="damaged") as err:
        build_pretrain_dataset(cfg, tok)
    assert err.value.where == str(entry) and "delete" in err.value.hint


PREP_SCRIPT = """
import hashlib, json, sys
from transformers import AutoTokenizer
from zhtune.config import TrainConfig
from zhtune.data import files
from zhtune.data.pretrain import build_pretrain_dataset
files.MIN_CHUNK = 8192
tok = AutoTokenizer.from_pretrained(sys.argv[1])
cfg = TrainConfig(stage="pt", dataset=[sys.argv[2]], cutoff_len=64, data_cache=sys.argv[3])
data = build_pretrain_dataset(cfg, tok)
rows = [[r[k] for k in ("input_ids", "labels", "position_ids")] for r in data.train]
print("DIGEST", hashlib.sha256(json.dumps(rows).encode()).hexdigest(), data.stats["cache"], data.stats["cache_dir"])
"""


def _digest(rows) -> str:
    return hashlib.sha256(json.dumps([list(r) for r in rows]).encode()).hexdigest()


def test_kill_during_preparation_resumes_and_other_ranks_wait(tok, lines, tmp_path, base_tokenizer_dir):
    """kill -9 the builder mid-way; the rerun breaks the dead builder's lock and resumes from the finished
    parts while another rank (LOCAL_RANK 1) waits for it and loads the same folder; the blocks are those of
    the in-memory path."""
    corpus = tmp_path / "c.txt"
    texts = lines * 3
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    script = tmp_path / "prep.py"
    script.write_text(PREP_SCRIPT)
    cmd = [sys.executable, str(script), str(base_tokenizer_dir), str(corpus), str(tmp_path / "cache")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
    env["TOKENIZERS_PARALLELISM"] = "false"

    def start(rank: int) -> subprocess.Popen:
        return subprocess.Popen(cmd, env={**env, "LOCAL_RANK": str(rank), "RANK": str(rank)}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    builder = start(0)
    units, deadline = tmp_path / "cache" / "units", time.time() + 120
    while len(list(units.glob("*/meta.json"))) < 3:
        assert builder.poll() is None and time.time() < deadline, "preparation ended before it could be killed"
        time.sleep(0.005)
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    assert not list((tmp_path / "cache").glob("pt-*/stats.json"))     # it really died mid-way
    assert list((tmp_path / "cache").glob("pt-*.lock"))               # and left its lock behind

    waiter, builder = start(1), start(0)
    (out, err), (wout, werr) = builder.communicate(timeout=300), waiter.communicate(timeout=300)
    assert builder.returncode == 0 and waiter.returncode == 0, err[-2000:] + werr[-2000:]
    assert "resuming:" in out and "tokenising" not in werr           # the waiting rank tokenised nothing
    want = f"DIGEST {_digest(reference_blocks(texts, tok, 64))}"
    assert out.split("DIGEST")[1].split()[1] == "miss" and want in out
    assert wout.split("DIGEST")[1].split()[1] in ("waited", "hit") and want in wout
    assert out.split()[-1] == wout.split()[-1]                       # one folder for both
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp-" in p.name or p.name.endswith(".lock")]


def test_a_waiting_rank_stops_when_the_builder_died(tmp_path, monkeypatch):
    from zhtune.data import cache
    from zhtune.data.cache import BuildLock, build_once

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    final = tmp_path / "pt-x"
    lock = BuildLock(final)
    lock.path.mkdir(parents=True)
    (lock.path / "owner.json").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": dead.pid}))
    (lock.path / "heartbeat").touch()
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(cache, "TAKEOVER_S", 1.5)     # no rank 0 comes to break the dead lock
    with pytest.raises(ZhtuneError, match="stopped"):
        build_once(final, lambda tmp: None, print)
    monkeypatch.setenv("LOCAL_RANK", "0")              # a rank that may build takes the lock over and builds
    assert build_once(final, lambda tmp: (tmp / "stats.json").write_text("{}"), print) == "built"
    assert not lock.path.exists()


OLD_PATH = """
import numpy as np, datasets
from zhtune.data.pretrain import encode_documents
lines = [l for l in open(corpus, encoding="utf-8").read().split("\\n") if l.strip()]
raw = datasets.Dataset.from_dict({"text": lines})
features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
ds = raw.map(lambda b: {"input_ids": encode_documents(b["text"], tok)}, batched=True, batch_size=512,
             remove_columns=["text"], features=features)
col = ds.with_format("arrow")[:].column("input_ids").combine_chunks()
flat = col.flatten().to_numpy().astype(np.int32)
lengths = np.asarray(col.value_lengths(), dtype=np.int64)
starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
total = int(lengths.sum())
labels = flat.copy()
labels[starts] = -100
position = np.arange(total) - np.maximum(np.repeat(starts, lengths), np.arange(total) // 512 * 512)
rows = -(-total // 512)
"""

NEW_PATH = """
from zhtune.config import TrainConfig
from zhtune.data.pretrain import build_pretrain_dataset
rows = len(build_pretrain_dataset(TrainConfig(stage="pt", dataset=[corpus], cutoff_len=512,
                                              data_cache=cache), tok).train)
"""

CAPPED = """
import re, resource, sys
from transformers import AutoTokenizer
import zhtune.data.pretrain, datasets, numpy, pyarrow   # imported before the cap: only the work is measured
tok = AutoTokenizer.from_pretrained(sys.argv[1])
corpus, cache = sys.argv[2], sys.argv[3]
used = int(re.search(r"VmData:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (used + {cap} * 2**20,) * 2)
try:
{work}
except MemoryError:
    print("OUT OF MEMORY")
    sys.exit(3)
print("ROWS", rows)
"""


@pytest.mark.slow   # ~30 s: two subprocesses tokenise 4 million tokens each
def test_preparation_fits_under_a_memory_cap_the_old_path_exceeds(tmp_path, base_tokenizer_dir, lines):
    """RLIMIT_DATA caps the private memory the preparation may add (file-backed memory maps do not count:
    they are the point). 4 MB of Chinese is 4 M tokens here; the old path needs ~240 MB more for it (and
    grows ~60 bytes per token), the new one ~100 MB at any size."""
    import random

    rng, text, size = random.Random(0), [], 0
    while size < 4_000_000:
        doc = "".join(rng.choice(lines) for _ in range(rng.randint(1, 8)))
        text.append(doc)
        size += len(doc.encode("utf-8")) + 1
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(text) + "\n", encoding="utf-8")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", ARROW_DEFAULT_MEMORY_POOL="system", OMP_NUM_THREADS="1")
    results = {}
    for name, work in (("new", NEW_PATH), ("old", OLD_PATH)):
        script = tmp_path / f"{name}.py"
        script.write_text(CAPPED.format(cap=170, work=textwrap.indent(work.strip(), "    ")))
        results[name] = subprocess.run([sys.executable, str(script), str(base_tokenizer_dir), str(corpus),
                                        str(tmp_path / "cache")], env=env, capture_output=True, text=True, timeout=600)
    new, old = results["new"], results["old"]
    assert new.returncode == 0 and "ROWS" in new.stdout, new.stdout[-1000:] + new.stderr[-3000:]
    assert old.returncode == 3 and "OUT OF MEMORY" in old.stdout, (old.returncode, old.stderr[-2000:])
    assert int(new.stdout.split("ROWS ")[1].split()[0]) > 7000
