"""Round-trip properties over generated Specs (hypothesis, derandomized)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from kmec.grammar import analyze, format_spec, parse
from kmec.grammar.loader import parse_built
from kmec.spec import Spec
from tests.grammar.strategies import specs, valid_specs

SETTINGS = settings(max_examples=200, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def dump(spec: Spec) -> dict:
    return spec.model_dump(mode="json")


@SETTINGS
@given(specs())
def test_any_spec_round_trips_through_text(spec: Spec) -> None:
    text = format_spec(spec)
    again = parse_built(text).spec  # syntax only: generated specs need not make sense
    assert dump(again) == dump(spec)
    assert format_spec(again) == text


@SETTINGS
@given(valid_specs())
def test_valid_spec_round_trips_through_parse(spec: Spec) -> None:
    text = format_spec(spec)
    analysis = analyze(text)
    assert not analysis.errors, "\n".join(d.render() for d in analysis.errors)
    assert dump(parse(text)) == dump(spec)
    assert format_spec(parse(text)) == text
