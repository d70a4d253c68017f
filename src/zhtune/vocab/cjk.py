"""Which characters count as Chinese: code-point ranges, a fast membership test, Han character counts.

    is_cjk = char_test(parse_ranges(DEFAULT_CJK_RANGES)); han_count("中文 ok") == 2

Used by `vocab merge` (which pieces a `preserve` merge may add), `vocab stats` and the benchmarks.
"""

from __future__ import annotations

import re

from zhtune.errors import ZhtuneError

# Characters a `preserve` merge may add pieces for (ideographs, CJK punctuation, full-width forms).
DEFAULT_CJK_RANGES = "2E80-2FDF,3000-303F,31C0-31EF,3400-4DBF,4E00-9FFF,F900-FAFF,FE30-FE4F,FF00-FFEF,20000-323AF"
# Han ideographs only: what "tokens per CJK character" counts (punctuation is not a character of text).
HAN_RANGES = "3007-3007,3400-4DBF,4E00-9FFF,F900-FAFF,20000-323AF"
_RANGE = r"\s*[0-9A-Fa-f]{2,6}(\s*-\s*[0-9A-Fa-f]{2,6})?\s*"
RANGES_RE = re.compile(rf"^{_RANGE}(,{_RANGE})*$")


def parse_ranges(text: str, flag: str = "--cjk-ranges") -> list[tuple[int, int]]:
    """'4E00-9FFF,3400-4DBF' -> [(0x4E00, 0x9FFF), (0x3400, 0x4DBF)] (hex code points, inclusive)."""
    if not RANGES_RE.match(text):
        raise ZhtuneError(f"not a list of code-point ranges: {text!r}", where=flag,
                          expected="hex ranges like 4E00-9FFF,3400-4DBF (a single code point is fine too)")
    out = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        lo_i, hi_i = int(lo, 16), int(hi or lo, 16)
        if lo_i > hi_i or hi_i > 0x10FFFF:
            raise ZhtuneError(f"bad code-point range {part.strip()!r}", where=flag,
                              expected="LOW-HIGH with LOW <= HIGH <= 10FFFF")
        out.append((lo_i, hi_i))
    return out


def char_test(ranges: list[tuple[int, int]]):
    """A fast `is this character in the ranges` test."""
    table = frozenset(cp for lo, hi in ranges if hi - lo < 400_000 for cp in range(lo, hi + 1))
    return lambda ch: ord(ch) in table


HAN = char_test(parse_ranges(HAN_RANGES))
CJK = char_test(parse_ranges(DEFAULT_CJK_RANGES))


def han_count(text: str) -> int:
    return sum(1 for ch in text if HAN(ch))


def has_cjk(text: str, is_cjk=CJK) -> bool:
    return any(is_cjk(ch) for ch in text)
