"""Evaluate claims on cached scores: probes -> ClaimResult, edits -> EditRow.

Contents:
    Decoder          token id -> text, memoised
    side()           an ItemScore as a report Side
    probe_claim()    efficacy / generality / portability / reversal / retention on one edit
    locality_claim() locality on one edit from its preserve prompts and drawn neighbours
    counterexample() a report Counterexample for a violating prompt
    edit_row()       the per-edit before/after row
    capability()     perplexity ratio and general-question survival

Nothing here runs a model except through :class:`ScoreCache` (which scores
what it has not seen); the runner prefetches everything in batches first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kmec.spec import Claim
from kmec.verify import metrics
from kmec.verify.claims import Case, Check, claim_label
from kmec.verify.report import (
    CapabilitySection,
    ClaimResult,
    Counterexample,
    EditRow,
    ProbeResult,
    QuestionResult,
    Side,
    TopToken,
)
from kmec.verify.scoring import Item, ItemScore, ScoreCache
from kmec.verify.strategies import Draw

EPS = 1e-9  # scores are compared to thresholds with this slack (float means of 0/1)
LOCALITY_TOP = 3  # top tokens kept per locality probe (the report stays small)


class Decoder:
    """Token id -> text, memoised (reports decode the same ids many times)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self._memo: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self._memo:
            self._memo[token_id] = self.tok.decode([token_id])
        return self._memo[token_id]


def _top(score: ItemScore, dec: Decoder, k: int) -> tuple[TopToken, ...]:
    return tuple(TopToken(token=dec(i), prob=round(p, 6))
                 for i, p in list(zip(score.top_ids, score.top_probs))[:k])


def side(score: ItemScore, dec: Decoder, old: ItemScore | None = None, *, k: int = 5,
         with_target: bool = True, kl: bool = False) -> Side:
    """An ItemScore as a report :class:`Side` (numbers rounded for stable JSON)."""
    return Side(
        p_target=round(score.prob, 6) if with_target and score.target_ids else None,
        p_old=round(old.prob, 6) if old is not None else None,
        token_accuracy=round(score.token_accuracy, 6) if with_target and score.target_ids else None,
        exact=score.exact if with_target and score.target_ids else None,
        top=_top(score, dec, k),
        kl=round(score.kl, 6) if kl else None,
    )


def _status(score: float, threshold: float) -> str:
    return "pass" if score + EPS >= threshold else "fail"


def _probe(p: Check, kind: str, protocol: str, threshold: float, cache: ScoreCache,
           dec: Decoder, heldout: bool = False) -> tuple[ProbeResult, float]:
    b_new, e_new = cache.get(Item(p.prompt, p.target))
    b_old, e_old = cache.get(Item(p.prompt, p.old)) if p.old is not None else (None, None)
    value = metrics.probe_value(e_new, e_old, protocol)
    result = ProbeResult(kind=kind, prompt=p.prompt, target=p.target, old=p.old,
                         value=round(value, 6),
                         base_value=round(metrics.probe_value(b_new, b_old, protocol), 6),
                         ok=value + EPS >= threshold if protocol == "token" else value == 1.0,
                         base=side(b_new, dec, b_old), edited=side(e_new, dec, e_old, kl=True),
                         heldout=heldout)
    return result, metrics.magnitude(e_new, e_old)


_METRIC_FN = {"efficacy": metrics.accuracy, "generality": metrics.generality,
              "portability": metrics.portability, "reversal": metrics.reversal,
              "retention": metrics.retention}


def probes_of(claim: Claim, case: Case) -> tuple[Check, ...]:
    """The probes a non-locality claim checks on ``case``."""
    m = claim.metric
    if m in ("efficacy", "retention"):
        return (case.efficacy,)
    return {"generality": case.generality, "portability": case.portability,
            "reversal": case.reversal}[m]


def _part(results: Sequence[ProbeResult], fn: Any) -> tuple[float | None, int]:
    """The metric over some probes (None when there are none) and how many."""
    return (round(fn([r.value for r in results]), 6) if results else None), len(results)


def probe_claim(claim: Claim, declared: bool, case: Case, cache: ScoreCache, dec: Decoder,
                note: str = "", *, compiled: frozenset[str] | None = None,
                variants: Sequence[tuple[str, Check]] = ()) -> ClaimResult:
    """Evaluate an efficacy, generality, portability, reversal or retention claim.

    ``compiled``: the prompts the compiler was shown (None: all of them, nothing is
    held out); ``variants``: drawn held-out variants ``(source, check)`` of the
    claim's prompts (generality, reversal), scored on the held-out side and, for a
    ``heldout`` claim, the probes that decide it.
    """
    kind = claim.metric
    fn = _METRIC_FN[kind]
    own = [_probe(p, kind, claim.protocol, claim.threshold, cache, dec,
                  heldout=compiled is not None and p.prompt not in compiled)
           for p in probes_of(claim, case)]
    drawn = [_probe(c, src, claim.protocol, claim.threshold, cache, dec, heldout=True)
             for src, c in variants]
    seen = [r for r, _ in own if not r.heldout]
    unseen = [r for r, _ in own if r.heldout] + [r for r, _ in drawn]
    scored = ([x for x in own if x[0].heldout] + drawn) if claim.heldout else own
    extra = () if claim.heldout else tuple(r for r, _ in drawn)
    results = [r for r, _ in scored]
    mags = [m for _, m in scored]
    d_score, d_n = _part(seen, fn)
    h_score, h_n = _part(unseen, fn)
    common: dict[str, Any] = {
        "claim": claim_label(claim), "metric": kind, "protocol": claim.protocol,
        "threshold": claim.threshold, "declared": declared, "edit": case.name,
        "heldout": claim.heldout, "declared_score": d_score, "declared_n": d_n,
        "heldout_score": h_score, "heldout_n": h_n, "heldout_probes": extra}
    if not results:
        return ClaimResult(**common, note=note or "no held-out prompt could be drawn",
                           status="n/a")
    score = fn([r.value for r in results])
    return ClaimResult(**common, note=note, status=_status(score, claim.threshold),
                       score=round(score, 6),
                       n=len(results), magnitude=round(sum(mags) / len(mags), 6),
                       probes=tuple(results))


def counterexample(draw: Draw, cache: ScoreCache, dec: Decoder, kl_budget: float | None) -> Counterexample:
    """Describe why the models disagree on ``draw``."""
    b, e = cache.get(Item(draw.prompt))
    if b.top1 != e.top1:
        why = f"top-1 changed from {dec(b.top1)!r} to {dec(e.top1)!r}"
    else:
        why = f"KL {e.kl:.4g} nats exceeds the budget {kl_budget:g}"
    return Counterexample(prompt=draw.prompt, source=draw.source,
                          base_top=_top(b, dec, 1)[0], edited_top=_top(e, dec, 1)[0],
                          kl=round(e.kl, 6), why=why)


def locality_claim(claim: Claim, declared: bool, case: Case, draws: Sequence[Draw],
                   cache: ScoreCache, dec: Decoder, found: Counterexample | None,
                   note: str = "", *, compiled: frozenset[str] | None = None) -> ClaimResult:
    """Locality on ``case``: declared preserve prompts plus the drawn neighbourhood.

    ``compiled``: the prompts the compiler was shown (None: all). A ``heldout`` claim
    leaves those out (its draws come from a space without them); every claim reports
    the agreement on each side.
    """
    probes = [Draw("preserve", p) for p in case.preserve]
    seen = set(case.preserve)
    for d in draws:
        if d.prompt not in seen:
            seen.add(d.prompt)
            probes.append(d)
    results, flags = [], []
    for d in probes:
        unseen = compiled is not None and d.prompt not in compiled
        if claim.heldout and not unseen:
            continue
        b, e = cache.get(Item(d.prompt))
        ok = metrics.agrees(b, e, claim.kl)
        flags.append(ok)
        results.append(ProbeResult(kind=d.source, prompt=d.prompt, value=1.0 if ok else 0.0, ok=ok,
                                   base=side(b, dec, k=LOCALITY_TOP, with_target=False),
                                   edited=side(e, dec, k=LOCALITY_TOP, with_target=False, kl=True),
                                   heldout=unseen))
    score = metrics.locality(flags)
    d_score, d_n = _part([r for r in results if not r.heldout], metrics.locality)
    h_score, h_n = _part([r for r in results if r.heldout], metrics.locality)
    return ClaimResult(claim=claim_label(claim), metric="locality", protocol="top1+kl"
                       if claim.kl is not None else "top1", threshold=claim.threshold,
                       declared=declared, edit=case.name,
                       status=_status(score, claim.threshold) if results else "n/a",
                       score=round(score, 6) if results else None, n=len(results),
                       kl_budget=claim.kl, note=note or ("" if results else "no out-of-scope prompt could be drawn"),
                       probes=tuple(results), counterexample=found, heldout=claim.heldout,
                       declared_score=d_score, declared_n=d_n, heldout_score=h_score,
                       heldout_n=h_n)


def edit_row(case: Case, cache: ScoreCache, dec: Decoder, greedy: tuple[str, str],
             claims: Sequence[ClaimResult]) -> EditRow:
    """The before/after row of one edit (probabilities under the ``prob`` view)."""
    p = case.efficacy
    b_new, e_new = cache.get(Item(p.prompt, p.target))
    b_old, e_old = cache.get(Item(p.prompt, p.old)) if p.old is not None else (None, None)
    row_metrics: dict[str, float | None] = {
        "efficacy": metrics.probe_value(e_new, e_old, "prob"),
        "magnitude": round(metrics.magnitude(e_new, e_old), 6),
    }
    for c in claims:
        if c.edit == case.name and c.status != "n/a" and c.claim not in row_metrics:
            row_metrics[c.claim] = c.score
    new = p.target.strip()
    return EditRow(name=case.name, step=case.step, prompt=p.prompt, target_new=p.target,
                   target_old=p.old, base=side(b_new, dec, b_old), edited=side(e_new, dec, e_old, kl=True),
                   base_greedy=greedy[0], edited_greedy=greedy[1],
                   starts_with_new=bool(new) and greedy[1].lstrip().startswith(new),
                   metrics=row_metrics)


# A general question counts only when the base model answers it: its second answer has
# less than this share of the first's probability. SmolLM2-135M gives "Two plus two
# equals" ' five' 0.137 / ' four' 0.127 and "The color of the sky on a clear day is"
# ' a' 0.118 / ' ' 0.114: which of two near-equal tokens comes first is not knowledge
# an edit keeps or loses (and any edit tips it either way).
NEAR_TIE = 0.9


def decided(score: ItemScore) -> bool:
    """Whether the base model's top answer is clear (not a near tie, see NEAR_TIE)."""
    p = score.top_probs
    return len(p) < 2 or p[1] < NEAR_TIE * p[0]


def capability(ppl: tuple[float, float], tolerance: float, questions: Sequence[str],
               threshold: float, cache: ScoreCache, dec: Decoder) -> CapabilitySection:
    """Perplexity ratio within ``1 + tolerance`` and general questions whose
    top-1 answer survives at a rate of at least ``threshold`` (over the questions
    the base model answers clearly: :func:`decided`)."""
    ratio = metrics.perplexity_ratio(*ppl)
    rows = []
    for q in questions:
        b, e = cache.get(Item(q))
        rows.append(QuestionResult(prompt=q, base_answer=dec(b.top1), edited_answer=dec(e.top1),
                                   kl=round(e.kl, 6), survived=b.top1 == e.top1,
                                   counted=decided(b)))
    counted = [r for r in rows if r.counted]
    survived = sum(r.survived for r in counted) / len(counted) if counted else 1.0
    ok = ratio <= 1 + tolerance + EPS and survived + EPS >= threshold
    return CapabilitySection(ran=True, ok=ok, ppl_base=round(ppl[0], 4), ppl_edited=round(ppl[1], 4),
                             ppl_ratio=round(ratio, 6), ppl_tolerance=tolerance,
                             questions=tuple(rows), questions_survived=round(survived, 6),
                             questions_threshold=threshold)
