"""Parse tree -> Spec: the lark Transformer that builds spec nodes, with spans.

Contents:
    SpecBuilder  the Transformer (one instance per file); ``transform(tree)``
                 returns a :class:`kmec.grammar.assemble.Built`

The builder validates what the grammar leaves open on purpose: names from
closed sets (methods, metrics, protocols...), string escapes, numbers, repeated
settings and the shape of an edit block. Problems become diagnostics; the
builder itself never raises, so every problem in a file is reported at once.
Values the Spec can represent (a threshold of 1.5, a negative layer) are
left for ``check``, which also runs on Specs built in Python.
"""

from __future__ import annotations

import math
from typing import Any

from lark import Token, Transformer, v_args

from kmec.errors import Diagnostic, Span, did_you_mean
from kmec.grammar.assemble import Built, Key, Stmt, Val, assemble_edit, assemble_spec
from kmec.grammar.literals import LiteralError, unquote
from kmec.spec import METHODS, METRICS, Claim, Probe, Relation

PROTOCOLS = ("prob", "token", "greedy")
MAX_LAYERS = 4096  # a range is expanded into a tuple: bound it
MAX_DIGITS = 30
ORDERS = ("batch", "sequence")
CHAT_MODES = ("on", "off")


def _one_of(what: str, name: str, allowed: tuple[str, ...]) -> tuple[str, str]:
    choices = ", ".join(allowed)
    hint = did_you_mean(name, allowed)
    return f"unknown {what} `{name}`", (f"{hint} ({what}s: {choices})" if hint
                                         else f"{what}s: {choices}")


@v_args(meta=True)
class SpecBuilder(Transformer):
    """Builds a :class:`Built` from a parse tree of ``file``."""

    def __init__(self, file: str) -> None:
        super().__init__()
        self.file = file
        self.diags: list[Diagnostic] = []
        self.spans: dict[Key, Span] = {}
        self.anchors: list[tuple[Span, Key]] = []

    # ---- helpers ---------------------------------------------------------------
    def _span(self, meta: Any) -> Span:
        return Span(file=self.file, line=meta.line, col=meta.column,
                    end_line=meta.end_line, end_col=meta.end_column)

    def _tspan(self, tok: Token) -> Span:
        return Span(file=self.file, line=tok.line or 1, col=tok.column or 1,
                    end_line=tok.end_line or tok.line or 1,
                    end_col=tok.end_column or (tok.column or 1) + len(tok))

    def error(self, span: Span, message: str, hint: str | None = None,
              severity: str = "error") -> None:
        self.diags.append(Diagnostic(span, message, hint, severity))

    def _str(self, tok: Token) -> Val:
        span = self._tspan(tok)
        try:
            return Val(unquote(str(tok)), span)
        except LiteralError as e:
            col = span.col + e.offset + 1
            at = span.model_copy(update={"col": col, "end_line": span.line,
                                         "end_col": col + e.width})
            self.error(at, str(e), 'escapes: \\" \\\\ \\n \\t \\r \\uXXXX')
            return Val(str(tok)[1:-1], span)

    def _int(self, tok: Token) -> int:
        if len(tok.lstrip("+-")) > MAX_DIGITS:  # also keeps int() under Python's digit limit
            self.error(self._tspan(tok), f"number {tok[:12]!s}... is too long",
                       f"whole numbers have at most {MAX_DIGITS} digits")
            return 0
        return int(tok)

    def _num(self, tok: Token) -> Val:
        """A float; None (and an error) if it is out of range."""
        value: float | None = float(tok)
        if not math.isfinite(value):
            shown = tok if len(tok) <= 20 else f"{tok[:12]}..."
            self.error(self._tspan(tok), f"number {shown!s} is out of range")
            value = None
        return Val(value, self._tspan(tok))

    def _name(self, tok: Token, what: str, allowed: tuple[str, ...]) -> Val | None:
        if str(tok) in allowed:
            return Val(str(tok), self._tspan(tok))
        self.error(self._tspan(tok), *_one_of(what, str(tok), allowed))
        return None

    def note(self, node: Any, label: str, span: Span) -> None:
        self.spans[(id(node), label)] = span

    def anchor(self, node: Any, label: str, span: Span) -> None:
        self.anchors.append((span, (id(node), label)))

    def once(self, seen: dict[str, Span], stmt: Stmt, where: str) -> bool:
        """Report a repeated singleton statement; True if this is the first."""
        first = seen.get(stmt.kind)
        if first is not None:
            self.error(stmt.span, f"duplicate `{stmt.kind}` {where}",
                       f"the first is at line {first.line}; keep one")
            return False
        seen[stmt.kind] = stmt.span
        return True

    # ---- settings ----------------------------------------------------------------
    def model(self, meta: Any, c: list) -> Stmt:
        return Stmt("model", self._span(meta), (self._str(c[0]),))

    def seed(self, meta: Any, c: list) -> Stmt:
        return Stmt("seed", self._span(meta), (Val(self._int(c[0]), self._tspan(c[0])),))

    def order(self, meta: Any, c: list) -> Stmt:
        return Stmt("order", self._span(meta), (self._name(c[0], "order", ORDERS),))

    def method(self, meta: Any, c: list) -> Stmt:
        return Stmt("method", self._span(meta), (self._name(c[0], "method", METHODS), *c[1:]))

    def layer_range(self, meta: Any, c: list) -> Stmt:
        lo, hi = self._int(c[0]), self._int(c[2])
        span = self._span(meta)
        if hi < lo:
            self.error(span, f"empty layer range {lo}..{hi}",
                       f"ranges are inclusive and increasing: write {hi}..{lo}")
            return Stmt("layers", span, (Val(None, span),))
        if hi - lo >= MAX_LAYERS:
            self.error(span, f"layer range {lo}..{hi} has more than {MAX_LAYERS} layers")
            return Stmt("layers", span, (Val(None, span),))
        return Stmt("layers", span, (Val(tuple(range(lo, hi + 1)), span),))

    def layer_list(self, meta: Any, c: list) -> Stmt:
        span = self._span(meta)
        return Stmt("layers", span, (Val(tuple(self._int(t) for t in c), span),))

    def max_delta(self, meta: Any, c: list) -> Stmt:
        return Stmt("max_delta", self._span(meta), (self._num(c[0]),))

    def budget(self, meta: Any, c: list) -> Stmt:
        val = self._num(c[0])
        unit = str(c[1]) if len(c) > 1 else "s"
        if unit not in ("s", "min"):
            self.error(self._tspan(c[1]), f"unknown time unit {unit!r}",
                       "write the budget in seconds (`budget 300`) or minutes (`budget 5 min`)")
        elif val.value is not None and unit == "min":
            val = Val(val.value * 60, val.span)
        return Stmt("budget", self._span(meta), (val,))

    def chat(self, meta: Any, c: list) -> Stmt:
        mode = self._name(c[0], "chat mode", CHAT_MODES)
        system = c[1] if len(c) > 1 and c[1] is not None else None
        if mode is not None and mode.value == "off" and system is not None:
            self.error(system.span, "a system message needs `chat on`",
                       'write `chat on system "..."`, or remove the system message')
        return Stmt("chat", self._span(meta), (mode, system))

    def chat_system(self, meta: Any, c: list) -> Val:
        return self._str(c[0])

    def weights(self, meta: Any, c: list) -> Stmt:
        return Stmt("weights", self._span(meta), (self._name(c[0], "weights mode", ("frozen",)),))

    def include(self, meta: Any, c: list) -> Stmt:
        return Stmt("include", self._span(meta), (self._str(c[0]),))

    # ---- relations -----------------------------------------------------------------
    def rel_prompt(self, meta: Any, c: list) -> Stmt:
        return Stmt("prompt", self._span(meta), (self._str(c[0]),))

    def rel_paraphrase(self, meta: Any, c: list) -> Stmt:
        return Stmt("paraphrase", self._span(meta), tuple(self._str(t) for t in c))

    def rel_reverse(self, meta: Any, c: list) -> Stmt:
        return Stmt("reverse", self._span(meta), (self._str(c[0]),))

    def rel_subjects(self, meta: Any, c: list) -> Stmt:
        return Stmt("subjects", self._span(meta), tuple(self._str(t) for t in c))

    def rel_subjects_from(self, meta: Any, c: list) -> Stmt:
        return Stmt("subjects from", self._span(meta), (self._str(c[0]),))

    def relation(self, meta: Any, c: list) -> Stmt:
        name, rbrace, items = c[0], c[-1], c[2:-1]
        span = self._span(meta)
        prompt: Val | None = None
        reverse: Val | None = None
        subjects_file: Val | None = None
        paraphrases: list[Val] = []
        subjects: list[Val] = []
        seen: dict[str, Span] = {}
        for st in items:
            if st.kind in ("prompt", "reverse", "subjects from") and \
                    not self.once(seen, st, f"in relation `{name!s}`"):
                continue
            if st.kind == "prompt":
                prompt = st.vals[0]
            elif st.kind == "reverse":
                reverse = st.vals[0]
            elif st.kind == "subjects from":
                subjects_file = st.vals[0]
            elif st.kind == "paraphrase":
                paraphrases.extend(st.vals)
            else:
                subjects.extend(st.vals)
        # a missing prompt is left empty: check() reports it (for built Specs too)
        kwargs: dict[str, Any] = {"name": str(name), "prompt": prompt.value if prompt else ""}
        if paraphrases:
            kwargs["paraphrases"] = tuple(v.value for v in paraphrases)
        if reverse is not None:
            kwargs["reverse"] = reverse.value
        if subjects:
            kwargs["subjects"] = tuple(v.value for v in subjects)
        if subjects_file is not None:
            kwargs["subjects_file"] = subjects_file.value
        rel = Relation(span=span, **kwargs)
        self.note(rel, "name", self._tspan(name))
        for label, val in (("prompt", prompt), ("reverse", reverse),
                           ("subjects_file", subjects_file)):
            if val is not None:
                self.note(rel, label, val.span)
        for label, vals in (("paraphrases", paraphrases), ("subjects", subjects)):
            for i, v in enumerate(vals):
                self.note(rel, f"{label}.{i}", v.span)
        self._anchor_items(rel, items, rbrace, span)
        return Stmt("relation", span, (rel,))

    def _anchor_items(self, node: Any, items: list[Stmt], rbrace: Token, span: Span) -> None:
        self.anchor(node, "header", span)
        counts: dict[str, int] = {}
        for st in items:
            label = st.kind
            if st.kind in ("paraphrase", "portability"):  # one output line per value
                i = counts.get(st.kind, 0)
                counts[st.kind] = i + len(st.vals)
                label = f"{st.kind}.{i}"
            self.anchor(node, label, st.span)
        self.anchor(node, "}", self._tspan(rbrace))

    # ---- edits ---------------------------------------------------------------------
    def change(self, meta: Any, c: list) -> tuple[Val | None, Val]:
        return (self._str(c[0]) if c[0] is not None else None), self._str(c[2])

    def probe(self, meta: Any, c: list) -> Val:
        prompt, target = self._str(c[0]), self._str(c[2])
        probe = Probe(prompt=prompt.value, target=target.value, span=self._span(meta))
        self.note(probe, "prompt", prompt.span)
        self.note(probe, "target", target.span)
        return Val(probe, self._span(meta))

    def edit_triple(self, meta: Any, c: list) -> Stmt:
        old, new = c[2]
        return Stmt("triple", self._span(meta),
                     (self._str(c[0]), Val(str(c[1]), self._tspan(c[1])), old, new))

    def edit_subject(self, meta: Any, c: list) -> Stmt:
        return Stmt("subject", self._span(meta), (self._str(c[0]),))

    def edit_prompt(self, meta: Any, c: list) -> Stmt:
        return Stmt("prompt", self._span(meta), (self._str(c[0]), self._str(c[2])))

    def edit_old(self, meta: Any, c: list) -> Stmt:
        return Stmt("old", self._span(meta), (self._str(c[0]),))

    def edit_scope(self, meta: Any, c: list) -> Stmt:
        return Stmt("scope", self._span(meta), tuple(self._str(t) for t in c))

    def edit_preserve(self, meta: Any, c: list) -> Stmt:
        return Stmt("preserve", self._span(meta), tuple(self._str(t) for t in c))

    def edit_portability(self, meta: Any, c: list) -> Stmt:
        return Stmt("portability", self._span(meta), tuple(c))

    def edit_expect(self, meta: Any, c: list) -> Stmt:
        return Stmt("expect", self._span(meta), (self._name(c[0], "expectation", ("reversal",)),))

    def edit(self, meta: Any, c: list) -> Stmt | None:
        name, rbrace, items = c[0], c[-1], c[2:-1]
        span = self._span(meta)
        node = assemble_edit(self, str(name), self._tspan(name), items, span)
        if node is None:
            return None
        self._anchor_items(node, items, rbrace, span)
        return Stmt("edit", span, (node,))

    # ---- claims ----------------------------------------------------------------------
    def claim_sample(self, meta: Any, c: list) -> Stmt:
        return Stmt("sample", self._span(meta), (Val(self._int(c[0]), self._tspan(c[0])),))

    def claim_neighbours(self, meta: Any, c: list) -> Stmt:
        return Stmt("neighbours of", self._span(meta), (Val(str(c[0]), self._tspan(c[0])),))

    def claim_kl(self, meta: Any, c: list) -> Stmt:
        return Stmt("kl", self._span(meta), (self._num(c[0]),))

    def claim_protocol(self, meta: Any, c: list) -> Stmt:
        return Stmt("protocol", self._span(meta), (self._name(c[0], "protocol", PROTOCOLS),))

    def claim_heldout(self, meta: Any, c: list) -> Stmt:
        return Stmt("heldout", self._span(meta), (Val(True, self._span(meta)),))

    def claim(self, meta: Any, c: list) -> Stmt | None:
        span = self._span(meta)
        metric = self._name(c[0], "metric", METRICS)
        threshold = self._num(c[2])
        fields: dict[str, Val] = {}
        seen: dict[str, Span] = {}
        for st in c[3:]:
            if self.once(seen, st, "in a claim") and st.vals[0] is not None:
                fields[st.kind] = st.vals[0]
        if metric is None or threshold.value is None:
            return None
        names = {"sample": "sample", "neighbours of": "neighbours_of", "kl": "kl",
                 "protocol": "protocol", "heldout": "heldout"}
        claim = Claim(metric=metric.value, threshold=threshold.value, span=span,
                      **{names[k]: v.value for k, v in fields.items()})
        self.note(claim, "metric", metric.span)
        self.note(claim, "threshold", threshold.span)
        for k, v in fields.items():
            self.note(claim, names[k], v.span)
        self.anchor(claim, "header", span)
        return Stmt("claim", span, (claim,))

    # ---- the file ----------------------------------------------------------------------
    def start(self, meta: Any, c: list) -> Built:
        span = Span(file=self.file) if meta.empty else self._span(meta)
        return assemble_spec(self, [st for st in c if st is not None], span)
