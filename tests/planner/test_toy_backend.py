"""A backend registered from the test folder plans like a built-in one, touching no planner
file: the planner reads its record (``info``), its Params and its defaults, nothing else."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from kmec.models.facts import ModelFacts
from kmec.planner import plan
from kmec.planner.backend_info import BackendInfo, Work
from kmec.planner.model import Step
from tests.planner.helpers import FACTS, fake_registry, kz, make_spec, many, reasons_text


class ToyParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    strength: float = 2.0
    max_delta: float | None = None


def toy_cost(step: Step, facts: ModelFacts, setup: bool) -> Work:
    return Work(1.5 * len(step.edits), 7.0, (f"toy work on {len(step.edits)} edit(s)",))


class Toy:
    """Two edits per step at ROME's layer, no statistics."""

    name = "toy"
    Params = ToyParams
    info = BackendInfo(name="toy", changes="weights", layers="one", layer_role="rome",
                       layer_note="the toy edits ROME's layer", max_batch=2, cost=toy_cost)

    def default_params(self, facts: ModelFacts) -> ToyParams:
        return ToyParams(strength=3.0 if facts.n_layers > 20 else 1.0)

    def execute(self, step, ctx):  # pragma: no cover - planning only
        raise NotImplementedError


def test_a_toy_backend_plans_from_its_record():
    registry = {**fake_registry(), "toy": Toy()}
    spec = make_spec(*many(3), method="toy", max_delta=0.05)
    p = plan(spec, FACTS["smollm2"], backends=registry)
    assert [s.id for s in p.steps] == ["s01-toy", "s02-toy"]  # max_batch 2
    assert [len(s.edits) for s in p.steps] == [2, 1]
    first = p.steps[0]
    rome = plan(make_spec(kz()), FACTS["smollm2"], backends=registry).steps[0]
    assert first.layers == rome.layers and len(first.layers) == 1
    assert first.writes == (f"model.layers.{first.layers[0]}.mlp.down_proj.weight",)
    assert first.needs_stats is None
    assert first.params == {"strength": 3.0, "max_delta": 0.05}
    assert first.cost.seconds == 3.0
    text = reasons_text(first)
    assert "the toy edits ROME's layer" in text and "toy work on 2 edit(s)" in text


def test_a_toy_memory_backend_is_allowed_with_frozen_weights():
    import dataclasses

    toy = Toy()
    toy.info = dataclasses.replace(Toy.info, changes="memory", writes_site=None)
    spec = make_spec(kz(), method="toy", frozen=True)
    p = plan(spec, FACTS["smollm2"], backends={**fake_registry(), "toy": toy})
    assert p.steps[0].backend == "toy" and p.steps[0].writes == ()
