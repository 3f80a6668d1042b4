"""Held-out variants: in-scope prompts the compiler was never shown, drawn by hypothesis.

Contents:
    FRAMINGS          lead-ins that leave the question of a prompt unchanged
    HELDOUT_SAMPLE    variants per edit and family when a `heldout` claim decides on them
    REPORT_SAMPLE     variants per edit and family when they are only reported
    variants()        the strategy of held-out variants of some in-scope prompts
    heldout_checks()  draw the variants of an edit's prompts as checks

A score on a prompt the spec declares shows that the contract holds: the
compiler may have put that very prompt into the edit's objective. Whether the
edit *generalises* is measured on prompts it never saw. Each variant keeps the
prompt's question and puts something the compiler does not use in front of it:

* ``context``: the first k words of a sentence of the verifier's text slice
  (:mod:`kmec.verify.canaries`), then the prompt. The compiler's context
  prefixes are sampled from the model itself; this text is never given to it.
* ``framing``: a short lead-in from :data:`FRAMINGS` ("Fact: The capital of
  France is").

A draw is (prompt, framing) or (prompt, sentence, k), so a failure shrinks to
the first prompt, the first framing and the shortest context. Variants that
happen to equal a compiled prompt are filtered out. Draws are seeded from the
spec's seed, the edit and the family, and the seed differs between compile's
repair loop (``draw="compile"``) and ``kmec verify`` (``draw="verify"``): a
held-out claim compile repairs towards is then checked on other variants than
those it was selected on.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

from hypothesis import strategies as st

from kmec.hashing import canonical_json, sha256_text
from kmec.verify import canaries
from kmec.verify.claims import Check
from kmec.verify.strategies import Draw, context_prefix, draw_from, in_context

FRAMINGS: tuple[str, ...] = (
    "Fact: ",
    "Quick quiz. ",
    "Note: ",
    "Here is a short statement. ",
    "Answer from memory. ",
    "As written in a reference book: ",
)
HELDOUT_SAMPLE = 8  # per edit and family (generality, reversal) unless the claim says `sample N`
REPORT_SAMPLE = 4  # reported beside a declared claim only: a cheaper estimate (verify time)


def variants(prompts: Sequence[str], *, exclude: frozenset[str] = frozenset(),
             sentences: tuple[str, ...] | None = None) -> st.SearchStrategy[Draw]:
    """Held-out variants of ``prompts`` (context-prefixed or framed), minus ``exclude``."""
    sentences = canaries.sentences() if sentences is None else sentences
    base = st.sampled_from(tuple(prompts))
    framed = st.builds(lambda p, f: Draw("framing", f + p), base, st.sampled_from(FRAMINGS))
    prefixed = st.builds(lambda p, pre: Draw("context", in_context(pre, p)), base,
                         context_prefix(sentences))
    return st.one_of(framed, prefixed).filter(lambda d: d.prompt not in exclude)


def heldout_checks(name: str, family: str, checks: Sequence[Check], n: int, *, seed: int,
                   draw: str, exclude: frozenset[str],
                   store: MutableMapping[str, list[Draw]] | None = None,
                   ) -> tuple[tuple[str, Check], ...]:
    """``n`` held-out variants of ``checks`` (same targets), as ``(source, check)``.

    Args:
        name: the edit (part of the seed and the key).
        family: ``generality`` or ``reversal``.
        checks: the in-scope checks whose prompts are varied.
        n: how many draws (repeats are dropped, so up to ``n``).
        seed: the verification seed.
        draw: ``verify`` or ``compile`` (other variants for compile's repair loop).
        exclude: prompts the compiler was shown.
        store: drawn prompts kept by a key of everything the draw depends on
            (:class:`kmec.verify.drawstore.DrawStore`); None: drawn every time.
    """
    if not checks or n <= 0:
        return ()
    by_prompt = {c.prompt: c for c in checks}
    key = f"heldout|{draw}|{family}|{name}"
    seed_value = int(sha256_text(f"{seed}|{key}")[:16], 16)
    out: dict[str, tuple[str, Check]] = {}
    memo_key = "|".join((key, str(n), str(seed_value), sha256_text(canonical_json(
        {"prompts": list(by_prompt), "exclude": sorted(exclude)}))))
    drawn = store.get(memo_key) if store is not None else None
    if drawn is None:
        drawn = draw_from(variants(tuple(by_prompt), exclude=exclude), n, key=key,
                          seed_value=seed_value)
        if store is not None:
            store[memo_key] = drawn
    for d in drawn:
        base = by_prompt[max((p for p in by_prompt if d.prompt.endswith(p)), key=len)]
        out.setdefault(d.prompt, (d.source, base.model_copy(update={"prompt": d.prompt})))
    return tuple(out.values())
