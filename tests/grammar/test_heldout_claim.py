"""`heldout` on a claim: parsed, checked (generality, locality, reversal), formatted, hashed."""

from __future__ import annotations

import pytest

from kmec.errors import SpecError
from kmec.grammar import format_text, parse
from kmec.hashing import spec_hash

HEAD = ('relation capital { prompt "The capital of {{ subject }} is" }\n'
        'edit kz { subject "Kazakhstan" relation capital "Astana" -> "Almaty" }\n')


def test_heldout_claims_parse_with_other_options_in_any_order():
    spec = parse(HEAD + "claim generality >= 0.8 heldout\n"
                        "claim locality >= 0.9 heldout kl 0.1 sample 30\n")
    gen, loc = spec.claims
    assert gen.heldout and gen.metric == "generality"
    assert loc.heldout and loc.kl == 0.1 and loc.sample == 30


def test_heldout_changes_the_hash_only_when_set():
    plain = parse(HEAD + "claim generality >= 0.8\n")
    assert "heldout" not in plain.claims[0].model_dump()
    assert spec_hash(plain) != spec_hash(parse(HEAD + "claim generality >= 0.8 heldout\n"))


def test_heldout_on_a_metric_without_held_out_prompts_points_at_it():
    with pytest.raises(SpecError) as e:
        parse(HEAD + "claim efficacy >= 0.9 heldout\n")
    d = e.value.diagnostics[0]
    assert "`heldout` does not apply to efficacy claims" in d.message
    assert (d.span.line, d.span.col) == (3, 23) and "drop `heldout`" in d.hint


def test_heldout_twice_is_an_error():
    with pytest.raises(SpecError, match="heldout"):
        parse(HEAD + "claim generality >= 0.8 heldout heldout\n")


def test_heldout_is_formatted_last():
    text = HEAD + "claim locality >= 0.9 heldout kl 0.1\n"
    assert format_text(text).splitlines()[-1] == "claim locality >= 0.9 kl 0.1 heldout"

