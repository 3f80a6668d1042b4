"""The Spec: the data model of a ``.kmec`` file (frozen pydantic, discriminated).

Contents:
    Node            base: frozen, extra="forbid", optional source ``span``
    Relation        name, prompt template, paraphrase templates, reverse template,
                    neighbour subjects (inline or from a file)
    Probe           a prompt and the answer expected after the edit
    TripleEdit      (subject, relation, old -> new), kind="triple"
    PromptEdit      free-form prompt -> target, kind="prompt"
    Edit            TripleEdit | PromptEdit (discriminated on ``kind``)
    Claim           metric >= threshold, with sampling options
    MethodHint      method, layers, weight-change bound, frozen weights
    ChatSetting     wrap prompts in the model's chat template (optional system message)
    Spec            the whole file (includes already merged)
    spec_json_schema()  the JSON Schema exported from these models
    strip_spans()   a spec dump without source locations (for comparisons)

Templates use jinja2 syntax with the variables ``subject`` and ``object``
(``"The capital of {{ subject }} is"``). Spans are excluded from dumps and
hashes: moving a statement in a file does not change the plan.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kmec.errors import Span

METHODS = ("auto", "rome", "memit", "alphaedit", "memory", "retrieval", "ft", "mend")
METRICS = ("efficacy", "generality", "locality", "portability", "reversal", "retention")

# A method is a backend's registry name. The .kmec language accepts the built-in ones
# (METHODS, checked with "did you mean" when a spec is read); a spec built in Python may
# name any backend registered with the planner (kmec.planner.backend_info).
Method = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
Metric = Literal["efficacy", "generality", "locality", "portability", "reversal", "retention"]


class Node(BaseModel):
    """Base of every spec node: frozen, closed, with an optional source span."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    span: Span | None = Field(default=None, exclude=True, repr=False)


class Relation(Node):
    """A relation: how to ask about ``(subject) -> object``.

    Attributes:
        name: identifier used by edits and claims.
        prompt: main template; the object is the continuation.
        paraphrases: extra in-scope templates (generality).
        reverse: template whose continuation is the subject (reversal claims).
        subjects: other subjects of the relation (locality neighbourhoods).
        subjects_file: a file (relative to the spec) with one subject per line.
    """

    kind: Literal["relation"] = "relation"
    name: str
    prompt: str
    paraphrases: tuple[str, ...] = ()
    reverse: str | None = None
    subjects: tuple[str, ...] = ()
    subjects_file: str | None = None


class Probe(Node):
    """A prompt and the target expected after the edit (portability)."""

    kind: Literal["probe"] = "probe"
    prompt: str
    target: str


class _EditBase(Node):
    name: str
    scope: tuple[str, ...] = ()  # extra in-scope prompts (generality)
    preserve: tuple[str, ...] = ()  # prompts whose output must not change
    portability: tuple[Probe, ...] = ()
    expect_reversal: bool = False


class TripleEdit(_EditBase):
    """``subject`` under ``relation`` changes from ``old`` (optional) to ``new``."""

    kind: Literal["triple"] = "triple"
    subject: str
    relation: str
    old: str | None = None
    new: str


class PromptEdit(_EditBase):
    """A free-form edit: after ``prompt`` the model must say ``target``.

    ``subject`` (optional) names the span of the prompt whose last token keys
    the edit for locate-then-edit methods; by default the prompt's last token.
    """

    kind: Literal["prompt"] = "prompt"
    prompt: str
    target: str
    old: str | None = None
    subject: str | None = None


Edit = Annotated[TripleEdit | PromptEdit, Field(discriminator="kind")]


class Claim(Node):
    """A claim ``metric >= threshold`` that ``kmec verify`` checks.

    Attributes:
        metric: which metric.
        threshold: in [0, 1].
        sample: number of property-based samples (locality neighbourhoods).
        neighbours_of: relation whose other subjects form the neighbourhood.
        kl: per-prompt KL budget (nats) for locality.
        protocol: scoring protocol (probability comparison, token accuracy,
            greedy exact match).
        heldout: score only prompts the compiler was not shown (generality and
            reversal: drawn variants of the in-scope prompts; locality: neighbours
            outside the declared locality set).
    """

    kind: Literal["claim"] = "claim"
    metric: Metric
    threshold: float
    sample: int | None = None
    neighbours_of: str | None = None
    kl: float | None = None
    protocol: Literal["prob", "token", "greedy"] = "prob"
    heldout: bool = Field(default=False, exclude_if=lambda v: not v)


class MethodHint(Node):
    """How the user wants the edit made (``auto`` lets the planner choose)."""

    kind: Literal["method"] = "method"
    method: Method = "auto"  # "auto" lets the planner choose
    layers: tuple[int, ...] | None = None
    max_delta: float | None = None  # bound on relative weight change, ‖Δ‖/‖W‖
    frozen: bool = False  # weights must not change: external memory only


class ChatSetting(Node):
    """``chat on``: every prompt is asked as a user turn of the model's chat template.

    The edit, scope and preserve prompts (when compiling) and every prompt the
    verifier scores are wrapped with the tokenizer's ``apply_chat_template``
    (the user turn plus the generation prompt); the target follows as the
    assistant's answer. ``system``: a system message placed before the user turn
    (None: whatever the template adds by itself).
    """

    kind: Literal["chat"] = "chat"
    system: str | None = None


class Spec(Node):
    """A whole spec (after includes are merged).

    Attributes:
        model: model reference (alias, folder or hub id); None = default.
        seed: seed for every random choice made while compiling/verifying.
        order: ``batch`` (edits applied together) or ``sequence`` (in order).
        method: method hint and budgets.
        budget: seconds ``kmec compile`` may spend, repairs of failing claims included
            (None: the default, ``kmec.pipeline.DEFAULT_BUDGET_S``; 0: claims are not
            scored while compiling). Left out of the dump when unset, so specs
            without it keep their hash.
        chat: wrap prompts in the model's chat template (None: plain text prompts, the
            default). Left out of the dump when unset, like ``budget``.
        relations, edits, claims: the statements, in source order.
        includes: files included (resolved paths, for provenance).
        source: the file this spec was parsed from.
    """

    kind: Literal["spec"] = "spec"
    model: str | None = None
    seed: int = 0
    order: Literal["batch", "sequence"] = "batch"
    method: MethodHint = MethodHint()
    budget: float | None = Field(default=None, exclude_if=lambda v: v is None)
    chat: ChatSetting | None = Field(default=None, exclude_if=lambda v: v is None)
    relations: tuple[Relation, ...] = ()
    edits: tuple[Edit, ...] = ()
    claims: tuple[Claim, ...] = ()
    includes: tuple[str, ...] = ()
    source: str | None = Field(default=None, exclude=True)

    def relation(self, name: str) -> Relation | None:
        """The relation called ``name``, or None."""
        return next((r for r in self.relations if r.name == name), None)


def spec_json_schema() -> dict[str, Any]:
    """JSON Schema of :class:`Spec` (for editors and review tools)."""
    return Spec.model_json_schema()


def strip_spans(spec: Spec) -> dict[str, Any]:
    """A JSON-ready dump of ``spec`` without spans (spans are excluded fields)."""
    return spec.model_dump(mode="json")
