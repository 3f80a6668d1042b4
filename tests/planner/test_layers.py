"""Default layers per architecture (published rows, scaled rows) and spec-given layers."""

from __future__ import annotations

import pytest

from kmec.errors import PlanError
from kmec.planner import plan
from kmec.planner.layers import PUBLISHED, check_layers, default_layers
from tests.planner.helpers import FACTS, kz, make_spec, many, reasons_text


@pytest.mark.parametrize("model,role,expected", [
    ("gpt2-xl", "rome", (17,)),
    ("gpt2-xl", "memit", (13, 14, 15, 16, 17)),
    ("gpt2-xl", "memory", (35,)),
    ("gpt2-medium", "rome", (8,)),
    ("gptj", "rome", (5,)),
    ("gptj", "memit", (3, 4, 5, 6, 7, 8)),
    ("neox", "rome", (15,)),
    ("llama-7b", "rome", (5,)),
    ("llama-7b", "memit", (4, 5, 6, 7, 8)),
    ("llama-7b", "memory", (27,)),
])
def test_published_rows_are_used_as_is(model, role, expected):
    choice = default_layers(FACTS[model], role)
    assert choice.layers == expected
    assert choice.because.startswith(f"published {role} layer")


@pytest.mark.parametrize("model,role,expected", [
    ("smollm2", "rome", (5,)),  # 5 × 30/32 = 4.69
    ("smollm2", "memit", (4, 5, 6, 7, 8)),  # start 4 × 30/32 = 3.75, width 5
    ("smollm2", "memory", (25,)),  # 27 × 30/32 = 25.3
    ("mistral", "memit", (4, 5, 6, 7, 8)),  # borrows the Llama row (same block)
    ("neox", "memit", (5, 6, 7, 8, 9, 10)),  # GPT-J row (parallel blocks): 3 × 44/28 = 4.7
    ("gptj", "memory", (24,)),  # no GPT-J/NeoX row: nearest depth of any family (Llama 32)
    ("tiny", "rome", (1,)),
    ("tiny", "memit", (1, 2)),  # width capped at half the model
])
def test_rows_scale_by_depth(model, role, expected):
    choice = default_layers(FACTS[model], role)
    assert choice.layers == expected
    assert "scaled by depth from" in choice.because


def test_scaled_reason_names_its_evidence():
    because = default_layers(FACTS["smollm2"], "rome").because
    assert because == ("no published rome setting for llama with 30 layers; scaled by depth from "
                       "Llama-2-7B (32 layers, layer 5 [EasyEdit hparams/{ROME,MEMIT,GRACE}/"
                       "llama-7b.yaml]) to 5")


@pytest.mark.parametrize("model,expected", [("smollm2", (27, 28, 29)), ("tiny", (1, 2, 3)),
                                            ("gpt2-xl", (45, 46, 47))])
def test_mend_edits_the_last_three_blocks(model, expected):
    choice = default_layers(FACTS[model], "mend")
    assert choice.layers == expected and "last 3 blocks" in choice.because


def test_every_row_cites_a_source_and_fits_its_model():
    for row in PUBLISHED:
        assert row.source
        for v in (row.rome, row.memory, *(row.memit or ())):
            assert v is None or 0 <= v < row.n_layers


def test_rome_layer_lies_in_the_memit_range_for_the_default_model():
    smol = FACTS["smollm2"]
    assert default_layers(smol, "rome").layers[0] in default_layers(smol, "memit").layers


@pytest.mark.parametrize("backend,expected", [
    ("rome", (5,)), ("memit", (4, 5, 6, 7, 8)), ("alphaedit", (4, 5, 6, 7, 8)),
    ("ft", (4, 5, 6, 7, 8)), ("memory", (5,)), ("mend", (27, 28, 29)),
])
def test_each_backend_gets_its_role_layers(registry, smol, backend, expected):
    p = plan(make_spec(kz(), method=backend), smol, backends=registry)
    assert p.steps[0].layers == expected
    assert any(r.choice.startswith("layers ") for r in p.steps[0].reasons)


def test_spec_layers_win_and_are_explained(registry, smol):
    p = plan(make_spec(*many(2), layers=(8, 3, 5)), smol, backends=registry)
    assert p.steps[0].layers == (3, 5, 8)
    assert "layers 3, 5, 8: the spec gives `layers 3, 5, 8`" in reasons_text(p.steps[0])


def test_spec_layer_range_reads_compactly(registry, smol):
    p = plan(make_spec(*many(2), layers=(3, 4, 5, 6, 7, 8)), smol, backends=registry)
    assert "the spec gives `layers 3..8`" in reasons_text(p.steps[0])


def test_layers_outside_the_model_are_refused(registry):
    with pytest.raises(PlanError) as e:
        plan(make_spec(*many(2), layers=(2, 3, 4, 5)), FACTS["tiny"], backends=registry)
    assert "layers 4, 5 do not exist: tiny-llama has 4 layers (0..3)" in str(e.value)
    assert "between 0 and 3" in e.value.hint


def test_negative_and_duplicate_layers_are_refused(smol):
    with pytest.raises(PlanError, match="do not exist"):
        check_layers((-1, 2), smol)
    with pytest.raises(PlanError, match="lists a layer twice"):
        check_layers((2, 2), smol)
    with pytest.raises(PlanError, match="empty"):
        check_layers((), smol)
