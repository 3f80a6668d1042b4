"""Fuzzing: whatever the text, parsing ends in a Spec or in located SpecErrors, never a crash.

Three sources of text: arbitrary unicode, a soup of the language's own tokens,
and valid specs mutated (characters and tokens deleted, inserted, duplicated
or swapped). Every diagnostic must carry a span inside the text and render.
"""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmec.errors import SpecError
from kmec.grammar import analyze, parse
from kmec.grammar.errors import KEYWORDS
from kmec.grammar.literals import quote

ROOT = Path(__file__).resolve().parents[2]
SEED_FILES = [p for p in sorted([*(ROOT / "tests" / "fixtures" / "identity").glob("*.kmec"),
                                 *(ROOT / "specs" / "examples").glob("*.kmec")])
              if p.stat().st_size < 6000]
SEEDS = [p.read_text(encoding="utf-8") for p in SEED_FILES]
PATH = "fuzz/nowhere/fuzz.kmec"  # includes resolve into a folder that does not exist
SETTINGS = settings(derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])

PUNCT = ["{", "}", "->", ">=", "..", '"', "#", "\n", " ", "-", ".", "\\", "'", ">", "="]
TOKENS = st.one_of(
    st.sampled_from(sorted(KEYWORDS)), st.sampled_from(PUNCT),
    st.sampled_from(['"x"', '"{{ subject }}"', '"{{ object }} is"', '""', '"\\u00e9"', '"\\q"']),
    st.sampled_from(["0", "1", "-1", "0.5", "1e3", "3..8", "99999999999999999999", "capital"]),
    st.text(max_size=3))


def assert_located(text: str) -> None:
    """Parse ``text``; only SpecErrors with spans in the text may come out."""
    n_lines = text.count("\n") + 1
    try:
        parse(text, path=PATH)
    except SpecError as e:
        assert e.diagnostics
        for d in e.diagnostics:
            assert d.severity == "error"
            assert d.span.line >= 1 and d.span.col >= 1, d
            if d.span.file == PATH:
                assert d.span.line <= n_lines, d
                assert d.source_line is not None
            assert "internal error" not in d.message, d.render()
            assert d.render().startswith(f"{d.span.file}:{d.span.line}:{d.span.col}: error: ")
    analysis = analyze(text, path=PATH)
    assert (analysis.spec is None) == bool(analysis.errors)


@settings(SETTINGS, max_examples=1000)
@given(st.text(max_size=120))
def test_random_text(text: str) -> None:
    assert_located(text)


@settings(SETTINGS, max_examples=1500)
@given(st.lists(TOKENS, max_size=40), st.lists(st.sampled_from([" ", "\n", "", "  "]),
                                               min_size=40, max_size=40))
def test_token_soup(tokens: list[str], gaps: list[str]) -> None:
    assert_located("".join(t + g for t, g in zip(tokens, gaps)))


MUTATIONS = st.sampled_from(["delete", "insert", "duplicate", "swap", "delete_token"])


@st.composite
def mutated(draw) -> str:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(MUTATIONS)
        i = draw(st.integers(0, len(text)))
        j = min(len(text), i + draw(st.integers(0, 12)))
        if op == "delete":
            text = text[:i] + text[j:]
        elif op == "insert":
            text = text[:i] + draw(TOKENS) + text[i:]
        elif op == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        elif op == "swap" and j > i:
            text = text[:i] + text[j - 1] + text[i + 1:j - 1] + text[i] + text[j:]
        elif op == "delete_token":
            tokens = list(re.finditer(r'"(?:[^"\\\n]|\\.)*"|[\w.-]+|->|>=|\S', text))
            if tokens:
                m = tokens[draw(st.integers(0, len(tokens) - 1))]
                text = text[:m.start()] + text[m.end():]
    return text


@settings(SETTINGS, max_examples=1500)
@given(mutated())
def test_mutated_valid_specs(text: str) -> None:
    assert_located(text)


def test_seeds_are_valid() -> None:
    """The mutations start from valid specs (read from their own folders, so includes and
    subjects files resolve)."""
    from kmec.grammar import analyze_file

    assert len(SEEDS) >= 8
    for path in SEED_FILES:
        assert analyze_file(path).errors == [], path


@settings(SETTINGS, max_examples=300)
@given(st.text(max_size=20))
def test_any_file_name(name: str) -> None:
    quoted = quote(name)
    assert_located(f"include {quoted}\n")
    assert_located(f'relation r {{ prompt "{{{{ subject }}}}" subjects from {quoted} }}\n'
                   f'edit e {{ subject "s" relation r -> "t" }}\n'
                   "claim locality >= 0.5 neighbours of r\n")
