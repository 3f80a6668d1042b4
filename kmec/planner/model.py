"""The Plan: what ``kmec compile`` will do, in order, and why (frozen pydantic).

Contents:
    Reason        one choice and the evidence for it
    EditRequest   an edit with its templates rendered (what a backend receives)
    StatsRequest  second-moment statistics a step needs
    Cost          estimated seconds and peak memory of a step
    Chat          prompts are asked through the model's chat template (``chat on``)
    Step          one backend call: edits, layers, params, stats, reasons, cost
    Plan          ordered steps + provenance; canonical JSON and sha256

A plan is canonical JSON (sorted keys): the same spec, model and kmec version
give byte-identical plans, so ``plan.sha256`` identifies a compilation.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kmec.hashing import canonical_json, sha256_text


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Reason(_Frozen):
    """A choice the planner made and why (``choice`` is short, ``because`` a sentence)."""

    choice: str
    because: str


class EditRequest(_Frozen):
    """An edit as a backend sees it: rendered prompts and targets.

    Attributes:
        name: the spec's edit name (``kazakhstan``; ``kazakhstan~reverse`` for
            the paired inverse edit of a reversal claim).
        prompt: the edit prompt; the target follows it.
        subject: substring of ``prompt`` whose last token keys the edit
            (None: the prompt's last token).
        target_new: the new object (scored with a leading space when the
            prompt does not end in whitespace).
        target_old: the old object when declared.
        scope: other in-scope prompts (rendered paraphrases + extra prompts).
        inverse: True for the paired inverse edit added for a reversal claim.
        preserve: the edit's ``preserve`` prompts, whose output must not change
            (KL anchors for fine-tuning, negatives for a scope classifier).
        borrowed: the prompts of ``scope`` that the spec did not declare for this edit:
            wordings other edits of its relation declare, rendered with this edit's
            subject (:mod:`kmec.planner.passes.share_scope`). Left out of the dump when
            empty, so plans without any keep their bytes.
    """

    name: str
    prompt: str
    subject: str | None = None
    target_new: str
    target_old: str | None = None
    scope: tuple[str, ...] = ()
    inverse: bool = False
    preserve: tuple[str, ...] = ()
    borrowed: tuple[str, ...] = Field(default=(), exclude_if=lambda v: not v)


class StatsRequest(_Frozen):
    """Second moments ``E[k kᵀ]`` of the MLP keys a step needs."""

    site: Literal["mlp_out"] = "mlp_out"
    layers: tuple[int, ...]
    corpus: str = "default"
    tokens: int
    max_len: int
    dtype: str = "float32"
    products: Literal["float32", "bfloat16"] = "bfloat16"


class Cost(_Frozen):
    """Estimated cost of a step on the CPU (rough; for planning and display)."""

    seconds: float = 0.0
    peak_mb: float = 0.0


class Chat(_Frozen):
    """The spec's ``chat on``: every prompt becomes a user turn of the model's chat template.

    The planner only records it (it has no tokenizer); :func:`kmec.compile.execute`
    wraps the steps' prompts with :mod:`kmec.models.chat` before a backend sees them.
    ``system``: the system message (None: the template's own default, if any).
    """

    system: str | None = None


class Step(_Frozen):
    """One backend call.

    ``writes`` names every parameter the step may change (empty for the
    external memories, which change none): an artifact whose payloads touch
    any other parameter is refused (:func:`kmec.artifacts.check_against_plan`).
    ``protect`` is the step's declared locality set: prompts whose outputs the
    spec says must not move (its edits' ``preserve`` prompts and, for a
    ``locality ... neighbours of R`` claim, R's prompt rendered with R's other
    listed subjects). Backends that read it keep those prompts' MLP keys where
    they were (:mod:`kmec.planner.passes.declare_locality`).
    """

    id: str
    backend: str
    edits: tuple[EditRequest, ...]
    layers: tuple[int, ...] = ()
    writes: tuple[str, ...] = ()
    protect: tuple[str, ...] = ()
    params: dict[str, Any] = Field(default_factory=dict)
    needs_stats: StatsRequest | None = None
    reasons: tuple[Reason, ...] = ()
    cost: Cost = Cost()


class Plan(_Frozen):
    """An ordered list of steps plus what it was planned from."""

    kmec_version: str
    spec_hash: str
    model: str
    model_fingerprint: str
    model_arch: str
    seed: int
    order: Literal["batch", "sequence"]
    steps: tuple[Step, ...]
    reasons: tuple[Reason, ...] = ()
    cost: Cost = Cost()
    # left out of the JSON when off, so plans of specs without `chat` keep their bytes
    chat: Chat | None = Field(default=None, exclude_if=lambda v: v is None)

    def to_json(self) -> str:
        """Canonical JSON text (the bytes that are hashed and written to disk)."""
        return canonical_json(self.model_dump(mode="json"))

    @property
    def sha256(self) -> str:
        return sha256_text(self.to_json())
