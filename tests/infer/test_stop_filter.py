"""StopFilter: stop strings never reach the caller; the answer's dummy-prefix space is dropped once."""

from zhtune.infer.engine import StopFilter


def test_leading_dummy_prefix_space_is_dropped_once():
    f = StopFilter([])
    assert f.feed("") == ("", False)
    assert f.feed(" 北京") == ("北京", False)
    assert f.feed(" 是首都") == (" 是首都", False)


def test_stop_string_split_across_pieces_is_held_back():
    f = StopFilter(["###"])
    assert f.feed("答案#") == ("答案", False)
    assert f.feed("## 下一题") == ("", True)
