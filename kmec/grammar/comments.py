"""Comments in spec text, and which statement each belongs to (for ``kmec fmt``).

Contents:
    Comment         one ``#`` comment: where it is, its text, its layout
    find_comments() every comment in (syntactically valid) spec text
    attach()        comments -> the statements they lead or trail

The Spec has no place for comments, so the formatter keeps them by position:
a comment on a line of its own leads the next statement (and moves with it);
a comment after code trails the innermost statement on that line. Comments
after the last statement stay at the end of the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kmec.errors import Span
from kmec.grammar.assemble import Key

_STRING_OR_COMMENT = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*')


@dataclass(frozen=True)
class Comment:
    """A comment; ``own_line`` if nothing but blanks precede it on its line."""

    line: int
    col: int
    text: str
    own_line: bool
    blank_after: bool  # the next line is blank (kept, so paragraphs stay apart)


def find_comments(text: str) -> list[Comment]:
    """Every comment in ``text`` (strings may contain ``#``).

    >>> [(c.line, c.text, c.own_line) for c in find_comments('# a\\nseed 1  # b "#"\\n')]
    [(1, '# a', True), (2, '# b "#"', False)]
    """
    lines = text.split("\n")
    found = []
    for n, line in enumerate(lines, start=1):
        if "#" not in line:
            continue
        for m in _STRING_OR_COMMENT.finditer(line):
            if m.group().startswith("#"):
                blank_after = n < len(lines) and not lines[n].strip()
                found.append(Comment(n, m.start() + 1, m.group().rstrip(),
                                     not line[:m.start()].strip(), blank_after))
                break
    return found


def attach(comments: list[Comment], anchors: list[tuple[Span, Key]]
           ) -> tuple[dict[Key, list[Comment]], dict[Key, list[Comment]], list[Comment]]:
    """Place comments: (leading by statement, trailing by statement, end of file)."""
    ordered = sorted(anchors, key=lambda a: (a[0].line, a[0].col))
    leading: dict[Key, list[Comment]] = {}
    trailing: dict[Key, list[Comment]] = {}
    tail: list[Comment] = []
    for c in comments:
        at = (c.line, c.col)
        if not c.own_line:
            inner = [key for span, key in ordered
                     if (span.line, span.col) < at and span.end_line >= c.line]
            if inner:
                trailing.setdefault(inner[-1], []).append(c)
                continue
        following = next((key for span, key in ordered if (span.line, span.col) > at), None)
        if following is None:
            tail.append(c)
        else:
            leading.setdefault(following, []).append(c)
    return leading, trailing, tail
