"""A realistic batch report built by hand: a dozen edits whose neighbourhoods overlap.

Shaped like the README demo's report (12 capital edits, efficacy and generality with
an old target, a locality claim with a KL budget over drawn neighbours that repeat
across edits), small enough to render in milliseconds. What it holds on purpose:

- ``GREECE`` is over the KL budget on three edits and ``SKY`` changes top-1 on two:
  the same failing prompts across a batch, which the report must show once each;
- ``france`` fails efficacy (P(new) below P(old)); ``italy`` fails generality[token];
- both failing prompts are also the minimal counterexamples of those edits;
- the spec source holds markup that must be escaped.
"""

from __future__ import annotations

import random

from kmec.verify.report import (
    Aggregate,
    AuditSection,
    CapabilitySection,
    ClaimResult,
    Counterexample,
    EditRow,
    ProbeResult,
    Report,
    Side,
    Split,
    TopToken,
)

COUNTRIES = ("France", "Germany", "Italy", "Spain", "Japan", "Canada", "Australia", "Brazil",
             "Turkey", "India", "Egypt", "Russia")
GREECE = "The capital of Greece is"
SKY = "The color of the sky on a clear day is"
OVER_BUDGET = ("germany", "spain", "japan")  # GREECE over the budget on these
TOP1_CHANGED = ("canada", "brazil")  # SKY changes top-1 on these
BUDGET = 0.1
SOURCE = """# kmec compile specs/batch.kmec
model smollm2-135m
relation capital "The capital of {{ subject }} is"
# a comment with markup: <script>alert(1)</script> & </pre>
edit france { subject "France" relation capital "Paris" -> "Lyon" }
claim locality >= 0.9 sample 20 kl 0.1
"""


def _side(p_new: float | None = None, p_old: float | None = None, top: str = " Paris",
          kl: float | None = None) -> Side:
    return Side(p_target=p_new, p_old=p_old, top=(TopToken(token=top, prob=0.4),), kl=kl)


def _locality(edit: str, rng: random.Random) -> ClaimResult:
    pool = [f"The capital of {c} is" for c in ("Chile", "Peru", "Kenya", "Norway", "Poland",
                                                "Cuba", "Iran", "Nepal", "Oman", "Laos")]
    pool += [f"The currency of {c} is the" for c in COUNTRIES]
    prompts = [GREECE, SKY] + rng.sample(pool, 20)
    probes = []
    for prompt in prompts:
        kl = round(10 ** rng.uniform(-5, -1.5), 6)
        before = after = " the"
        if prompt == GREECE and edit in OVER_BUDGET:
            kl = 0.34
        if prompt == SKY and edit in TOP1_CHANGED:
            after = " blue"
        ok = before == after and kl <= BUDGET
        probes.append(ProbeResult(kind="neighbour", prompt=prompt, value=float(ok), ok=ok,
                                  base=_side(top=before), edited=_side(top=after, kl=kl)))
    bad = [p for p in probes if not p.ok]
    score = 1 - len(bad) / len(probes)
    cx = None
    if bad:
        p = bad[0]
        why = (f"top-1 changed from {p.base.top[0].token!r} to {p.edited.top[0].token!r}"
               if p.prompt == SKY else f"KL {p.edited.kl:.4g} nats exceeds the budget 0.1")
        cx = Counterexample(prompt=p.prompt, source="neighbour", base_top=p.base.top[0],
                            edited_top=p.edited.top[0], kl=p.edited.kl or 0.0, why=why)
    # threshold 0.96: one disagreeing prompt in 22 fails the claim
    return ClaimResult(claim="locality[kl<=0.1]", metric="locality", protocol="top1+kl",
                       threshold=0.96, declared=True, edit=edit, status="pass" if not bad
                       else "fail", score=round(score, 6), n=len(probes), kl_budget=BUDGET,
                       probes=tuple(probes), counterexample=cx, declared_score=1.0,
                       declared_n=2, heldout_score=round(score, 6), heldout_n=20)


def _efficacy(edit: str, prompt: str, new: str, old: str, p_new: float, p_old: float
              ) -> ClaimResult:
    ok = p_new > p_old
    probe = ProbeResult(kind="efficacy", prompt=prompt, target=new, old=old, value=float(ok),
                        ok=ok, base=_side(0.01, 0.7), edited=_side(p_new, p_old, kl=0.5))
    return ClaimResult(claim="efficacy", metric="efficacy", protocol="prob", threshold=1.0,
                       declared=True, edit=edit, status="pass" if ok else "fail",
                       score=float(ok), n=1, probes=(probe,), declared_score=float(ok),
                       declared_n=1)


def _generality(edit: str, new: str, accuracy: float) -> ClaimResult:
    probes = tuple(ProbeResult(kind="generality", prompt=f"{edit.title()}'s capital city is{k}",
                               target=new, value=acc, ok=acc >= 0.5,
                               base=_side(0.01), edited=_side(0.3, kl=0.2), heldout=k == " -")
                   for k, acc in (("", accuracy), (" -", accuracy)))
    ok = accuracy >= 0.5
    return ClaimResult(claim="generality[token]", metric="generality", protocol="token",
                       threshold=0.5, declared=True, edit=edit, status="pass" if ok else "fail",
                       score=accuracy, n=2, probes=probes, declared_score=accuracy,
                       declared_n=1, heldout_score=accuracy, heldout_n=1)


def batch_report(*, source: str | None = SOURCE) -> Report:
    """The twelve-edit report described in the module docstring (seeded, deterministic)."""
    rng = random.Random(7)
    claims, rows = [], []
    for i, country in enumerate(COUNTRIES):
        edit = country.lower()
        prompt, new, old = f"The capital of {country} is", f" City{i}", f" Old{i}"
        p_new, p_old = (0.12, 0.31) if edit == "france" else (0.4 + 0.04 * i, 0.05)
        claims += [_efficacy(edit, prompt, new, old, p_new, p_old),
                   _generality(edit, new, 0.25 if edit == "italy" else 1.0),
                   _locality(edit, rng)]
        rows.append(EditRow(name=edit, step="s01-memit", prompt=prompt, target_new=new,
                            target_old=old, base=_side(0.002 + 0.001 * i, 0.6),
                            edited=_side(p_new, p_old, top=new, kl=0.5), base_greedy=old,
                            edited_greedy=new, starts_with_new=edit != "france",
                            metrics={"efficacy": float(p_new > p_old)}))
    labels = ("efficacy", "generality[token]", "locality[kl<=0.1]")
    means = {lab: round(sum(c.score or 0 for c in claims if c.claim == lab) / 12, 6)
             for lab in labels}
    split = {"efficacy": Split(declared=means["efficacy"], declared_n=12),
             "generality[token]": Split(declared=0.94, declared_n=12, heldout=0.94, heldout_n=12),
             "locality[kl<=0.1]": Split(declared=1.0, declared_n=24, heldout=0.98,
                                        heldout_n=240)}
    failed = tuple(f"{c.claim} on edit {c.edit!r} ({c.score:.3f} < {c.threshold:g})"
                   for c in claims if c.status == "fail")
    return Report(
        kmec_version="0.1.0", ok=False, exit_code=1, summary=f"{len(failed)} checks failed",
        failed=failed, model="smollm2-135m", base_fingerprint="ab" * 32, spec_hash="cd" * 32,
        plan_hash="ef" * 32, order="batch", seed=0,
        spec={"model": "smollm2-135m", "edits": [{"name": c.lower()} for c in COUNTRIES]},
        spec_path="specs/batch.kmec" if source is not None else None, spec_source=source,
        plan=None, claims=tuple(claims), edits=tuple(rows),
        aggregate=Aggregate(means=means, split=split),
        audit=AuditSection(ran=True, ok=True, summary="audit passed"),
        capability=CapabilitySection(ran=False))
