"""Retrieval memory (SERAC/IKE-style): edits kept as text, a scope classifier, in-context answers.

Contents:
    RetrievalParams    embedder, threshold prior, margin, template (documented defaults)
    DEMO_TEMPLATE      the default in-context demonstration
    load_embedder_cached()  the sentence encoder, its fingerprint (one load per process)
    embed()            mean-pooled, L2-normalised sentence embeddings
    segments()         the texts a query is judged by: whole text and last sentence
    calibrate()        a per-edit cosine threshold from positives and negatives (pure)
    ScopeClassifier    runtime routing: each position of each row -> an edit or None
    Retrieval          the backend (``name = "retrieval"``)

The model's weights are never touched. Compiling stores, per edit, the edit
itself as text (prompt, target) and as keys the embeddings of its in-scope
prompts (the edit prompt and, with ``use_scope``, the spec's scope prompts),
each bare and completed with the target: a query is the whole text the model
is given, which holds the target when it is scored teacher-forced or once it
has been generated (on 20 CounterFact edits, one edit prompt completed with
its target fell below its calibrated threshold against the bare key alone).
At run time (:mod:`kmec.backends.memory_hook`) a query ``q`` is in scope of
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
the similarities of ``preserve`` prompts whose nearest key is ``e``'s. Any
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

import functools
import itertools
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from kmec.backends.base import ExecContext, MemoryTable, Payload
from kmec.backends.keys import target_text
from kmec.errors import ArtifactError, BackendError, ModelError
from kmec.models.facts import ModelFacts
from kmec.planner.model import Step

DEMO_TEMPLATE = ("New Fact: {prompt} {target}\nPrompt: {prompt} {target}\n\n"
                 "New Fact: {prompt} {target}\nPrompt:\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
EMBED_BATCH = 64
QUERY_CACHE = 200_000  # query texts whose decision a classifier remembers


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


@functools.lru_cache(maxsize=2)
def load_embedder_cached(ref: str) -> tuple[Any, Any, str]:
    """``(model, tokenizer, fingerprint)`` of the sentence encoder ``ref``.

    Cached per process: the encoder is read-only, and every retrieval table
    (and every compile step) would otherwise load and hash it again.

    Raises:
        ModelError: the encoder cannot be installed or loaded.
    """
    from kmec.models.load import ALIASES, fingerprint_model, install_alias, load_embedder

    if ref in ALIASES:
        install_alias(ref)
    model, tok = load_embedder(ref)
    model.requires_grad_(False)
    return model, tok, fingerprint_model(model)


@torch.no_grad()
def embed(model: Any, tok: Any, texts: Sequence[str], *, max_length: int = 256) -> torch.Tensor:
    """Unit-norm mean-pooled embeddings ``[len(texts), d]`` (float32, CPU).

    ``e(t) = normalise(Σ_i m_i h_i / Σ_i m_i)`` over the encoder's last hidden
    states ``h`` and attention mask ``m`` (the all-MiniLM-L6-v2 recipe).
    """
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), EMBED_BATCH):
        chunk = [t if t.strip() else "." for t in texts[start:start + EMBED_BATCH]]
        batch = tok(chunk, padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt").to(device)
        h = model(**batch).last_hidden_state.float()
        m = batch["attention_mask"].unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1))
    if not out:
        return torch.zeros(0, getattr(model.config, "hidden_size", 1))
    return torch.cat(out).cpu()


def segments(text: str) -> list[str]:
    """The texts a query is judged by: the whole text and, if different, its last sentence.

    >>> segments("It rained. The capital of France is")
    ['It rained. The capital of France is', 'The capital of France is']
    >>> segments("The capital of France is")
    ['The capital of France is']
    """
    whole = text.strip()
    parts = [p.strip() for p in _SENTENCE_END.split(whole) if p.strip()]
    last = parts[-1] if parts else whole
    return [whole] if last == whole else [whole, last]


def _best(sims: torch.Tensor, owners: Sequence[int]) -> list[torch.Tensor]:
    """Per segment group, the max similarity (rows = segments of one query)."""
    out, start = [], 0
    for n in owners:
        out.append(sims[start:start + n].max(dim=0).values)
        start += n
    return out


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


# ---------------------------------------------------------------- runtime classifier


class ScopeClassifier:
    """Routes token sequences: the demonstration's token ids when in scope, else None.

    Built from one or more retrieval tables (all compiled with the same
    embedder); the nearest key over all of them decides.
    """

    def __init__(self, keys: torch.Tensor, radius: torch.Tensor, owner: list[tuple[int, int]],
                 tables: Sequence[MemoryTable], tok: Any) -> None:
        meta = tables[0].meta
        self.model, self.etok, fp = load_embedder_cached(meta["embedder"])
        for t in tables:
            if t.meta.get("embedder_fingerprint") != fp:
                raise ModelError(
                    f"the retrieval memory was compiled with embedder {t.meta.get('embedder')!r} "
                    f"(fingerprint {str(t.meta.get('embedder_fingerprint'))[:12]}), but the one "
                    f"installed here has fingerprint {fp[:12]}",
                    hint="install the embedder the artifact names, or recompile the spec")
        self.keys, self.radius, self.owner, self.tables, self.tok = keys, radius, owner, tables, tok
        self.max_length = int(meta.get("max_length", 256))
        self._queries: OrderedDict[str, tuple[int, int] | None] = OrderedDict()
        self._demos: dict[tuple[int, int], list[int]] = {}

    @classmethod
    def from_tables(cls, tables: Sequence[MemoryTable], tok: Any) -> ScopeClassifier:
        refs = {t.meta.get("embedder") for t in tables}
        if len(refs) != 1:
            raise ArtifactError(f"retrieval tables compiled with different embedders {sorted(refs)} "
                                "cannot share one model", hint="recompile them with one embedder")
        keys = torch.cat([t.keys.float() for t in tables])
        radius = torch.cat([t.radius.float() for t in tables])
        owner = [(ti, int(v)) for ti, t in enumerate(tables) for v in t.values.tolist()]
        return cls(keys, radius, owner, tables, tok)

    def decide(self, texts: Sequence[str]) -> list[tuple[int, int] | None]:
        """For each text, the (table, edit) it is in scope of, or None."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._queries]
        if missing:
            segs = [segments(t) for t in missing]
            flat = embed(self.model, self.etok, [s for g in segs for s in g],
                         max_length=self.max_length)
            for text, sims in zip(missing, _best(flat @ self.keys.T, [len(g) for g in segs])):
                j = int(sims.argmax())
                inside = bool(sims[j] >= 1.0 - self.radius[j] - 1e-6)
                self._queries[text] = self.owner[j] if inside else None
                if len(self._queries) > QUERY_CACHE:
                    self._queries.popitem(last=False)
        return [self._queries[t] for t in texts]

    def route(self, rows: Sequence[list[int]]) -> list[list[tuple[int, int] | None]]:
        """For each row of token ids and each of its positions, the edit whose
        scope the text up to and including that token is in (None: no edit)."""
        prefixes = [[self.tok.decode(r[:t + 1], skip_special_tokens=True) for t in range(len(r))]
                    for r in rows]
        flat = self.decide([t for p in prefixes for t in p])
        out, start = [], 0
        for p in prefixes:
            out.append(flat[start:start + len(p)])
            start += len(p)
        return out

    def demo(self, owner: tuple[int, int]) -> list[int]:
        if owner not in self._demos:
            table, edit = owner
            meta = self.tables[table].meta
            e = meta["edits"][edit]
            text = meta["template"].format(prompt=e["prompt"], target=e["target"])
            self._demos[owner] = list(self.tok.encode(text, add_special_tokens=False))
        return self._demos[owner]


# ---------------------------------------------------------------- backend


class Retrieval:
    """Edits as text + a MiniLM scope classifier + in-context answers; no weight changes."""

    name: ClassVar[str] = "retrieval"
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
        thresholds, notes = self._thresholds(p, model, etok, keys, owner, source, texts, edits)
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
                    edits: Sequence[Any]) -> tuple[list[float], list[str]]:
        """Per edit: τ from leave-one-out positives and nearest-key preserve negatives.

        A positive is an in-scope prompt (bare or completed) scored against the
        edit's keys that come from its *other* in-scope prompts.
        """
        n = len(edits)
        pos: list[list[float]] = [[] for _ in range(n)]
        neg: list[list[float]] = [[] for _ in range(n)]
        own, src = torch.tensor(owner), torch.tensor(source)
        seg = [segments(t) for t in texts]
        q = _best(embed(model, etok, [s for g in seg for s in g], max_length=p.max_length)
                  @ keys.T, [len(g) for g in seg])
        for r, sims in enumerate(q):
            others = (own == owner[r]) & (src != source[r])
            if bool(others.any()):
                pos[owner[r]].append(float(sims[others].max()))
        preserve = list(dict.fromkeys(x for e in edits for x in e.preserve))
        if preserve:
            seg = [segments(t) for t in preserve]
            flat = embed(model, etok, [s for g in seg for s in g], max_length=p.max_length)
            for sims in _best(flat @ keys.T, [len(g) for g in seg]):
                j = int(sims.argmax())
                neg[owner[j]].append(float(sims[j]))
        taus = [calibrate(pos[i], neg[i], p.threshold, p.margin) for i in range(n)]
        notes = [f"{len(pos[i]) // 2} held-out in-scope prompts, {len(neg[i])} preserve; "
                 f"prior {p.threshold:g}" for i in range(n)]
        return taus, notes
