from __future__ import annotations

from kmec.errors import Diagnostic, KmecError, Span, SpecError, did_you_mean


def test_kmec_error_renders_hint():
    e = KmecError("bad thing", hint="do this")
    assert str(e) == "bad thing\n  hint: do this"
    assert e.exit_code == 2


def test_spec_error_renders_all_diagnostics_with_caret():
    d1 = Diagnostic(Span(file="a.kmec", line=2, col=3, end_line=2, end_col=6), "boom",
                    hint="fix", source_line="  xyz here")
    d2 = Diagnostic(Span(file="a.kmec", line=5, col=1, end_line=5, end_col=2), "again")
    e = SpecError([d1, d2])
    assert str(e) == ("a.kmec:2:3: error: boom\n      xyz here\n      ^^^\n  hint: fix\n"
                      "a.kmec:5:1: error: again")
    assert e.span.line == 2


def test_did_you_mean_none_for_far_names():
    assert did_you_mean("qqq", ["capital"]) is None
