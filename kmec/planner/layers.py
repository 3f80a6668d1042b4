"""Default edit layers per architecture, as a table of published settings.

Contents:
    Published        one row: a family and depth with the layers a paper/toolkit used
    PUBLISHED        the rows, each citing where its numbers come from
    LayerChoice      layers plus the sentence that justifies them
    default_layers() the layers a method edits on a model by default
    check_layers()   validate layers the spec gives

Roles: ``rome`` (one mid-early MLP), ``memit`` (a range of mid-early MLPs;
AlphaEdit and constrained fine-tuning use it too), ``memory`` (the layer a
GRACE-style codebook hooks) and ``mend`` (the last three MLPs, as in the MEND
paper: "we edit the MLP weights in the last 3 transformer blocks").

Evidence. The ROME paper's causal traces put factual recall in mid-early MLPs
at the last subject token; the published hyper-parameter files pick:

* GPT-2 medium (24 layers) ROME 8; GPT-2 large (36) ROME 12; GPT-2 XL (48)
  ROME 17, MEMIT 13–17 (kmeng01/rome ``hparams/ROME/*.json``, EasyEdit
  ``hparams/MEMIT/gpt2-xl.yaml``), GRACE codebook at layer 35 (EasyEdit
  ``hparams/GRACE/gpt2-xl.yaml``);
* GPT-J (28) ROME 5, MEMIT 3–8 (kmeng01/memit ``hparams/MEMIT/EleutherAI_gpt-j-6B.json``);
* GPT-NeoX-20B (44) ROME 15 (kmeng01/memit ``hparams/ROME/EleutherAI_gpt-neox-20b.json``);
* Llama-2-7B (32) ROME 5, MEMIT 4–8, GRACE 27 (EasyEdit
  ``hparams/{ROME,MEMIT,GRACE}/llama-7b.yaml``).

A model whose (family, depth) has no row is scaled from the nearest row of
its own family, then of a related family (GPT-NeoX → GPT-J: both run
attention and MLP in parallel; Mistral/Qwen2 → Llama: same block), then of
any family: a single layer ``l`` of an ``N``-layer reference becomes
``round(l · n / N)``; a range keeps its width (at most half the model) and
scales its start the same way. SmolLM2-135M (Llama, 30 layers) thus gets
ROME layer 5 and MEMIT layers 4–8. Causal tracing can refine these later.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from kmec.errors import PlanError
from kmec.models.facts import ModelFacts

Role = Literal["rome", "memit", "memory", "mend"]

MEND_LAST = 3  # MEND edits the MLPs of the last three blocks (Mitchell et al. 2022, §5)


class Published(BaseModel):
    """Layers a paper or toolkit used for one (family, depth)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str
    n_layers: int
    model: str
    rome: int | None = None
    memit: tuple[int, ...] | None = None
    memory: int | None = None
    source: str


PUBLISHED: tuple[Published, ...] = (
    Published(family="gpt2", n_layers=24, model="GPT-2 medium", rome=8,
              source="kmeng01/rome hparams/ROME/gpt2-medium.json"),
    Published(family="gpt2", n_layers=36, model="GPT-2 large", rome=12,
              source="kmeng01/rome hparams/ROME/gpt2-large.json"),
    Published(family="gpt2", n_layers=48, model="GPT-2 XL", rome=17, memit=(13, 14, 15, 16, 17),
              memory=35, source="kmeng01/rome hparams/ROME/gpt2-xl.json; EasyEdit "
              "hparams/{MEMIT,GRACE}/gpt2-xl.yaml"),
    Published(family="gptj", n_layers=28, model="GPT-J-6B", rome=5, memit=(3, 4, 5, 6, 7, 8),
              source="kmeng01/rome and kmeng01/memit hparams for EleutherAI_gpt-j-6B"),
    Published(family="gpt_neox", n_layers=44, model="GPT-NeoX-20B", rome=15,
              source="kmeng01/memit hparams/ROME/EleutherAI_gpt-neox-20b.json"),
    Published(family="llama", n_layers=32, model="Llama-2-7B", rome=5, memit=(4, 5, 6, 7, 8),
              memory=27, source="EasyEdit hparams/{ROME,MEMIT,GRACE}/llama-7b.yaml"),
)

# Families whose blocks match another family's closely enough to borrow its rows.
RELATED: dict[str, tuple[str, ...]] = {
    "gpt_neox": ("gptj",),
    "gptj": ("gpt_neox",),
    "mistral": ("llama",),
    "qwen2": ("llama",),
}


class LayerChoice(BaseModel):
    """Layers for one method on one model, and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: tuple[int, ...]
    because: str


def _round(x: float) -> int:
    """Round half up (Python's ``round`` rounds half to even)."""
    return int(x + 0.5)


def _span(layers: tuple[int, ...]) -> str:
    if len(layers) > 1 and layers == tuple(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))


def _value(row: Published, role: Role) -> tuple[int, ...] | None:
    v = getattr(row, role)
    if v is None:
        return None
    return (v,) if isinstance(v, int) else tuple(v)


def _reference(facts: ModelFacts, role: Role) -> tuple[Published, tuple[int, ...]]:
    """The row to use: same family first, then related families, then any; nearest depth."""
    everyone = tuple(sorted({r.family for r in PUBLISHED}))
    for families in ((facts.family,), RELATED.get(facts.family, ()), everyone):
        rows = [(r, v) for r in PUBLISHED if r.family in families
                and (v := _value(r, role)) is not None]
        if rows:
            return min(rows, key=lambda rv: (abs(rv[0].n_layers - facts.n_layers),
                                             rv[0].family, rv[0].n_layers))
    raise PlanError(f"no default layers for {role} on {facts.family}")  # pragma: no cover


def _scale(ref: tuple[int, ...], ref_n: int, n: int) -> tuple[int, ...]:
    if len(ref) == 1:
        return (min(max(_round(ref[0] * n / ref_n), 0), n - 1),)
    width = max(1, min(len(ref), n // 2))
    start = min(max(_round(ref[0] * n / ref_n), 0), n - width)
    return tuple(range(start, start + width))


def default_layers(facts: ModelFacts, role: Role) -> LayerChoice:
    """The layers ``role`` edits on ``facts``'s model by default.

    Args:
        facts: the model.
        role: ``rome``, ``memit``, ``memory`` or ``mend``.

    Returns:
        The layers and a sentence naming the evidence.

    >>> from kmec.planner.draft import example_facts
    >>> default_layers(example_facts(), "rome").layers
    (5,)
    >>> default_layers(example_facts(), "memit").layers
    (4, 5, 6, 7, 8)
    >>> default_layers(example_facts(), "mend").layers
    (27, 28, 29)
    """
    n = facts.n_layers
    if role == "mend":
        layers = tuple(range(max(0, n - MEND_LAST), n))
        return LayerChoice(layers=layers, because=(
            f"MEND edits the MLPs of the last {MEND_LAST} blocks (Mitchell et al. 2022): "
            f"layers {_span(layers)} of {n}"))
    row, ref = _reference(facts, role)
    what = "layer" if len(ref) == 1 else "layers"
    if row.family == facts.family and row.n_layers == n:
        return LayerChoice(layers=ref, because=(
            f"published {role} {what} for {row.model} ({n} layers): {_span(ref)} [{row.source}]"))
    layers = _scale(ref, row.n_layers, n)
    return LayerChoice(layers=layers, because=(
        f"no published {role} setting for {facts.family} with {n} layers; scaled by depth from "
        f"{row.model} ({row.n_layers} layers, {what} {_span(ref)} [{row.source}]) "
        f"to {_span(layers)}"))


def check_layers(layers: tuple[int, ...], facts: ModelFacts) -> tuple[int, ...]:
    """Validate layers the spec gives: in range, no duplicates; returned sorted.

    Raises:
        PlanError: a layer outside ``0..n_layers-1`` or listed twice.

    >>> from kmec.planner.draft import example_facts
    >>> check_layers((5, 3, 4), example_facts())
    (3, 4, 5)
    """
    n = facts.n_layers
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise PlanError(
            f"layers {', '.join(map(str, bad))} do not exist: "
            f"{facts.name} has {n} layers (0..{n - 1})",
            hint=f"choose layers between 0 and {n - 1}, or leave `layers` out for the default")
    if len(set(layers)) != len(layers):
        raise PlanError(f"layers {_span(layers)} lists a layer twice",
                        hint="list each layer once")
    if not layers:
        raise PlanError("`layers` is empty", hint="name at least one layer, or leave it out")
    return tuple(sorted(layers))


def layer_span(layers: tuple[int, ...]) -> str:
    """Compact text for a layer tuple.

    >>> layer_span((4, 5, 6)), layer_span((3, 7)), layer_span(())
    ('4..6', '3, 7', '')
    """
    return _span(layers)
