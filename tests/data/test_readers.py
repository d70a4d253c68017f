"""read_records / detect_format / to_messages: every supported layout, and bad input named by file:line."""

from __future__ import annotations

import json

import pytest

from zhtune.data.readers import Record, detect_format, read_records, to_messages
from zhtune.errors import ZhtuneError
from zhtune.tiny import write_jsonl


def messages_of(path, fmt="auto", columns=None):
    out = []
    for rec in read_records([str(path)], fmt, columns):
        out.append(to_messages(rec, detect_format(rec, fmt)))
    return out


def test_alpaca_with_input_system_and_history(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "翻译", "input": "hello", "output": "你好", "system": "你是翻译",
         "history": [["第一问", "第一答"]]},
        {"instruction": "问", "input": "", "output": "答"},
    ])
    first, second = messages_of(p)
    assert first == [{"role": "system", "content": "你是翻译"}, {"role": "user", "content": "第一问"},
                     {"role": "assistant", "content": "第一答"}, {"role": "user", "content": "翻译\nhello"},
                     {"role": "assistant", "content": "你好"}]
    assert second == [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]


def test_sharegpt_llm_magic_and_messages_become_the_same_conversation(tmp_path):
    want = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]
    rows = {
        "sharegpt": {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q1"},
                                       {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"},
                                       {"from": "gpt", "value": "a2"}]},
        "pairs": {"system": "S",
                  "conversation": [{"human": "q1", "assistant": "a1"}, {"human": "q2", "assistant": "a2"}]},
        "lists": {"system": "S", "human": ["q1", "q2"], "assistant": ["a1", "a2"]},
        "messages": {"messages": want},
    }
    for name, row in rows.items():
        assert messages_of(write_jsonl(tmp_path / f"{name}.jsonl", [row])) == [want], name


def test_trailing_user_turn_is_dropped(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "a"},
                                                         {"role": "user", "content": "q2"}]}])
    assert messages_of(p) == [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]


def test_columns_map_their_names_to_ours(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"question": "q", "answer": "a"}])
    assert messages_of(p, columns={"instruction": "question", "output": "answer"}) == [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]


def test_json_list_records_carry_their_line_numbers(tmp_path):
    p = tmp_path / "list.json"
    p.write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"text": "c"}], indent=2), encoding="utf-8")
    recs = list(read_records([str(p)]))
    assert [r.data["text"] for r in recs] == ["a", "b", "c"]
    assert [r.source for r in recs] == [f"{p}:2", f"{p}:5", f"{p}:8"]


def test_json_file_with_one_object_per_line(tmp_path):
    p = tmp_path / "lines.json"
    p.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert [r.source for r in read_records([str(p)])] == [f"{p}:1", f"{p}:2"]


def test_folders_are_read_recursively_and_txt_is_a_document_per_line(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "one.txt").write_text("第一行\n第二行\n", encoding="utf-8")
    write_jsonl(tmp_path / "d" / "sub" / "two.jsonl", [{"text": "第三"}])
    (tmp_path / "d" / "notes.md").write_text("ignored", encoding="utf-8")
    recs = list(read_records([str(tmp_path / "d")]))
    assert [r.data["text"] for r in recs] == ["第一行", "第二行", "第三"]
    assert recs[1].source.endswith("one.txt:2")


def test_max_samples_per_entry(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": str(i)} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": str(i)} for i in range(10)])
    assert len(list(read_records([str(a), str(b)], max_samples=3))) == 6


@pytest.mark.parametrize("content, line, words", [
    ('{"text": "ok"}\n{"text": "broken\n', 2, "malformed JSON"),
    ('{"text": "ok"}\n["not", "an", "object"]\n', 2, "not an object"),
])
def test_malformed_jsonl_names_the_line(tmp_path, content, line, words):
    p = tmp_path / "bad.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(ZhtuneError) as err:
        list(read_records([str(p)]))
    assert f"bad.jsonl:{line}" in str(err.value) and words in str(err.value)


def test_malformed_json_list_names_the_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n {"text": "a"},\n {"text": "b",}\n]\n', encoding="utf-8")
    with pytest.raises(ZhtuneError, match="bad.json:3"):
        list(read_records([str(p)]))


def test_missing_empty_and_unsupported_paths(tmp_path):
    with pytest.raises(ZhtuneError, match="dataset path not found.*nope.jsonl"):
        list(read_records([str(tmp_path / "nope.jsonl")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZhtuneError, match="no readable data files"):
        list(read_records([str(tmp_path / "empty")]))
    (tmp_path / "blank.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ZhtuneError, match="no records"):
        list(read_records([str(tmp_path / "blank.jsonl")]))
    (tmp_path / "x.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ZhtuneError, match="unsupported data file type"):
        list(read_records([str(tmp_path / "x.csv")]))
    with pytest.raises(ZhtuneError, match="no training data"):
        list(read_records([]))


def test_not_utf8_names_the_line(tmp_path):
    p = tmp_path / "gbk.txt"
    p.write_bytes("好\n".encode("utf-8") + "中文".encode("gbk") + b"\n")
    with pytest.raises(ZhtuneError, match="gbk.txt:2"):
        list(read_records([str(p)]))


@pytest.mark.parametrize("row, words", [
    ({"instruction": "q", "input": ""}, "no 'output' field"),
    ({"instruction": "q", "output": ["a", "b"]}, "'output' is a list"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, "history[0]"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]}, "turn 1"),
    ({"conversations": [{"from": "robot", "value": "q"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "string 'content'"),
    ({"human": ["a", "b"], "assistant": ["c"]}, "2 human turns but 1"),
    ({"question": "q", "answer": "a"}, "cannot tell the record format"),
])
def test_bad_records_name_file_line_and_expectation(tmp_path, row, words):
    p = write_jsonl(tmp_path / "r.jsonl", [{"instruction": "fine", "output": "ok"}, row])
    with pytest.raises(ZhtuneError) as err:
        for rec in read_records([str(p)]):
            to_messages(rec, detect_format(rec))
    assert words in str(err.value) and "r.jsonl:2" in str(err.value)
    assert err.value.expected


def test_txt_refuses_a_conversation_format(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("text\n", encoding="utf-8")
    with pytest.raises(ZhtuneError, match="format=alpaca"):
        list(read_records([str(p)], fmt="alpaca"))


def test_detect_format_by_keys():
    assert detect_format(Record("x:1", {"text": "a"})) == "text"
    assert detect_format(Record("x:1", {"instruction": "a", "output": "b"})) == "alpaca"
    assert detect_format(Record("x:1", {"prompt": "p", "chosen": "a", "rejected": "b"})) == "preference"
    assert detect_format(Record("x:1", {"instruction": "a"}), "messages") == "messages"


def test_a_hub_name_that_cannot_be_loaded_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ZhtuneError, match="could not be loaded from the Hub"):
        list(read_records(["someone/no-such-dataset"]))
