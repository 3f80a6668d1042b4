"""The planner's working value: a frozen ``Draft`` that each pass copies and extends.

Contents:
    DraftEdit     one edit as the planner sees it (rendered request + what the spec said)
    Draft         spec, inputs (backend registry, trained editors) and the plan so far
    Pass          Protocol of a planner pass: ``(draft, facts) -> draft``
    example_spec()   a two-edit spec used by the passes' doctests
    example_facts()  SmolLM2-135M's facts, written by hand (no weights)
    example_backends()  a registry of records shaped like the built-in backends, for doctests

A pass never mutates its input: it returns ``draft.update(...)`` (a copy), so
every intermediate draft can be inspected and each pass tested alone. The
draft only becomes a :class:`~kmec.planner.model.Plan` in
:func:`Draft.to_plan`, after the last pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from kmec.errors import PlanError, did_you_mean
from kmec.hashing import spec_hash
from kmec.models.facts import ModelFacts
from kmec.planner.backend_info import BackendInfo
from kmec.planner.model import Chat, Cost, EditRequest, Plan, Reason, Step
from kmec.spec import Spec


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DraftEdit(_Frozen):
    """One edit request plus the facts about its source the policy needs.

    Attributes:
        request: what a backend will receive.
        source: name of the spec edit it came from.
        free_form: the spec wrote it as ``prompt -> target`` (a PromptEdit).
        keyed: the edit names a subject span to key on (False: the prompt's
            last token would key it).
        expect_reversal: the spec declares ``expect reversal`` for it.
        reverse_prompt: the relation's reverse template rendered with the new
            object, when the relation has one.
        reasons: choices made about this edit; copied onto the step that
            carries it.
    """

    request: EditRequest
    source: str
    free_form: bool = False
    keyed: bool = True
    expect_reversal: bool = False
    reverse_prompt: str | None = None
    reasons: tuple[Reason, ...] = ()


class Draft(_Frozen):
    """The plan under construction.

    Attributes:
        spec: the spec being planned.
        backends: the backend registry (name -> backend); excluded from dumps.
        editors: model fingerprints or names that have a trained MEND editor.
        kmec_version: version stamped into the plan.
        edits: resolved edits, in spec order (inverse edits follow their edit).
        backend: the method chosen for the whole spec (None before choose_backend).
        backend_reasons: why that method was chosen (copied onto every step).
        steps: the steps so far (ids assigned by group_edits).
        reasons: plan-level notes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    spec: Spec
    backends: Mapping[str, Any] = Field(default_factory=dict, exclude=True, repr=False)
    editors: frozenset[str] = frozenset()
    kmec_version: str = "0"
    edits: tuple[DraftEdit, ...] = ()
    backend: str | None = None
    backend_reasons: tuple[Reason, ...] = ()
    steps: tuple[Step, ...] = ()
    reasons: tuple[Reason, ...] = ()

    def update(self, **changes: Any) -> Draft:
        """A copy with ``changes`` applied (the only way passes change a draft)."""
        return self.model_copy(update=changes)

    def note(self, choice: str, because: str) -> Draft:
        """A copy with one more plan-level :class:`Reason`."""
        return self.update(reasons=(*self.reasons, Reason(choice=choice, because=because)))

    def info(self, name: str) -> BackendInfo:
        """The record of backend ``name`` (:class:`~kmec.planner.backend_info.BackendInfo`).

        Raises:
            PlanError: no such backend is registered.
        """
        backend = self.backends.get(name)
        if backend is None:
            known = ", ".join(sorted(self.backends)) or "none"
            raise PlanError(
                f"backend {name!r} is not available in this installation (registered: {known})",
                hint=did_you_mean(name, self.backends)
                or f"name an available method with `method ...`, or register the {name} backend")
        return backend.info

    def replace_step(self, index: int, step: Step) -> Draft:
        """A copy whose step ``index`` is ``step``."""
        steps = list(self.steps)
        steps[index] = step
        return self.update(steps=tuple(steps))

    def to_plan(self, facts: ModelFacts) -> Plan:
        """Freeze the finished draft into a :class:`Plan`.

        The total cost is the sum of the steps' seconds and the largest peak.
        """
        total = Cost(
            seconds=round(sum(s.cost.seconds for s in self.steps), 1),
            peak_mb=max((s.cost.peak_mb for s in self.steps), default=0.0),
        )
        return Plan(
            kmec_version=self.kmec_version,
            spec_hash=spec_hash(self.spec),
            model=facts.name,
            model_fingerprint=facts.fingerprint,
            model_arch=facts.arch,
            seed=self.spec.seed,
            order=self.spec.order,
            steps=self.steps,
            reasons=self.reasons,
            cost=total,
            chat=Chat(system=self.spec.chat.system) if self.spec.chat is not None else None,
        )


class Pass(Protocol):
    """A planner pass: pure, returns a new draft, appends a Reason per choice."""

    def __call__(self, draft: Draft, facts: ModelFacts, /) -> Draft: ...


def example_spec() -> Spec:
    """A small spec for examples: one triple edit with a reversal, one free-form edit.

    >>> [e.kind for e in example_spec().edits]
    ['triple', 'prompt']
    """
    from kmec.spec import PromptEdit, Relation, TripleEdit

    capital = Relation(
        name="capital",
        prompt="The capital of {{ subject }} is",
        paraphrases=("{{ subject }}'s capital city is",),
        reverse="{{ object }} is the capital of",
    )
    return Spec(
        model="smollm2-135m",
        relations=(capital,),
        edits=(
            TripleEdit(name="kazakhstan", subject="Kazakhstan", relation="capital",
                       old="Astana", new="Nur-Sultan", expect_reversal=True,
                       preserve=("The capital of Russia is",)),
            PromptEdit(name="messi", prompt="The 2022 World Cup was won by", target="Argentina"),
        ),
    )


def example_facts() -> ModelFacts:
    """SmolLM2-135M's sizes as ``kmec model info`` reports them (placeholder fingerprint)."""
    return ModelFacts(
        name="smollm2-135m", arch="LlamaForCausalLM", model_type="llama", family="llama",
        n_layers=30, d_model=576, d_mlp=1536, vocab_size=49152, dtype="float32",
        tied_embeddings=True, fingerprint="0" * 64, n_params=134_515_008,
    )


class _NoParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Example:
    """A registry entry for doctests: a record and empty Params, no execution."""

    def __init__(self, info: BackendInfo) -> None:
        self.name, self.info, self.Params = info.name, info, _NoParams

    def default_params(self, facts: ModelFacts) -> Any:
        return self.Params()


def example_backends() -> dict[str, Any]:
    """Records shaped like the built-in backends' (names, roles, layers; no cost model), so
    the passes' doctests run without importing a backend (which would import torch)."""
    records = [
        BackendInfo(name="rome", changes="weights", needs_stats=True, layers="one",
                    layer_role="rome", batches=False, keyed=True),
        BackendInfo(name="memit", changes="weights", needs_stats=True, layer_role="memit",
                    max_batch=10_000, keyed=True, uses=frozenset({"scope", "preserve", "locality"})),
        BackendInfo(name="ft", changes="weights", layer_role="memit"),
        BackendInfo(name="memory", changes="memory", layers="one", layer_role="rome",
                    writes_site=None),
    ]
    return {r.name: _Example(r) for r in records}
