"""The verification report: what was checked, on what, and what was found.

Contents:
    TopToken          a next token and its probability
    Side              one model's view of one probe (base or edited)
    ProbeResult       one prompt checked for one claim
    Counterexample    the minimal violating prompt hypothesis shrank to
    ClaimResult       one claim on one edit: pass / fail / n/a, score, probes
    EditRow           per-edit before/after table row
    AuditSection      the weight-diff audit
    CapabilitySection perplexity and general questions (general-capability canaries)
    PlusRow           CounterFact+-style neighbourhood KL with the edit prepended
    Split             a claim's metric on declared and on held-out prompts, over all edits
    Aggregate         survey-style aggregates (means over edits, Sca, Ret, the split)
    Report            everything above plus the spec, plan and hashes

A report is deterministic: the same inputs give the same JSON, except the
``timing`` mapping, which holds what may differ between identical runs
(durations, cache statistics, examples replayed from the database).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT = "kmec-report/1"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TopToken(_Frozen):
    token: str
    prob: float


class Side(_Frozen):
    """One model's view of one probe.

    Attributes:
        p_target: per-token probability of the target (exp mean log-prob).
        p_old: the same for the old target, when declared.
        token_accuracy: teacher-forced token accuracy of the target.
        exact: greedy decoding emits the target.
        top: top next tokens after the prompt.
        kl: KL(base ‖ this) after the prompt (edited side only).
    """

    p_target: float | None = None
    p_old: float | None = None
    token_accuracy: float | None = None
    exact: bool | None = None
    top: tuple[TopToken, ...] = ()
    kl: float | None = None


class ProbeResult(_Frozen):
    """One prompt checked for one claim.

    ``kind`` is the probe's origin: efficacy, generality, portability,
    reversal, retention, preserve, or a neighbourhood source (neighbour,
    subject, question, corpus, neighbour+context; held-out variants: context,
    framing). ``value`` is the probe's success in [0, 1] under the claim's
    protocol (locality: 1 if base and edited agree). ``heldout``: the compiler
    was not shown this prompt (:func:`kmec.verify.claims.compiled_prompts`).
    """

    kind: str
    prompt: str
    target: str | None = None
    old: str | None = None
    value: float
    base_value: float | None = None
    ok: bool
    base: Side
    edited: Side
    heldout: bool = False


class Counterexample(_Frozen):
    """The simplest out-of-scope prompt on which the models disagree."""

    prompt: str
    source: str
    base_top: TopToken
    edited_top: TopToken
    kl: float
    why: str


class ClaimResult(_Frozen):
    """One claim evaluated on one edit.

    ``score`` (over ``probes``) decides the status. Beside it, the same metric on the
    prompts the compiler was shown (``declared_*``: the contract holds) and on prompts
    it never saw (``heldout_*``: the edit generalises). For generality and reversal the
    held-out side also counts drawn variants (``heldout_probes``), which gate only a
    ``heldout`` claim (whose ``probes`` they then are).
    """

    claim: str
    metric: str
    protocol: str
    threshold: float
    declared: bool
    edit: str
    status: Literal["pass", "fail", "n/a"]
    score: float | None = None
    n: int = 0
    magnitude: float | None = None
    kl_budget: float | None = None
    note: str = ""
    probes: tuple[ProbeResult, ...] = ()
    counterexample: Counterexample | None = None
    heldout: bool = False
    declared_score: float | None = None
    declared_n: int = 0
    heldout_score: float | None = None
    heldout_n: int = 0
    heldout_probes: tuple[ProbeResult, ...] = ()


class EditRow(_Frozen):
    """Per-edit summary: the edit prompt before and after, and each metric."""

    name: str
    step: str | None
    prompt: str
    target_new: str
    target_old: str | None
    base: Side
    edited: Side
    base_greedy: str
    edited_greedy: str
    starts_with_new: bool
    metrics: dict[str, float | None]


class AuditSection(_Frozen):
    ran: bool
    ok: bool = True
    declared: tuple[str, ...] = ()
    undeclared: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()
    checked: int = 0
    max_error: float = 0.0
    summary: str = ""


class QuestionResult(_Frozen):
    """One general question: ``counted`` is False when the base model's answer is a
    near tie (:data:`kmec.verify.evaluate.NEAR_TIE`), which no edit can be said to keep."""

    prompt: str
    base_answer: str
    edited_answer: str
    kl: float
    survived: bool
    counted: bool = True


class CapabilitySection(_Frozen):
    """General-capability canaries (checked when the spec claims locality)."""

    ran: bool
    ok: bool = True
    ppl_base: float | None = None
    ppl_edited: float | None = None
    ppl_ratio: float | None = None
    ppl_tolerance: float | None = None
    questions: tuple[QuestionResult, ...] = ()
    questions_survived: float | None = None
    questions_threshold: float | None = None


class PlusRow(_Frozen):
    """Neighbourhood prompts with the edit statement prepended (CounterFact+):
    "<edit prompt> <new>. <neighbour prompt>". Reported, not gated."""

    edit: str
    n: int
    mean_kl: float
    max_kl: float
    top1_agreement: float
    example: str


class Split(_Frozen):
    """One claim's metric over all edits on the prompts the compiler was shown (declared:
    the contract holds) and on those it never saw (held out: the edit generalises).
    Means over the edits that have such prompts; ``*_n``: prompts in all."""

    declared: float | None = None
    declared_n: int = 0
    heldout: float | None = None
    heldout_n: int = 0


class Aggregate(_Frozen):
    """Means over edits (the survey's expectations) and the batch/sequence metrics."""

    means: dict[str, float | None] = Field(default_factory=dict)
    split: dict[str, Split] = Field(default_factory=dict)
    scalability: float | None = None
    relative_scalability: float | None = None
    retention: float | None = None
    relative_retention: float | None = None
    notes: tuple[str, ...] = ()


class Report(_Frozen):
    """A complete verification report (see the module docstring).

    ``spec`` is the spec's canonical dump; ``spec_path`` the ``.kmec`` file it was parsed
    from and ``spec_source`` that file's text as it was read at verification time (both
    None for a spec built in Python; a report written before they existed reads as such).
    """

    format: str = FORMAT
    kmec_version: str
    ok: bool
    exit_code: int
    summary: str
    failed: tuple[str, ...] = ()
    model: str
    base_fingerprint: str
    spec_hash: str
    plan_hash: str | None
    artifact: dict[str, Any] = Field(default_factory=dict)
    order: str
    seed: int
    spec: dict[str, Any]
    spec_path: str | None = None
    spec_source: str | None = None
    plan: dict[str, Any] | None
    claims: tuple[ClaimResult, ...]
    edits: tuple[EditRow, ...]
    aggregate: Aggregate
    audit: AuditSection
    capability: CapabilitySection
    plus: tuple[PlusRow, ...] = ()
    notes: tuple[str, ...] = ()
    timing: dict[str, Any] = Field(default_factory=dict)

    def failures(self) -> tuple[ClaimResult, ...]:
        return tuple(c for c in self.claims if c.status == "fail")
