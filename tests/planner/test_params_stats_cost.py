"""Params (backend defaults + spec overrides), statistics requests and cost estimates."""

from __future__ import annotations

import importlib

import pytest
from pydantic import BaseModel, ConfigDict

from kmec.errors import PlanError
from kmec.planner import plan
from kmec.planner.costs import model_params
from kmec.planner.model import StatsRequest
from tests.planner.helpers import (
    FACTS,
    FakeBackend,
    fake_registry,
    kz,
    make_spec,
    many,
    reasons_text,
)

rs = importlib.import_module("kmec.planner.passes.require_stats")


# -- params ------------------------------------------------------------------------------


def test_params_are_backend_defaults_for_the_model(registry, smol):
    p = plan(make_spec(kz()), smol, backends=registry)
    assert p.steps[0].params == {"lr": 0.5, "max_delta": None, "layers": [5]}
    assert "rome backend defaults for llama (30 layers); layers mirrored from the step" in \
        reasons_text(p.steps[0])


def test_spec_max_delta_overrides_the_default(registry, smol):
    p = plan(make_spec(*many(2), max_delta=0.05), smol, backends=registry)
    assert p.steps[0].params["max_delta"] == 0.05
    assert "max_delta=0.05 from the spec" in reasons_text(p.steps[0])


def test_max_delta_is_trivial_for_memory(registry, smol):
    p = plan(make_spec(kz(), frozen=True, max_delta=0.01), smol, backends=registry)
    assert p.steps[0].params == {"radius": 1.0}
    assert "max_delta=0.01 holds trivially: memory changes no weights" in reasons_text(p.steps[0])


class NoBound(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    lr: float = 0.5


def test_max_delta_refused_when_the_backend_cannot_enforce_it(smol):
    reg = {"rome": FakeBackend("rome", NoBound)}
    with pytest.raises(PlanError) as e:
        plan(make_spec(kz(), max_delta=0.05), smol, backends=reg)
    assert ("the spec bounds the weight change (max_delta 0.05), but the rome backend has no "
            "max_delta parameter") in str(e.value)


def test_params_without_layers_field_are_left_alone(smol):
    p = plan(make_spec(kz()), smol, backends={"rome": FakeBackend("rome", NoBound)})
    assert p.steps[0].params == {"lr": 0.5}
    assert "mirrored" not in reasons_text(p.steps[0])


def test_invalid_override_is_a_plan_error(registry, smol):
    with pytest.raises(PlanError, match="invalid parameters for the memit backend"):
        plan(make_spec(*many(2), max_delta=-1.0), smol, backends=registry)


def test_default_registry_is_kmec_backends(smol, monkeypatch):
    """The planner takes its registry explicitly (it imports no backend); the top-level verb
    ``kmec.plan`` passes kmec's own."""
    import kmec
    import kmec.backends

    monkeypatch.setattr(kmec.backends, "BACKENDS", fake_registry("rome"))
    assert kmec.plan(make_spec(kz()), smol).steps[0].backend == "rome"
    with pytest.raises(TypeError):
        plan(make_spec(kz()), smol)  # no registry: the caller must say which


# -- statistics --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_locate_then_edit_steps_request_statistics(registry, smol, method):
    p = plan(make_spec(kz(), method=method), smol, backends=registry)
    req = p.steps[0].needs_stats
    assert req == StatsRequest(layers=p.steps[0].layers, corpus="default", tokens=100_000,
                               max_len=256, dtype="float32")
    assert f"{method} solves against C = E[k kᵀ] of the MLP keys" in reasons_text(p.steps[0])


@pytest.mark.parametrize("method", ["memory", "ft", "mend"])
def test_other_methods_need_no_statistics(registry, smol, method):
    p = plan(make_spec(kz(), method=method), smol, backends=registry)
    assert p.steps[0].needs_stats is None
    assert "statistics" not in reasons_text(p.steps[0])


def test_later_steps_share_the_first_steps_statistics(registry, smol):
    p = plan(make_spec(*many(3), method="rome"), smol, backends=registry)
    assert len({s.needs_stats for s in p.steps}) == 1
    assert "same statistics as s01-rome (computed once, cached by content)" in \
        reasons_text(p.steps[2])


def test_stats_defaults_match_the_statistics_engine():
    stats = pytest.importorskip("kmec.stats")
    assert (rs.DEFAULT_TOKENS, rs.DEFAULT_MAX_LEN) == (stats.DEFAULT_TOKENS, stats.DEFAULT_MAX_LEN)
    assert stats.DEFAULT_CORPUS == "default"


# -- cost --------------------------------------------------------------------------------


def test_costs_are_positive_and_sum_to_the_plan_total(registry, smol):
    p = plan(make_spec(*many(3), method="rome"), smol, backends=registry)
    assert all(s.cost.seconds > 0 and s.cost.peak_mb > 0 for s in p.steps)
    assert p.cost.seconds == pytest.approx(sum(s.cost.seconds for s in p.steps), abs=0.11)
    assert p.cost.peak_mb == max(s.cost.peak_mb for s in p.steps)


def test_statistics_are_charged_once(registry, smol):
    p = plan(make_spec(*many(3), method="rome"), smol, backends=registry)
    first, second, third = (s.cost.seconds for s in p.steps)
    assert first > second == third
    assert "statistics" in p.steps[0].reasons[-1].because
    assert "statistics" not in p.steps[1].reasons[-1].because


def test_cost_reason_states_the_estimate(registry, smol):
    step = plan(make_spec(kz()), smol, backends=registry).steps[0]
    last = step.reasons[-1]
    assert last.choice == f"~{step.cost.seconds:g} s, ~{step.cost.peak_mb:g} MB"
    assert last.because.startswith("rough CPU estimate: statistics")
    assert "peak = weights 513 MB" in last.because  # 134.5 M fp32 parameters


def test_bigger_models_cost_more(registry):
    small = plan(make_spec(kz()), FACTS["smollm2"], backends=registry).cost
    big = plan(make_spec(kz()), FACTS["gpt2-xl"], backends=registry).cost
    assert big.seconds > 5 * small.seconds and big.peak_mb > 5 * small.peak_mb


def test_mend_training_is_charged_only_without_an_editor(registry, smol):
    without = plan(make_spec(kz(), method="mend"), smol, backends=registry).cost.seconds
    with_editor = plan(make_spec(kz(), method="mend"), smol, backends=registry,
                       editors={smol.fingerprint}).cost.seconds
    assert without > 100 * with_editor


def test_parameter_count_is_estimated_when_unknown():
    assert model_params(FACTS["smollm2"]) == 134_515_008
    est = model_params(FACTS["smollm2"].model_copy(update={"n_params": 0}))
    assert 0.9 < est / 134_515_008 < 1.2
