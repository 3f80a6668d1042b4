"""Planner test helpers: hand-written ModelFacts, a fake backend registry, spec builders.

The planner needs no weights and does not execute a backend: the fake registry
below has one entry per built-in method with small Params models (so these
tests and the golden plans do not change when a real backend's defaults do)
and that method's own record (``info``: what it changes, its layers, its cost
model), which is what the planner reads.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kmec.models.facts import ModelFacts
from kmec.spec import Claim, MethodHint, PromptEdit, Relation, Spec, TripleEdit

GOLDEN_VERSION = "0.0.0+test"


def facts(name: str, arch: str, model_type: str, n_layers: int, d_model: int, d_mlp: int,
          vocab: int, n_params: int = 0, tied: bool = False) -> ModelFacts:
    return ModelFacts(name=name, arch=arch, model_type=model_type, family=model_type,
                      n_layers=n_layers, d_model=d_model, d_mlp=d_mlp, vocab_size=vocab,
                      dtype="float32", tied_embeddings=tied, fingerprint=f"fp-{name}",
                      n_params=n_params)


FACTS: dict[str, ModelFacts] = {
    "smollm2": facts("smollm2-135m", "LlamaForCausalLM", "llama", 30, 576, 1536, 49152,
                     n_params=134_515_008, tied=True),
    "gpt2-xl": facts("gpt2-xl", "GPT2LMHeadModel", "gpt2", 48, 1600, 6400, 50257,
                     n_params=1_557_611_200, tied=True),
    "gpt2-medium": facts("gpt2-medium", "GPT2LMHeadModel", "gpt2", 24, 1024, 4096, 50257),
    "gptj": facts("gpt-j-6b", "GPTJForCausalLM", "gptj", 28, 4096, 16384, 50400),
    "neox": facts("gpt-neox-20b", "GPTNeoXForCausalLM", "gpt_neox", 44, 6144, 24576, 50432),
    "llama-7b": facts("llama-2-7b", "LlamaForCausalLM", "llama", 32, 4096, 11008, 32000),
    "mistral": facts("mistral-7b", "MistralForCausalLM", "mistral", 32, 4096, 14336, 32000),
    "tiny": facts("tiny-llama", "LlamaForCausalLM", "llama", 4, 32, 64, 128, tied=True),
}


class FakeParams(BaseModel):
    """Params of a fake weight-editing backend: a family-dependent default and a bound."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lr: float = 0.5
    max_delta: float | None = Field(default=None, ge=0)
    layers: list[int] = []


class FakeMemoryParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    radius: float = 1.0


class FakeBackend:
    """Enough of the Backend protocol for the planner."""

    def __init__(self, name: str, params: type[BaseModel] = FakeParams) -> None:
        from kmec.backends import BACKENDS

        self.name = name
        self.Params = params
        self.info = BACKENDS[name].info

    def default_params(self, facts: ModelFacts) -> BaseModel:
        if self.Params is FakeParams:
            return FakeParams(lr=0.1 if facts.family == "gpt2" else 0.5)
        return self.Params()

    def execute(self, step: Any, ctx: Any) -> Any:  # pragma: no cover - never executed
        raise NotImplementedError


def fake_registry(*names: str) -> dict[str, FakeBackend]:
    names = names or ("rome", "memit", "alphaedit", "memory", "retrieval", "ft", "mend")
    return {n: FakeBackend(n, FakeMemoryParams if n in ("memory", "retrieval") else FakeParams)
            for n in names}


CAPITAL = Relation(name="capital", prompt="The capital of {{ subject }} is",
                   paraphrases=("{{ subject }}'s capital city is",),
                   reverse="{{ object }} is the capital of")
LANGUAGE = Relation(name="language", prompt="The official language of {{ subject }} is")


def triple(name: str, subject: str, new: str, old: str | None = None,
           relation: str = "capital", **kw: Any) -> TripleEdit:
    return TripleEdit(name=name, subject=subject, relation=relation, old=old, new=new, **kw)


def prompt_edit(name: str, prompt: str, target: str, **kw: Any) -> PromptEdit:
    return PromptEdit(name=name, prompt=prompt, target=target, **kw)


def make_spec(*edits: Any, method: str = "auto", layers: tuple[int, ...] | None = None,
              max_delta: float | None = None, frozen: bool = False, order: str = "batch",
              claims: tuple[Claim, ...] = (), seed: int = 0) -> Spec:
    return Spec(model="smollm2-135m", seed=seed, order=order,
                method=MethodHint(method=method, layers=layers, max_delta=max_delta,
                                  frozen=frozen),
                relations=(CAPITAL, LANGUAGE), edits=tuple(edits), claims=claims)


def kz(**kw: Any) -> TripleEdit:
    return triple("kazakhstan", "Kazakhstan", "Nur-Sultan", "Astana", **kw)


def many(n: int) -> tuple[TripleEdit, ...]:
    return tuple(triple(f"e{i:03d}", f"Country{i}", f"City{i}") for i in range(n))


def reasons_text(step_or_plan: Any) -> str:
    """All reasons of a step or plan as one searchable string."""
    return "\n".join(f"{r.choice}: {r.because}" for r in step_or_plan.reasons)
