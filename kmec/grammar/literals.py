"""String and number literals of the ``.kmec`` language.

Contents:
    unquote()        a STRING token's text -> its value, or the offset and reason it is bad
    quote()          a value -> the canonical STRING literal (round-trip partner of unquote)
    format_number()  a float -> the shortest literal that reads back to the same float

Strings are double-quoted, on one line, with the escapes ``\\"`` ``\\\\`` ``\\n``
``\\t`` ``\\r`` and ``\\uXXXX`` (a surrogate pair of ``\\u`` escapes makes one
character, as in JSON). The formatter escapes control and line-separator
characters, and nothing else: non-ASCII text stays readable.
"""

from __future__ import annotations

import re
import unicodedata

_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}
_QUOTE_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_HEX4 = re.compile(r"[0-9A-Fa-f]{4}")


class LiteralError(ValueError):
    """A bad escape in a string literal; ``offset`` is the index in the token text."""

    def __init__(self, message: str, offset: int, width: int = 2) -> None:
        super().__init__(message)
        self.offset = offset
        self.width = width


def unquote(token: str) -> str:
    """The value of a STRING token (which includes its quotes).

    Raises:
        LiteralError: for an unknown escape, a short ``\\u`` escape or a lone surrogate.

    >>> unquote(r'"say \\"hi\\"\\n"')
    'say "hi"\\n'
    >>> unquote(r'"caf\\u00e9"')
    'café'
    >>> unquote(r'"\\q"')
    Traceback (most recent call last):
    ...
    kmec.grammar.literals.LiteralError: unknown escape '\\q' in a string
    """
    body = token[1:-1]
    if "\\" not in body:
        return body
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1]
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
            i += 2
        elif e == "u" and _HEX4.fullmatch(body, i + 2, i + 6):
            out.append(chr(int(body[i + 2:i + 6], 16)))
            i += 6
        elif e == "u":
            raise LiteralError("'\\u' must be followed by four hex digits", i + 1)
        else:
            raise LiteralError(f"unknown escape '\\{e}' in a string", i + 1)
    return _join_surrogates("".join(out), token)


def _join_surrogates(value: str, token: str) -> str:
    if not any("\ud800" <= ch <= "\udfff" for ch in value):
        return value
    try:
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeDecodeError:
        at = re.search(r"\\u[dD][89a-fA-F]", token)
        offset = at.start() if at else 0
        raise LiteralError("a lone surrogate escape is not a character", offset, 6) from None


def _needs_escape(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp")


def quote(value: str) -> str:
    """The canonical STRING literal for ``value``.

    >>> quote('The "capital"\\tof')
    '"The \\\\"capital\\\\"\\\\tof"'
    >>> unquote(quote("a\\u2028b\\x00c")) == "a\\u2028b\\x00c"
    True
    """
    parts = ['"']
    for ch in value:
        if ch in _QUOTE_ESCAPES:
            parts.append(_QUOTE_ESCAPES[ch])
        elif _needs_escape(ch):
            parts.append(f"\\u{ord(ch):04x}")
        else:
            parts.append(ch)
    parts.append('"')
    return "".join(parts)


def format_number(value: float) -> str:
    """The shortest literal that reads back to ``value``.

    >>> format_number(0.99), format_number(1.0), format_number(1e-06)
    ('0.99', '1.0', '1e-06')
    """
    return repr(float(value))
