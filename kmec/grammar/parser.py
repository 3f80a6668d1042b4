"""Text -> one file's Spec: the LALR parser and its error handling.

Contents:
    parser()      the lark LALR parser, built once from ``kmec.lark`` (package data)
    parse_tree()  text -> lark tree, or a located syntax Diagnostic
    build()       text -> Built (the file's own Spec, spans, anchors, includes,
                  diagnostics); never raises for bad input

Includes are not followed here (see ``kmec.grammar.loader``): this stage sees
one file. Syntax errors stop at the first one in a file (an LALR parser's later
errors are mostly echoes of the first); everything after parsing is collected.
"""

from __future__ import annotations

import functools
import logging

from lark import Lark, Tree
from lark.exceptions import UnexpectedInput, VisitError

from kmec.errors import Diagnostic, Span
from kmec.grammar.assemble import Built
from kmec.grammar.builder import SpecBuilder
from kmec.grammar.errors import syntax_diagnostic

log = logging.getLogger("kmec")


@functools.cache
def parser() -> Lark:
    """The LALR parser for ``.kmec`` text (built on first use, ~0.2 s)."""
    return Lark.open_from_package(
        "kmec", "kmec.lark", ("grammar",),
        parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=True,
    )


def parse_tree(text: str, file: str) -> Tree | Diagnostic:
    """Parse ``text`` into a lark tree, or return the located syntax error."""
    try:
        return parser().parse(text)
    except UnexpectedInput as e:
        return syntax_diagnostic(e, text, file, parser().parse)


def build(text: str, file: str = "<string>") -> Built | list[Diagnostic]:
    """Parse one file and build its own Spec.

    Args:
        text: the file's contents.
        file: the name spans carry.

    Returns:
        The :class:`Built` file, whose ``diagnostics`` may hold errors found while
        building; or, on a syntax error, a list with that one diagnostic.

    >>> built = build('relation r { prompt "{{ subject }} is" }')
    >>> built.spec.relations[0].prompt, built.diagnostics
    ('{{ subject }} is', [])
    """
    tree = parse_tree(text, file)
    if isinstance(tree, Diagnostic):
        return [tree]
    try:
        return SpecBuilder(file).transform(tree)
    except VisitError as e:  # lark wraps whatever a callback raised: report the cause
        cause = e.orig_exc
        log.debug("while building %s", file, exc_info=cause)
        meta = getattr(e.obj, "meta", None)
        span = (Span(file=file, line=meta.line, col=meta.column, end_line=meta.end_line,
                     end_col=meta.end_column)
                if meta is not None and not meta.empty else Span(file=file))
        return [Diagnostic(span, f"internal error while reading this statement: "
                           f"{type(cause).__name__}: {cause}",
                           "please report this as a kmec bug, with the spec")]
