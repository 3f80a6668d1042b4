"""Syntax errors -> located, named diagnostics.

Contents:
    EXAMPLES            the ``match_examples`` table: bad snippets -> the mistake they show
    KEYWORDS            every keyword of the language, and where each belongs
    syntax_diagnostic() a lark UnexpectedInput -> Diagnostic with a message a person can act on

An LALR parser fails in a *state*; every snippet in :data:`EXAMPLES` fails in
the state that a common mistake leads to, so lark's ``match_examples`` names
the mistake ("missing `->`"). The example errors are computed once and reused.
Mistakes that depend on the token rather than the state (an unknown keyword
anywhere, a block that is never closed, an unquoted string) are recognised
from the token and the set of tokens the parser expected.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from kmec.errors import Diagnostic, Span, did_you_mean

TOP = ("model", "seed", "order", "method", "weights", "budget", "chat", "include", "relation",
       "edit", "claim")
IN_RELATION = ("prompt", "paraphrase", "reverse", "subjects")
IN_EDIT = ("subject", "prompt", "old", "scope", "preserve", "portability", "expect")
OPTIONS = ("layers", "max_delta", "from", "relation", "sample", "neighbours", "neighbors",
           "of", "kl", "protocol", "heldout", "system")
STATEMENTS = frozenset(TOP + IN_RELATION + IN_EDIT)
KEYWORDS = STATEMENTS | frozenset(OPTIONS)

EXAMPLES: dict[str, list[str]] = {
    "missing_target": ['edit a { prompt "p" -> }', 'edit a { subject "s" relation r -> }',
                       'edit a { subject "s" relation r "o" -> }',
                       'edit a { portability "p" -> }'],
    "missing_arrow": ['edit a { prompt "p" }', 'edit a { subject "s" relation r "o" }'],
    "missing_probe_arrow": ['edit a { portability "p" }'],
    "missing_change": ['edit a { subject "s" relation r }'],
    "missing_relation": ['edit a { subject "s" "o" -> "n" }'],
    "claim_ge": ["claim efficacy 0.9"],
    "claim_threshold": ["claim efficacy >= }"],
    "block_name": ["edit {", "relation {"],
    "block_open": ["edit a prompt", "relation r prompt"],
    "unquoted": ["model m", "include f", 'relation r { prompt p }', 'edit a { prompt p }',
                 'edit a { subject s }', 'edit a { scope s }', 'edit a { preserve s }',
                 'edit a { old s }', 'relation r { subjects s }', 'relation r { reverse s }',
                 'relation r { paraphrase s }', 'relation r { subjects from f }'],
    "whole_number": ["seed x", "claim efficacy >= 0.9 sample x", "method rome layers x"],
    "chat_mode": ["chat"],
    "missing_brace": ['edit a { prompt "p" -> "t"', 'relation r { prompt "p"'],
}

_DESCRIBE = {"ARROW": "`->`", "GE": "`>=`", "DOTDOT": "`..`", "LBRACE": "`{`", "RBRACE": "`}`",
             "STRING": "a string", "NAME": "a name", "INT": "a whole number",
             "SIGNED_INT": "a whole number", "SIGNED_NUMBER": "a number",
             "$END": "the end of the file"}


@dataclass(frozen=True)
class _Block:
    kind: str  # "edit" or "relation"
    name: str
    span: Span  # from the keyword to the `{`


_TOKENS = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|->|[{}]|[A-Za-z_][\w-]*|\S')


def _open_blocks(text: str, upto: int, file: str) -> list[_Block]:
    """The blocks still open at offset ``upto`` (a stack, innermost last)."""
    stack: list[_Block] = []
    words: list[tuple[str, int]] = []  # the last two words and their offsets
    for m in _TOKENS.finditer(text, 0, upto):
        tok = m.group()
        if tok == "{":
            kind, name = (words[-2][0], words[-1][0]) if len(words) >= 2 else ("block", "?")
            start = words[-2][1] if len(words) >= 2 else m.start()
            stack.append(_Block(kind, name, _span(text, start, m.end(), file)))
            words.clear()
        elif tok == "}":
            if stack:
                stack.pop()
            words.clear()
        elif tok[0].isalpha() or tok[0] == "_":
            words = [*words[-1:], (tok, m.start())]
    return stack


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _span(text: str, start: int, end: int, file: str) -> Span:
    line, col = _position(text, start)
    end_line, end_col = _position(text, end)
    return Span(file=file, line=line, col=col, end_line=end_line, end_col=end_col)


def _end_span(text: str, file: str) -> Span:
    """Just after the last character that is not blank or a comment."""
    stripped = re.sub(r"#[^\n]*", lambda m: " " * len(m.group()), text).rstrip()
    return _span(text, len(stripped), len(stripped) + 1, file)


def _by_position(e: UnexpectedInput) -> UnexpectedInput:
    """Make ``e.state`` the LALR state number.

    lark compares whole parser states (stack depth included), so a mistake
    after two statements would not match the same mistake after one; the
    state on top of the stack is what identifies the mistake.
    """
    position = getattr(e.state, "position", None)
    if position is not None:
        e.state = position
    return e


@functools.cache
def _example_error(parse_fn: Callable[[str], object], snippet: str) -> UnexpectedInput | None:
    try:
        parse_fn(snippet)
    except UnexpectedInput as e:
        return _by_position(e)
    return None


def _match(e: UnexpectedInput, parse_fn: Callable[[str], object]) -> str | None:
    """lark's match_examples, with each example's error computed once."""
    _by_position(e)

    def replay(snippet: str) -> object:
        err = _example_error(parse_fn, snippet)
        if err is not None:
            raise err.with_traceback(None)
        return None

    return e.match_examples(replay, EXAMPLES, token_type_match_fallback=True)


@dataclass(frozen=True)
class _Ctx:
    """What a message is made from."""

    text: str
    file: str
    found: str  # the token type found
    value: str  # its text
    span: Span
    offset: int  # of the token in text
    expected: frozenset[str]
    blocks: list[_Block]


def _found(ctx: _Ctx) -> str:
    if ctx.found == "$END":
        return "the end of the file"
    if ctx.found.lower() in KEYWORDS and ctx.value == ctx.found.lower():
        return f"`{ctx.value}`"
    if ctx.found == "STRING":
        return f"the string {ctx.value}"
    if ctx.found == "NAME":
        return f"the name `{ctx.value}`"
    if ctx.found in ("INT", "SIGNED_INT", "SIGNED_NUMBER"):
        return f"the number `{ctx.value}`"
    return f"`{ctx.value}`" if ctx.value else ctx.found


def _expected(ctx: _Ctx) -> str:
    names = sorted({_DESCRIBE.get(t, f"`{t.lower()}`") for t in ctx.expected})
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _where(ctx: _Ctx) -> str:
    if not ctx.blocks:
        return "at the top level"
    b = ctx.blocks[-1]
    return f"in {b.kind} `{b.name}`"


_OPTION_HOMES = {"layers": "after `method NAME`", "max_delta": "after `method NAME`",
                 "from": 'in `subjects from "file"`, inside a relation block',
                 "relation": 'at the top level, or in an edit: subject "S" relation NAME ...',
                 **{w: "after `claim METRIC >= THRESHOLD`"
                    for w in ("sample", "neighbours", "neighbors", "of", "kl", "protocol")}}


def _home(word: str) -> str | None:
    """Where a keyword can be used (None for a word that is not a keyword)."""
    if word in _OPTION_HOMES:
        return _OPTION_HOMES[word]
    if word in TOP:
        return "at the top level"
    in_relation, in_edit = word in IN_RELATION, word in IN_EDIT
    if in_relation and in_edit:
        return "inside a relation or an edit block"
    if in_relation:
        return "inside a relation block"
    return "inside an edit block" if in_edit else None


def _missing_brace(ctx: _Ctx) -> tuple[Span, str, str | None]:
    block = ctx.blocks[-1] if ctx.blocks else None
    what = f"the {block.kind} block `{block.name}`" if block else "a block"
    if ctx.found == "$END" and block is not None:
        return block.span, f"missing `}}`: {what} opened here is never closed", \
            "add `}` after its last statement"
    line = f" (line {block.span.line})" if block else ""
    return ctx.span, f"missing `}}` before {_found(ctx)}: {what}{line} is not closed", \
        "add `}` after the block's last statement"


def _unknown_word(ctx: _Ctx) -> tuple[Span, str, str | None]:
    word = ctx.value
    home = _home(word) if ctx.found == word.upper() else None  # a keyword out of place
    if home is not None:
        return ctx.span, f"`{word}` cannot be used {_where(ctx)}", f"`{word}` belongs {home}"
    keywords = [t.lower() for t in ctx.expected if t.lower() in KEYWORDS]
    what = "statement" if all(k in STATEMENTS for k in keywords) else "keyword"
    return ctx.span, f"unknown {what} `{word}` {_where(ctx)}", \
        did_you_mean(word, keywords) or f"expected {_expected(ctx)}"


def _expected_string(ctx: _Ctx) -> tuple[Span, str, str | None]:
    if ctx.found in ("NAME", "INT", "SIGNED_INT", "SIGNED_NUMBER") or \
            ctx.found.lower() in KEYWORDS:
        end = ctx.offset + len(ctx.value)
        more = re.match(r"[ \t]+[\w'.,-]", ctx.text[end:end + 2]) is not None
        hint = f'write "{ctx.value} ..." in double quotes' if more else f'write "{ctx.value}"'
        return ctx.span, f"unquoted text `{ctx.value}`: expected a string in double quotes", hint
    return ctx.span, f"expected a string in double quotes, found {_found(ctx)}", None


_CHANGE = 'a change is written "old" -> "new"; the old value is optional: -> "new"'
_NAMED: dict[str, Callable[[_Ctx], tuple[Span, str, str | None]]] = {
    "missing_target": lambda c: (c.span, f"missing the new value after `->` (found {_found(c)})",
                                 'write it as a string: -> "new"'),
    "missing_arrow": lambda c: (c.span, f"missing `->` before {_found(c)}", _CHANGE),
    "missing_probe_arrow": lambda c: (c.span, f"missing `->` before {_found(c)}",
                                      'a portability probe is written "prompt" -> "answer"'),
    "missing_change": lambda c: (c.span, f"missing the change after the relation, "
                                 f"found {_found(c)}", _CHANGE),
    "missing_relation": lambda c: (c.span, f"missing `relation NAME` before {_found(c)}",
                                   'a triple edit reads: subject "S" relation NAME "old" -> "new"'),
    "claim_ge": lambda c: (c.span, f"missing `>=` before {_found(c)}",
                           "a claim is written: claim METRIC >= THRESHOLD"),
    "claim_threshold": lambda c: (c.span, f"missing the threshold after `>=`, found {_found(c)}",
                                  "a claim is written: claim METRIC >= THRESHOLD"),
    "block_name": lambda c: (c.span, f"missing the block's name before {_found(c)}",
                             "write `edit NAME {` or `relation NAME {`"),
    "block_open": lambda c: (c.span, f"missing `{{` before {_found(c)}",
                             "a block is written `edit NAME { ... }`"),
    "unquoted": _expected_string,
    "whole_number": lambda c: (c.span, f"expected a whole number, found {_found(c)}", None),
    "chat_mode": lambda c: (c.span, f"missing `on` or `off` after `chat`, found {_found(c)}",
                            'write `chat on` (or `chat on system "..."`)'),
    "missing_brace": _missing_brace,
    "unmatched_brace": lambda c: (c.span, "unmatched `}`: no block is open here",
                                  "remove it, or add the `edit NAME {` it closes"),
}


def _classify(ctx: _Ctx, label: str | None) -> str | None:
    """Rules that look at the token found; they win over a state match."""
    top_level_word = ctx.found.lower() in TOP and ctx.value in TOP
    if "RBRACE" in ctx.expected and ctx.blocks and (ctx.found == "$END" or top_level_word):
        return "missing_brace"
    if label == "missing_brace":  # the state fits, but the token does not say so
        label = None
    if ctx.found == "RBRACE" and not ctx.blocks:
        return "unmatched_brace"
    keywords = [t.lower() for t in ctx.expected if t.lower() in KEYWORDS]
    if ctx.value in KEYWORDS and ctx.found == ctx.value.upper() and keywords:
        return "unknown_word"  # a keyword out of place
    if ctx.found == "NAME" and "NAME" not in ctx.expected and keywords:
        if label in ("missing_relation", "block_open") and not did_you_mean(ctx.value, keywords):
            return label
        return "unknown_word"
    if label is None and ctx.expected == {"STRING"}:
        return "unquoted"
    return label


def syntax_diagnostic(e: UnexpectedInput, text: str, file: str,
                      parse_fn: Callable[[str], object]) -> Diagnostic:
    """A located, named diagnostic for a lark syntax error in ``text``."""
    if isinstance(e, UnexpectedCharacters):
        return _bad_character(e, text, file)
    token = getattr(e, "token", None)
    found = getattr(token, "type", "$END")
    if found in ("$END", "<EOF>"):
        found = "$END"
        span = _end_span(text, file)
        value, offset = "", len(text)
    else:
        offset = token.start_pos or 0
        value = str(token)
        span = _span(text, offset, offset + len(value), file)
    expected = frozenset(getattr(e, "accepts", None) or getattr(e, "expected", ()) or ())
    ctx = _Ctx(text, file, found, value, span, offset, expected,
               _open_blocks(text, offset, file))
    label = _classify(ctx, _match(e, parse_fn) if isinstance(e, UnexpectedToken) else None)
    if ctx.found == "NAME" and offset > 0 and text[offset - 1] == '"':
        at, message, hint = span, f"unexpected text `{ctx.value}` right after a string", \
            'a `"` ends a string: is a quote missing, or should it be written \\"?'
    elif label == "unknown_word":
        at, message, hint = _unknown_word(ctx)
    elif label is not None:
        at, message, hint = _NAMED[label](ctx)
    else:
        at, message, hint = span, f"expected {_expected(ctx)}, found {_found(ctx)}", None
    return Diagnostic(at, message, hint)


def _bad_character(e: UnexpectedCharacters, text: str, file: str) -> Diagnostic:
    pos = e.pos_in_stream
    ch = text[pos] if pos < len(text) else ""
    if ch == '"':
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        return Diagnostic(_span(text, pos, end, file), "unterminated string",
                          'a string ends with `"` on the same line; write \\" for a quote inside')
    if ch == "%":
        percent = _percentage(text, pos, file)
        if percent is not None:
            return percent
    hints = {"'": "strings are written in double quotes",
             ">": "a claim is written: claim METRIC >= THRESHOLD",
             "=": "a claim is written: claim METRIC >= THRESHOLD",
             "<": "claims are lower bounds: claim METRIC >= THRESHOLD",
             "-": 'a change is written "old" -> "new"'}
    shown = ch if ch.isprintable() and ch.strip() else f"\\u{ord(ch):04x}" if ch else "?"
    return Diagnostic(_span(text, pos, pos + 1, file), f"unexpected character `{shown}`",
                      hints.get(ch))


_PERCENT = re.compile(r"(>=\s*)?([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*$")


def _percentage(text: str, pos: int, file: str) -> Diagnostic | None:
    """``>= 50%``: a threshold written as a percentage, with the fraction to write instead
    (None when no number stands right before the ``%``)."""
    m = _PERCENT.search(text, max(0, pos - 40), pos)
    if m is None:
        return None
    fraction = f"{float(m.group(2)) / 100:g}"
    write = f">= {fraction}" if m.group(1) else fraction
    return Diagnostic(_span(text, m.start(2), pos + 1, file),
                      f"`{text[m.start(2):pos + 1]}` is a percentage",
                      f"thresholds are fractions: write {write}")
