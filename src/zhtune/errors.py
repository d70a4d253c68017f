"""ZhtuneError: the one user-facing error type; the CLI prints it without a traceback and exits 2."""

from __future__ import annotations


class ZhtuneError(Exception):
    """A mistake the user can fix: what went wrong, where, what was expected, and a hint.

    >>> raise ZhtuneError("record has no 'output' field", where="data.jsonl:12",
    ...                   expected="an alpaca record with instruction/input/output")
    """

    def __init__(self, what: str, *, where: str | None = None, expected: str | None = None,
                 hint: str | None = None):
        super().__init__(what)
        self.what = what
        self.where = where
        self.expected = expected
        self.hint = hint

    def __str__(self) -> str:
        parts = [self.what]
        if self.where:
            parts.append(f"where: {self.where}")
        if self.expected:
            parts.append(f"expected: {self.expected}")
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return " | ".join(parts)

    def render(self) -> str:
        """The bilingual block the CLI prints."""
        lines = [f"错误 error: {self.what}"]
        if self.where:
            lines.append(f"  位置 where:    {self.where}")
        if self.expected:
            lines.append(f"  应为 expected: {self.expected}")
        if self.hint:
            lines.append(f"  提示 hint:     {self.hint}")
        return "\n".join(lines)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same cleanup runs (temporaries removed, locks released); exit 143."""
