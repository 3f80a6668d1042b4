"""``verify``: evaluate every claim of a spec on a base and an edited model.

Contents:
    verify()        Spec + Plan + base/edited models -> Report (reads models, never writes them)
    prime_base()    the base model's side of a later verify(), into its memo (compile)
    PPL_TOLERANCE   how much the corpus-slice perplexity may rise

The run, in order:

1. Cases: one per user edit (:mod:`kmec.verify.claims`).
2. Samples: for every locality claim and edit, hypothesis draws the
   neighbourhood (generation only, seeded) and the example database's stored
   failures are read back (replayed first, so a failure found once is checked
   again).
3. One batched scoring pass over every prompt any check needs, on both models
   at once (:class:`kmec.verify.scoring.ScoreCache`).
4. Claims are evaluated from the cache; for a locality claim with a
   violation, hypothesis searches again (same seed: the same draws) and
   shrinks the first failure to a minimal counterexample, which is saved to
   the database and added to the sample (so the next run, which replays it,
   gives the same report).
5. Canaries (perplexity, general questions), CounterFact+ prefixed
   neighbourhoods, greedy continuations of the edit prompts.
6. Retention / scalability on partial applications of the artifact, and
   the weight-diff audit, when the artifact is given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase

from kmec._version import __version__
from kmec.artifacts import Artifact
from kmec.errors import VerifyError
from kmec.hashing import canonical_json, sha256_text, spec_hash
from kmec.models.chat import chat_frame
from kmec.planner.model import Plan
from kmec.progress import Progress
from kmec.spec import Claim, Spec
from kmec.verify import canaries, metrics
from kmec.verify.claims import (
    Case,
    Check,
    build_cases,
    claim_label,
    claims_of,
    compiled_prompts,
    in_scope,
    not_applicable,
)
from kmec.verify.decode import greedy_continuations, perplexity
from kmec.verify.evaluate import (
    Decoder,
    capability,
    counterexample,
    edit_row,
    locality_claim,
    probe_claim,
)
from kmec.verify.extras import audit_section, plus_items, plus_rows, step_scores
from kmec.verify.report import (
    Aggregate,
    AuditSection,
    CapabilitySection,
    ClaimResult,
    Counterexample,
    Report,
    Split,
)
from kmec.verify.scoring import BaseMemo, Item, ScoreCache
from kmec.verify.strategies import (
    Draw,
    NeighbourSpace,
    minimal_failure,
    neighbour_space,
    replay,
    sample,
)
from kmec.verify.variants import HELDOUT_SAMPLE, REPORT_SAMPLE, heldout_checks

log = logging.getLogger("kmec")

PPL_TOLERANCE = 0.05  # edited/base perplexity of the corpus slice may be at most 1.05
DEFAULT_SAMPLE = 50  # locality draws per edit when a claim gives no `sample`
GREEDY_TOKENS = 8  # at most; the longest new target + 3 tokens suffices to show it


@dataclass
class VerifyMemo:
    """What verifications of several edited models against one base model, spec, plan
    edits and seed share (compile's repair loop passes one to each attempt): the
    base model's scores, the sampled neighbourhoods and the base perplexity. A
    verification with a memo gives the report it would give without one. ``draws``
    may be a :class:`kmec.verify.drawstore.DrawStore`, which keeps them across
    processes (compile draws what ``kmec verify`` then reads)."""

    base: BaseMemo = field(default_factory=BaseMemo)
    draws: MutableMapping[str, list[Draw]] = field(default_factory=dict)
    base_ppl: float | None = None
    # the base model's greedy continuations of the edit prompts, by :func:`_greedy_key`
    base_greedy: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _seed_for(seed: int, *parts: str) -> int:
    return int(sha256_text("|".join((str(seed), *parts)))[:16], 16)


@dataclass
class _Job:
    """One locality property: a claim on an edit, its space and its draws."""

    index: int
    claim: Claim
    declared: bool
    case: Case
    space: NeighbourSpace
    key: str
    seed_value: int
    n: int
    draws: list[Draw] = field(default_factory=list)


class _Run:
    """The state of one verification (models, cache, database, timings)."""

    def __init__(self, spec: Spec, plan: Plan | None, base: Any, edited: Any, tok: Any, seed: int,
                 max_examples: int | None, db: ExampleDatabase | None,
                 progress: Progress | None, root: str | Path | None = None,
                 memo: VerifyMemo | None = None, heldout_draw: str = "verify",
                 report_heldout: bool = True) -> None:
        self.root = root
        self.spec, self.plan, self.base, self.edited, self.tok = spec, plan, base, edited, tok
        self.seed, self.max_examples, self.db = seed, max_examples, db
        self.progress = progress or (lambda _s, _d, _t: None)
        self.memo = memo
        # `chat on`: every scored prompt is a user turn of the model's chat template
        self.chat = None if spec.chat is None else chat_frame(
            tok, system=spec.chat.system, model=plan.model if plan else spec.model or "the model")
        self.cache = ScoreCache([base, edited], tok, memo=memo.base if memo else None,
                                chat=self.chat)
        self.dec = Decoder(tok)
        self.cases: tuple[Case, ...] = build_cases(spec, plan)
        if not self.cases:
            raise VerifyError("the spec declares no edits: there is nothing to verify")
        self.claims = claims_of(spec)
        self.compiled = compiled_prompts(plan, spec, root=root)
        self.heldout_draw, self.report_heldout = heldout_draw, report_heldout
        self.variants: dict[tuple[str, str], tuple[tuple[str, Check], ...]] = {}
        self.timing: dict[str, float] = {}
        self.replayed = 0
        self.last_step = max(c.step_index for c in self.cases)

    def timed(self, name: str, t0: float) -> None:
        self.timing[name] = round(self.timing.get(name, 0.0) + time.perf_counter() - t0, 3)

    # -------------------------------------------------------------- sampling

    def locality_jobs(self) -> list[_Job]:
        t0 = time.perf_counter()
        excluded = in_scope(self.cases)
        jobs = []
        loc = [(i, c, d) for i, (c, d) in enumerate(self.claims) if c.metric == "locality"]
        for n_done, (ci, claim, declared) in enumerate(loc):
            for case in self.cases:
                space = neighbour_space(self.spec, case, claim, self.cases,
                                        excluded | self.compiled if claim.heldout else excluded,
                                        root=self.root, context=claim.heldout)
                label = f"{ci}:{claim_label(claim)}"
                job = _Job(ci, claim, declared, case, space, key=f"{case.name}|{label}|{space.digest}",
                           seed_value=_seed_for(self.seed, case.name, label),
                           n=self.max_examples or claim.sample or DEFAULT_SAMPLE)
                memo: MutableMapping[str, list[Draw]] = \
                    self.memo.draws if self.memo is not None else {}
                key = f"{job.key}|{job.n}|{job.seed_value}"
                if key not in memo:
                    memo[key] = sample(space, job.n, key=job.key, seed_value=job.seed_value)
                job.draws = list(memo[key])
                stored = replay(space, self.db, key=job.key, seed_value=job.seed_value)
                self.replayed += len(stored)
                job.draws += stored
                jobs.append(job)
            self.progress("sampling", n_done + 1, len(loc))
        self.timed("sampling_s", t0)
        return jobs

    def draw_variants(self) -> None:
        """Held-out variants of each edit's in-scope prompts (generality: the edit prompt
        and its declared paraphrases; reversal: the reverse question), drawn once."""
        t0 = time.perf_counter()
        gated = {c.metric for c, _ in self.claims if c.heldout}
        n = {m: max([c.sample or HELDOUT_SAMPLE for c, _ in self.claims
                     if c.metric == m and c.heldout] or [REPORT_SAMPLE])
             for m in ("generality", "reversal")}
        for case in self.cases:
            for family, checks in (("generality", (case.efficacy, *case.generality)),
                                   ("reversal", case.reversal)):
                if not self.report_heldout and family not in gated:
                    continue
                self.variants[(case.name, family)] = heldout_checks(
                    case.name, family, checks, n[family], seed=self.seed,
                    draw=self.heldout_draw, exclude=self.compiled | in_scope(self.cases),
                    store=self.memo.draws if self.memo is not None else None)
        self.timed("sampling_s", t0)

    def probe_items(self) -> list[Item]:
        items: list[Item] = []
        drawn = [c for v in self.variants.values() for _, c in v]
        for case in self.cases:
            for p in (case.efficacy, *case.generality, *case.portability, *case.reversal):
                items.append(Item(p.prompt, p.target))
                if p.old is not None:
                    items.append(Item(p.prompt, p.old))
            items += [Item(p) for p in case.preserve]
        for p in drawn:
            items.append(Item(p.prompt, p.target))
            if p.old is not None:
                items.append(Item(p.prompt, p.old))
        return items

    def items(self, jobs: list[_Job], plus: list[tuple[str, str]]) -> list[Item]:
        """Every item the batched scoring pass scores (the shrinker may ask for more)."""
        items = self.probe_items() + [Item(d.prompt) for j in jobs for d in j.draws]
        if jobs:
            items += [Item(q) for q in canaries.GENERAL_QUESTIONS]
        return items + [Item(p) for _, p in plus]

    # -------------------------------------------------------------- claims

    def shrink(self, job: _Job) -> Counterexample | None:
        """Minimal counterexample for a locality job with a violation (added to its draws)."""
        def fails(d: Draw) -> bool:
            return not metrics.agrees(*self.cache.get(Item(d.prompt)), job.claim.kl)

        if not any(fails(d) for d in job.draws):
            return None
        found = minimal_failure(job.space, fails, job.n, key=job.key, seed_value=job.seed_value,
                                database=self.db)
        if found is None:
            return None
        job.draws.append(found)
        return counterexample(found, self.cache, self.dec, job.claim.kl)

    def claim_results(self, jobs: list[_Job]) -> list[ClaimResult]:
        t0 = time.perf_counter()
        by_claim = {(j.index, j.case.name): j for j in jobs}
        out: list[ClaimResult] = []
        for ci, (claim, declared) in enumerate(self.claims):
            for case in self.cases:
                why = not_applicable(claim, case, self.spec.order, self.last_step)
                if why is not None:
                    out.append(ClaimResult(claim=claim_label(claim), metric=claim.metric,
                                           protocol=claim.protocol, threshold=claim.threshold,
                                           declared=declared, edit=case.name, status="n/a",
                                           note=why))
                elif claim.metric == "locality":
                    job = by_claim[(ci, case.name)]
                    found = self.shrink(job)
                    out.append(locality_claim(claim, declared, case, job.draws, self.cache,
                                              self.dec, found, compiled=self.compiled))
                else:
                    note = ("scored on the model after all edits of the sequence"
                            if claim.metric == "retention" else "")
                    out.append(probe_claim(claim, declared, case, self.cache, self.dec, note,
                                           compiled=self.compiled,
                                           variants=self.variants.get((case.name, claim.metric),
                                                                      ())))
        self.timed("claims_s", t0)
        return out


def _aggregate(run: _Run, results: list[ClaimResult], artifact: Artifact | None) -> Aggregate:
    means: dict[str, float | None] = {}
    for label in dict.fromkeys(r.claim for r in results):
        scores = [r.score for r in results if r.claim == label and r.score is not None]
        means[label] = round(sum(scores) / len(scores), 6) if scores else None
    split = {label: _split([r for r in results if r.claim == label and r.status != "n/a"])
             for label in dict.fromkeys(r.claim for r in results)}
    efficacy = [metrics.probe_value(*(s[1] for s in _new_old(run, c)), "prob") for c in run.cases]
    notes: list[str] = []
    agg: dict[str, float | None] = {}
    steps = step_scores(run.base, run.tok, run.cases, artifact, run.spec.order,
                        retention=any(c.metric == "retention" for c, _ in run.claims),
                        chat=run.chat)
    if run.spec.order == "batch":
        agg["scalability"] = round(metrics.scalability(efficacy), 6)
        if steps:
            single = [steps[c.name] for c in run.cases if c.name in steps]
            batch = [v for c, v in zip(run.cases, efficacy) if c.name in steps]
            rel = metrics.relative_scalability(batch, single)
            agg["relative_scalability"] = None if rel is None else round(rel, 6)
            notes.append(f"relative scalability over {len(single)} edit(s) that have a step "
                         "of their own (each applied alone vs. the whole batch)")
        else:
            notes.append("relative scalability needs single-edit steps in the artifact "
                         "(one batched step cannot be split into single edits)")
    else:
        earlier = [(c, v) for c, v in zip(run.cases, efficacy) if c.step_index < run.last_step]
        if earlier:
            agg["retention"] = round(metrics.retention([v for _, v in earlier]), 6)
            own = [steps[c.name] for c, _ in earlier if c.name in steps]
            if steps and len(own) == len(earlier):
                rel = metrics.relative_retention([v for _, v in earlier], own)
                agg["relative_retention"] = None if rel is None else round(rel, 6)
        notes.append("retention: earlier edits scored on the model after all edits (efficacy, "
                     "prob protocol); relative to each edit's score right after its own step")
    return Aggregate(means=means, split={k: v for k, v in split.items() if v is not None},
                     notes=tuple(notes), **agg)


def _split(rows: list[ClaimResult]) -> Split | None:
    """The declared / held-out means of one claim over its edits (None: not applicable)."""
    if not rows:
        return None

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 6) if values else None

    return Split(declared=mean([r.declared_score for r in rows if r.declared_score is not None]),
                 declared_n=sum(r.declared_n for r in rows),
                 heldout=mean([r.heldout_score for r in rows if r.heldout_score is not None]),
                 heldout_n=sum(r.heldout_n for r in rows))


def _new_old(run: _Run, case: Case) -> tuple:
    p = case.efficacy
    new = run.cache.get(Item(p.prompt, p.target))
    old = run.cache.get(Item(p.prompt, p.old)) if p.old is not None else (None, None)
    return new, old


def _capability(run: _Run) -> CapabilitySection:
    loc = [c for c, _ in run.claims if c.metric == "locality"]
    if not loc:
        return CapabilitySection(ran=False)
    t0 = time.perf_counter()
    if run.memo is not None and run.memo.base_ppl is not None:
        ppl = (run.memo.base_ppl, perplexity([run.edited], run.tok, canaries.CORPUS_SLICE)[0])
    else:
        ppl = perplexity([run.base, run.edited], run.tok, canaries.CORPUS_SLICE)
        if run.memo is not None:
            run.memo.base_ppl = ppl[0]
    section = capability((ppl[0], ppl[1]), PPL_TOLERANCE, general_questions(run.cases),
                         max(c.threshold for c in loc), run.cache, run.dec)
    run.progress("canaries", 1, 1)
    run.timed("canaries_s", t0)
    return section


def _greedy_key(prompts: list[str], n: int, run: _Run) -> str:
    """Greedy text depends on the whole left-padded batch, so the key is all of it."""
    frame = None if run.chat is None else [run.chat.head, run.chat.tail]
    return sha256_text(canonical_json({"prompts": prompts, "n": n, "chat": frame}))


def _greedy(run: _Run, prompts: list[str], n: int) -> list[tuple[str, ...]]:
    """Greedy continuations on (base, edited); the base's from the memo when it has them."""
    key = _greedy_key(prompts, n, run)
    known = run.memo.base_greedy.get(key) if run.memo is not None else None
    if known is not None and len(known) == len(prompts):
        edited = greedy_continuations([run.edited], run.tok, prompts, max_new_tokens=n,
                                      chat=run.chat)
        return [(b, *e) for b, e in zip(known, edited)]
    both = greedy_continuations([run.base, run.edited], run.tok, prompts, max_new_tokens=n,
                                chat=run.chat)
    if run.memo is not None:
        run.memo.base_greedy[key] = tuple(g[0] for g in both)
    return both


def general_questions(cases: tuple[Case, ...]) -> tuple[str, ...]:
    """The general-question canaries that no edit declares in scope: a spec that moves
    the capital of Japan is meant to change what "The capital of Japan is" answers."""
    scope = in_scope(cases)
    return tuple(q for q in canaries.GENERAL_QUESTIONS if q not in scope)


def _failures(results: list[ClaimResult], audit: AuditSection, cap: CapabilitySection) -> list[str]:
    failed = [f"{r.claim} on edit {r.edit!r} ({r.score:.3f} < {r.threshold:g})"
              for r in results if r.status == "fail" and r.score is not None]
    if not audit.ok:
        failed.append(f"audit: {audit.summary}")
    if not cap.ok:
        failed.append(f"capability: perplexity ratio {cap.ppl_ratio} (max {1 + (cap.ppl_tolerance or 0):g}), "
                      f"general questions kept {cap.questions_survived} (min {cap.questions_threshold})")
    return failed


def verify(spec: Spec, plan: Plan | None, base_model: Any, edited_model: Any, tok: Any, *,
           seed: int | None = None, max_examples: int | None = None,
           db_dir: str | Path | None = None, progress: Progress | None = None,
           artifact: Artifact | None = None, root: str | Path | None = None,
           memo: VerifyMemo | None = None, heldout_draw: str = "verify",
           report_heldout: bool = True) -> Report:
    """Check every claim of ``spec`` on ``edited_model`` against ``base_model``.

    Args:
        spec: the spec (``spec.source`` locates ``subjects from`` files).
        plan: the compiled plan (None: prompts rendered from the spec).
        base_model, edited_model: the models before and after the edit (not modified).
        tok: their tokenizer.
        seed: seed of the property-based samples (default: the spec's seed).
        max_examples: hypothesis examples per locality property (overrides ``sample``).
        db_dir: hypothesis example database folder (None: no database).
        progress: ``progress(stage, done, total)``.
        artifact: the artifact; enables the weight-diff audit, retention and
            relative scalability.
        root: the folder ``subjects from`` files must lie under (default: the
            spec's repository, see :mod:`kmec.grammar.files`).
        memo: shared with earlier verifications against the same base, spec and seed
            (:class:`VerifyMemo`): the base side is not recomputed.
        heldout_draw: ``verify``, or ``compile`` for compile's repair loop: the held-out
            variants are drawn with another seed there (:mod:`kmec.verify.variants`).
        report_heldout: draw and score held-out variants for every generality and reversal
            claim (False: only for ``heldout`` claims, which they decide; compile's loop,
            which needs the verdicts, not the report).

    Returns:
        The :class:`Report`; ``report.exit_code`` is 0 when every claim holds, else 1.

    Raises:
        VerifyError: nothing to verify, or inputs that do not fit together.
        ModelError: the spec says ``chat on`` and the tokenizer has no chat template.
    """
    t_start = time.perf_counter()
    db = DirectoryBasedExampleDatabase(str(db_dir)) if db_dir is not None else None
    run = _Run(spec, plan, base_model, edited_model, tok, spec.seed if seed is None else seed,
               max_examples, db, progress, root, memo, heldout_draw, report_heldout)
    jobs = run.locality_jobs()
    run.draw_variants()
    t0 = time.perf_counter()
    plus = plus_items(spec, run.cases, root=root)
    run.cache.prefetch(run.items(jobs, plus), progress=run.progress)
    run.timed("scoring_s", t0)
    results = run.claim_results(jobs)
    cap = _capability(run)
    t0 = time.perf_counter()
    longest = max(len(run.cache.get(Item(c.efficacy.prompt, c.efficacy.target))[0].target_ids)
                  for c in run.cases)
    greedy = _greedy(run, [c.efficacy.prompt for c in run.cases], min(GREEDY_TOKENS, longest + 3))
    run.timed("greedy_s", t0)
    rows = tuple(edit_row(c, run.cache, run.dec, g, results) for c, g in zip(run.cases, greedy))
    t0 = time.perf_counter()
    agg = _aggregate(run, results, artifact)
    audit = audit_section(base_model, edited_model, artifact)
    run.timed("audit_and_steps_s", t0)
    failed = _failures(results, audit, cap)
    checks = sum(r.status != "n/a" for r in results) + audit.ran + cap.ran
    summary = (f"all {checks} checks hold" if not failed else
               f"{len(failed)} of {checks} checks failed: " + "; ".join(failed))
    notes = _notes(run, results)
    run.timing.update(total_s=round(time.perf_counter() - t_start, 3),
                      items_scored=run.cache.items_scored, cache_lookups=run.cache.lookups,
                      replayed_examples=run.replayed)
    return Report(
        kmec_version=__version__, ok=not failed, exit_code=1 if failed else 0, summary=summary,
        failed=tuple(failed), model=plan.model if plan else (spec.model or ""),
        base_fingerprint=(plan.model_fingerprint if plan else
                          artifact.manifest.base_fingerprint if artifact else ""),
        spec_hash=spec_hash(spec), plan_hash=plan.sha256 if plan else None,
        artifact=_artifact_info(artifact), order=spec.order, seed=run.seed,
        spec=spec.model_dump(mode="json"), spec_path=spec.source, spec_source=_source_text(spec),
        plan=plan.model_dump(mode="json") if plan else None, claims=tuple(results),
        edits=rows, aggregate=agg, audit=audit, capability=cap,
        plus=plus_rows(plus, run.cache, run.dec), notes=notes, timing=dict(run.timing))


def prime_base(spec: Spec, plan: Plan | None, base_model: Any, tok: Any, memo: VerifyMemo, *,
               seed: int | None = None, root: str | Path | None = None,
               progress: Progress | None = None) -> int:
    """Score on the base model alone what :func:`verify` (default draws) will score and
    ``memo`` lacks, into ``memo``: compile, after its last attempt, prepares the base side
    of ``kmec verify``'s held-out variants, which its own scoring draws differently. No
    edited model is involved, so nothing here can shape an edit. Returns how many items
    were scored."""
    run = _Run(spec, plan, base_model, None, tok, spec.seed if seed is None else seed, None,
               None, progress, root, memo)
    jobs = run.locality_jobs()
    run.draw_variants()
    missing = [it for it in dict.fromkeys(run.items(jobs, plus_items(spec, run.cases, root=root)))
               if it not in memo.base.scores]
    memo.base.fill(base_model, tok, missing, chat=run.chat, progress=run.progress)
    return len(missing)


SOURCE_LIMIT = 256_000  # characters of the .kmec file a report embeds (specs are far smaller)


def _source_text(spec: Spec) -> str | None:
    """The text of the file ``spec`` was parsed from, for the report to show (None: a spec
    built in Python, or a file that is gone, unreadable, not text or too large)."""
    if not spec.source:
        return None
    try:
        text = Path(spec.source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if len(text) <= SOURCE_LIMIT else None


def _artifact_info(artifact: Artifact | None) -> dict[str, Any]:
    if artifact is None:
        return {}
    m = artifact.manifest
    return {"base_model": m.base_model, "plan_hash": m.plan_hash, "params": list(m.params),
            "payloads": {p.id: {"kind": p.kind, "step": p.step, "param": p.param, "site": p.site,
                                "rank": p.rank, "sha256": dict(sorted(p.tensors.items()))}
                         for p in m.payloads}}


def _notes(run: _Run, results: list[ClaimResult]) -> tuple[str, ...]:
    notes = []
    if not run.spec.claims:
        notes.append("the spec declares no claims; checked the defaults: efficacy >= 1 and "
                      "locality >= 0.9 on 20 sampled prompts")
    if any(r.metric == "retention" and r.status != "n/a" for r in results):
        notes.append("retention scores are measured after all edits of the sequence were applied")
    vacuous = {r.claim for r in results} - {r.claim for r in results if r.status != "n/a"}
    for label in sorted(vacuous):
        notes.append(f"claim {label} applies to no edit of this spec")
    return tuple(notes)

