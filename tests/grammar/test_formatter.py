"""The formatter: canonical layout, comments kept, idempotent."""

from __future__ import annotations

from kmec.grammar import format_spec, format_text, parse
from kmec.grammar.formatter import WIDTH
from kmec.grammar.literals import quote, unquote
from kmec.spec import Claim, MethodHint, Relation, Spec, TripleEdit


def test_messy_text_becomes_canonical() -> None:
    messy = '''claim efficacy>=0.99   # must take
edit   k{subject "K"   relation capital "A"->"B" expect reversal scope "x" }
# the relation
relation capital{prompt "The capital of {{ subject }} is" reverse "{{ object }} is"}
seed    0
'''
    assert format_text(messy) == '''seed 0

# the relation
relation capital {
  prompt "The capital of {{ subject }} is"
  reverse "{{ object }} is"
}

edit k {
  subject "K" relation capital "A" -> "B"
  scope "x"
  expect reversal
}

claim efficacy >= 0.99  # must take
'''


def test_format_text_is_idempotent_with_comments_everywhere() -> None:
    text = '''#a
model "m" #b
  # c

relation r { # d
 prompt "{{ subject }}" # e
 subjects "x"
   # f
   "y" # g
 # h
} # i
#j'''
    once = format_text(text)
    assert format_text(once) == once
    for mark in "abcdefghij":
        assert f"#{mark}" in once or f"# {mark}" in once


def test_defaults_are_written_only_when_given() -> None:
    assert format_spec(Spec()) == ""
    assert format_spec(Spec(seed=0)) == "seed 0\n"
    assert format_spec(Spec(method=MethodHint(frozen=True))) == "weights frozen\n"
    claim = Claim(metric="efficacy", threshold=1.0, protocol="prob")
    assert format_spec(Spec(claims=(claim,))) == "claim efficacy >= 1.0 protocol prob\n"


def test_layer_runs_become_ranges() -> None:
    spec = Spec(method=MethodHint(method="memit", layers=(2, 3, 4, 5)))
    assert format_spec(spec) == "method memit layers 2..5\n"
    assert parse(format_spec(spec)).method.layers == (2, 3, 4, 5)


def test_long_subject_lists_wrap_within_the_width() -> None:
    subjects = tuple(f"Country number {i}" for i in range(40))
    spec = Spec(relations=(Relation(name="r", prompt="{{ subject }} is", subjects=subjects),))
    text = format_spec(spec)
    assert all(len(line) <= WIDTH for line in text.splitlines())
    assert parse(text).relations[0].subjects == subjects


def test_old_value_in_triples() -> None:
    spec = Spec(relations=(Relation(name="r", prompt="{{ subject }} is"),),
                edits=(TripleEdit(name="e", subject="s", relation="r", old="a", new="b"),))
    assert 'subject "s" relation r "a" -> "b"' in format_spec(spec)


def test_quote_round_trips_awkward_strings() -> None:
    for value in ['', '"', "\\", "\n\r\t", "\x00\x1f\x7f\x85", "\u2028\u2029", "é東🍕", "\\u0041"]:
        assert unquote(quote(value)) == value
    assert quote("é") == '"é"'  # readable, not escaped
