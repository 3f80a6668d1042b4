"""Retrieval memory (SERAC/IKE-style): edits kept as text, a scope classifier, in-context answers.

Contents:
    RetrievalParams    embedder, threshold prior, margin, template (documented defaults)
    DEMO_TEMPLATE      the default in-context demonstration
    calibrate()        a per-edit cosine threshold from positives and negatives (pure)
    Retrieval          the backend (``name = "retrieval"``)

The encoder, the embeddings and the runtime scope classifier live with the
memory runtime in :mod:`kmec.artifacts.scope` (applying an artifact needs them;
compiling one imports them from there).

The model's weights are never touched. Compiling stores, per edit, the edit
itself as text (prompt, target) and as keys the embeddings of its in-scope
prompts (the edit prompt and, with ``use_scope``, the spec's scope prompts),
each bare and completed with the target: a query is the whole text the model
is given, which holds the target when it is scored teacher-forced or once it
has been generated (on 20 CounterFact edits, one edit prompt completed with
its target fell below its calibrated threshold against the bare key alone).
At run time (:mod:`kmec.artifacts.memory`) a query ``q`` is in scope of
key ``k_j`` when, with ``E`` the embedder (mean pooling, unit norm)::

    s(q, k_j) = max over segments t of q:  E(t) · k_j          (cosine similarity)
    j* = argmax_j s(q, k_j);   in scope  iff  s(q, k_j*) ≥ τ_e(j*)

and an in-scope query is answered by the *same* base model with the edit's
demonstration (IKE, Zheng et al. 2023: a copy demonstration followed by the
query) in front of it; an out-of-scope query goes to the base model untouched.
The table stores ``radius = 1 − τ`` per key (a cosine distance), so both memory
kinds read "within radius of the nearest key".

Threshold ``τ_e`` of edit ``e`` (:func:`calibrate`): positives are the
leave-one-out similarities of its in-scope prompts (each prompt against the
edit's *other* keys: how a paraphrase nobody declared would score), negatives
the similarities of the declared locality prompts (the edits' ``preserve``
prompts and the step's ``protect`` prompts: listed neighbours a locality claim
samples) whose nearest key is ``e``'s. Any
threshold in ``[max neg + margin, min pos]`` separates them; the prior
``threshold`` is clamped into that interval. When the interval is empty (not
separable) the threshold maximising balanced accuracy is taken. The prior
0.65 was measured with MiniLM on 20 CounterFact records: paraphrase recall 0.95,
neighbourhood prompts in scope 4.5 % (0.7: 0.90 / 4.5 %, 0.6: 0.975 / 5 %).

Segments: a query's last sentence is scored as well as its whole text, because
a long unrelated context before the question (CounterFact's paraphrases start
with a random sentence) dilutes a mean-pooled embedding: on the same records
the whole text alone reached the 0.65 threshold for fewer than half of them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from kmec.artifacts.payloads import MemoryTable, Payload
from kmec.artifacts.scope import best_per_query, embed, load_embedder_cached, segments
from kmec.backends.base import ExecContext
from kmec.errors import BackendError, ModelError
from kmec.models.facts import ModelFacts
from kmec.models.tokens import target_text
from kmec.planner import costs
from kmec.planner.backend_info import BackendInfo, Work
from kmec.planner.model import Step

DEMO_TEMPLATE = ("New Fact: {prompt} {target}\nPrompt: {prompt} {target}\n\n"
                 "New Fact: {prompt} {target}\nPrompt:\n")


class RetrievalParams(BaseModel):
    """Retrieval-memory hyper-parameters (the model's layers play no part).

    Attributes:
        embedder: sentence encoder (alias, folder or hub id), mean-pooled.
        threshold: prior cosine threshold τ₀, clamped into the separating
            interval the spec's prompts allow (see the module docstring).
        margin: negatives must score at least this far below τ.
        use_scope: embed the spec's scope prompts as keys too.
        template: the demonstration placed before an in-scope query
            (``{prompt}`` and ``{target}`` are the edit's).
        max_length: embedder truncation, in its tokens.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    embedder: str = "minilm"
    threshold: float = Field(default=0.65, gt=-1.0, lt=1.0)
    margin: float = Field(default=0.02, ge=0.0)
    use_scope: bool = True
    template: str = DEMO_TEMPLATE
    max_length: int = Field(default=256, gt=0)


# ---------------------------------------------------------------- embeddings


# ---------------------------------------------------------------- calibration


def calibrate(pos: Sequence[float], neg: Sequence[float], prior: float, margin: float) -> float:
    """A cosine threshold τ: ``prior`` clamped into ``[max(neg) + margin, min(pos)]``.

    Without negatives the lower end is −1, without positives the upper end is
    1. When ``max(neg) + margin > min(pos)`` no threshold separates them, and
    the one with the best balanced accuracy ``(TPR + TNR) / 2`` is returned
    (midpoint between neighbouring scores; the highest on ties, which favours
    locality).

    >>> calibrate([0.9, 0.8], [0.5], prior=0.65, margin=0.02)
    0.65
    >>> calibrate([0.9], [0.7], prior=0.65, margin=0.02)
    0.72
    >>> calibrate([0.6], [], prior=0.65, margin=0.02)
    0.6
    >>> calibrate([0.9, 0.5], [0.7], prior=0.65, margin=0.02)
    0.8
    """
    lo = max(neg) + margin if neg else -1.0
    hi = min(pos) if pos else 1.0
    if lo <= hi:  # rounded for the manifest, but never past an end of the interval
        return min(max(round(min(max(prior, lo), hi), 6), lo), hi)
    scores = sorted(set(pos) | set(neg))
    cuts = [(a + b) / 2 for a, b in itertools.pairwise(scores)] + [scores[-1] + margin]
    best, best_acc = cuts[-1], -1.0
    for cut in cuts:
        tpr = sum(p >= cut for p in pos) / len(pos)
        tnr = sum(n < cut for n in neg) / len(neg)
        acc = (tpr + tnr) / 2
        if acc >= best_acc:
            best, best_acc = cut, acc
    return round(best, 6)


# ---------------------------------------------------------------- backend


EMBEDDER_PARAMS = 22_700_000  # all-MiniLM-L6-v2


def _cost(step: Step, facts: ModelFacts, setup: bool) -> Work:
    """One pass of the sentence encoder over the edit, scope and preserve prompts (each with
    its last sentence)."""
    prompts = sum(1 + len(e.scope) for e in step.edits)
    texts = 2 * (prompts + len(set(step.protect) | {x for e in step.edits for x in e.preserve}))
    secs = costs.seconds(texts * costs.PROMPT_TOKENS, EMBEDDER_PARAMS)
    return Work(secs, EMBEDDER_PARAMS * 4 / costs.MB, (f"embedding {texts} texts {secs:.1f} s",))


INFO = BackendInfo(
    name="retrieval", changes="memory", layers="none",
    no_layers_note="the retrieval memory reads the input text and answers in context: it "
    "edits no layer", writes_site=None, uses=frozenset({"scope", "preserve", "locality"}),
    cost=_cost)


class Retrieval:
    """Edits as text + a MiniLM scope classifier + in-context answers; no weight changes."""

    name: ClassVar[str] = "retrieval"
    info: ClassVar[BackendInfo] = INFO
    Params: ClassVar[type[BaseModel]] = RetrievalParams

    def default_params(self, facts: ModelFacts) -> RetrievalParams:
        return RetrievalParams()

    def execute(self, step: Step, ctx: ExecContext) -> Sequence[Payload]:
        p = RetrievalParams.model_validate(step.params)
        if ctx.tok is None:
            raise BackendError("the retrieval memory needs the model's tokenizer", step_id=step.id)
        if "{prompt}" not in p.template or "{target}" not in p.template:
            raise BackendError("the retrieval template must contain {prompt} and {target}",
                               step_id=step.id)
        try:
            model, etok, fp = load_embedder_cached(p.embedder)
        except ModelError as e:
            raise BackendError(f"cannot load the scope embedder {p.embedder!r}: {e.message}",
                               step_id=step.id, hint=e.hint) from None
        edits = step.edits
        texts, owner, source = [], [], []
        for i, e in enumerate(edits):
            for t in dict.fromkeys((e.prompt, *(e.scope if p.use_scope else ()))):
                s = len(texts) // 2  # keys come in pairs: bare, completed
                texts += [t, t + target_text(t, e.target_new)]
                owner += [i, i]
                source += [s, s]
        keys = embed(model, etok, texts, max_length=p.max_length)
        thresholds, notes = self._thresholds(p, model, etok, keys, owner, source, texts, edits,
                                             step.protect)
        radius = torch.tensor([1.0 - thresholds[i] for i in owner], dtype=torch.float32)
        for i, e in enumerate(edits):
            ctx.log.debug("retrieval %s: threshold %.3f (%s)", e.name, thresholds[i], notes[i])
        if ctx.progress:
            ctx.progress("retrieval memory", len(edits), len(edits))
        meta = {
            "kind": "retrieval", "embedder": p.embedder, "embedder_fingerprint": fp,
            "max_length": p.max_length, "template": p.template,
            "segments": "whole text and last sentence", "similarity": "cosine, mean pooling",
            "edits": [{"name": e.name, "prompt": e.prompt, "target": e.target_new,
                       "threshold": thresholds[i], "calibration": notes[i]}
                      for i, e in enumerate(edits)],
        }
        site = getattr(ctx.model, "base_model_prefix", "") or "model"
        return [MemoryTable(site=site, layer=-1, keys=keys,
                            values=torch.tensor(owner, dtype=torch.long), radius=radius, meta=meta)]

    @staticmethod
    def _thresholds(p: RetrievalParams, model: Any, etok: Any, keys: torch.Tensor,
                    owner: list[int], source: list[int], texts: list[str],
                    edits: Sequence[Any], protect: Sequence[str] = ()) -> tuple[list[float], list[str]]:
        """Per edit: τ from leave-one-out positives and nearest-key preserve negatives.

        A positive is an in-scope prompt (bare or completed) scored against the
        edit's keys that come from its *other* in-scope prompts.
        """
        n = len(edits)
        pos: list[list[float]] = [[] for _ in range(n)]
        neg: list[list[float]] = [[] for _ in range(n)]
        own, src = torch.tensor(owner), torch.tensor(source)
        seg = [segments(t) for t in texts]
        q = best_per_query(embed(model, etok, [s for g in seg for s in g], max_length=p.max_length)
                  @ keys.T, [len(g) for g in seg])
        for r, sims in enumerate(q):
            others = (own == owner[r]) & (src != source[r])
            if bool(others.any()):
                pos[owner[r]].append(float(sims[others].max()))
        preserve = list(dict.fromkeys([x for e in edits for x in e.preserve] + list(protect)))
        if preserve:
            seg = [segments(t) for t in preserve]
            flat = embed(model, etok, [s for g in seg for s in g], max_length=p.max_length)
            for sims in best_per_query(flat @ keys.T, [len(g) for g in seg]):
                j = int(sims.argmax())
                neg[owner[j]].append(float(sims[j]))
        taus = [calibrate(pos[i], neg[i], p.threshold, p.margin) for i in range(n)]
        notes = [f"{len(pos[i]) // 2} held-out in-scope prompts, {len(neg[i])} preserve; "
                 f"prior {p.threshold:g}" for i in range(n)]
        return taus, notes
