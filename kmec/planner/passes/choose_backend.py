"""Pass ``choose_backend``: pick one editing method for the whole spec, and say why.

Policy, first match wins (each branch writes its reason into the plan):

1. ``method X`` in the spec -> X: the user's choice wins, or is refused with a
   PlanError when X cannot satisfy the spec.
2. ``weights frozen`` -> ``memory``: only an external memory edits behaviour
   without changing weights.
3. ``order sequence`` -> ``alphaedit``: sequential edits, each projected onto
   the null space of the knowledge to preserve.
4. a trained MEND editor for this model (``editors=``) and a single edit ->
   ``mend``. Batches skip it: MEND sums per-edit updates that interfere as
   they add up, where MEMIT solves for all edits jointly.
5. a free-form edit without a subject, or *generality first* (``claim
   generality >= GENERALITY_FIRST`` with no locality claim and no ``preserve``
   prompts) -> ``ft``: nothing to key a locate-then-edit method on, or
   paraphrases matter more than locality.
6. at least ``BATCH_THRESHOLD`` edits (or one edit with a layer range) ->
   ``memit``: one joint least-squares solve.
7. otherwise, a single edit -> ``rome``.

Refusals for an explicit method, read from its record
(:class:`~kmec.planner.backend_info.BackendInfo`): a method that changes
weights with ``weights frozen`` (``memory`` and ``retrieval`` change none); a
one-layer method (``rome``, ``memory``) with more than one layer. An explicit
locate-then-edit method (``keyed``) with a free-form edit that names no
subject is *allowed*: the request's ``subject`` is None and,
per the EditRequest contract, the backend keys the edit on the prompt's last
token (the reason says that paraphrases then generalise less, since their last
token differs).
"""

from __future__ import annotations

from kmec.errors import PlanError
from kmec.models.facts import ModelFacts
from kmec.planner.draft import Draft
from kmec.planner.model import Reason
from kmec.spec import Spec

# Two or more edits in one batch go to MEMIT. ROME edits one fact per call, so
# n edits would be n sequential rank-one updates, each computed on a model the
# previous ones already changed (their keys drift); MEMIT solves for all n at
# once against the same key statistics, and its paper shows it matching ROME at
# small n and far outscaling it at large n (Meng et al. 2023, Fig. 5).
BATCH_THRESHOLD = 2

# "Generality first": a generality claim at least this strict, with nothing
# asking for locality. Locate-then-edit methods generalise through the subject
# key only (~0.6 paraphrase accuracy for ROME on this machine, see DESIGN.md);
# fine-tuning on the paraphrases reaches it directly at some cost in locality.
GENERALITY_FIRST = 0.9



def has_editor(draft: Draft, facts: ModelFacts) -> bool:
    """Whether ``draft.editors`` names this model (by fingerprint or by name)."""
    keys = {facts.fingerprint, facts.name} - {""}
    return bool(keys & draft.editors)


def _generality_first(spec: Spec) -> float | None:
    """The strict generality threshold when generality is all that is claimed, else None."""
    gen = [c.threshold for c in spec.claims if c.metric == "generality"]
    if not gen or max(gen) < GENERALITY_FIRST:
        return None
    if any(c.metric == "locality" for c in spec.claims) or any(e.preserve for e in spec.edits):
        return None
    return max(gen)


def _explicit(draft: Draft, facts: ModelFacts, method: str) -> tuple[Reason, ...]:
    hint, info = draft.spec.method, draft.info(method)
    if hint.frozen and info.changes != "memory":
        raise PlanError(
            f"`method {method}` changes weights, but the spec says `weights frozen`",
            hint="use `method memory` or `method retrieval` (external memories), or drop "
            "`weights frozen`")
    if info.layers == "one" and hint.layers is not None and len(hint.layers) > 1:
        raise PlanError(
            f"`method {method}` edits a single layer, but the spec gives {len(hint.layers)} layers",
            hint="give one layer, or use `method memit` to spread edits over a range")
    reasons = [Reason(choice=f"backend {method}",
                      because=f"the spec says `method {method}`; an explicit method always "
                      "overrides the planner's policy")]
    unkeyed = [e.source for e in draft.edits if not e.keyed]
    if info.keyed and unkeyed:
        reasons.append(Reason(
            choice="key on the last prompt token",
            because=f"free-form edit(s) {', '.join(unkeyed)} name no subject, so {method} keys "
            "them on the prompt's last token; paraphrases end in other tokens and generalise "
            "less (add `subject \"...\"` to key on a span)"))
    if info.needs_editor and not has_editor(draft, facts):
        reasons.append(Reason(
            choice=f"train a {method} editor",
            because=f"no trained MEND editor is registered for {facts.name}; compiling needs "
            f"one: train it first with `kmec train-editor --model {facts.name} --data FILE` "
            "(zsRE or CounterFact records; stored by model fingerprint)"))
    return tuple(reasons)


def _auto(draft: Draft, facts: ModelFacts) -> tuple[str, str]:
    spec, n = draft.spec, len(draft.edits)
    if spec.method.frozen:
        if spec.method.layers is not None and len(spec.method.layers) > 1:
            raise PlanError("`weights frozen` needs an external memory at one layer, "
                            f"but the spec gives {len(spec.method.layers)} layers",
                            hint="give one layer for the memory, or leave `layers` out")
        return "memory", ("the spec says `weights frozen`: only an external memory "
                          "(GRACE-style codebook / retrieval) changes behaviour without "
                          "changing a single weight")
    if spec.order == "sequence":
        return "alphaedit", ("the spec says `order sequence`: AlphaEdit applies edits one at a "
                             "time, projecting each update onto the null space of the keys "
                             "that earlier edits and preserved knowledge use, so later edits "
                             "do not undo earlier ones")
    if has_editor(draft, facts) and n < BATCH_THRESHOLD:
        return "mend", (f"a single edit and a trained MEND editor exists for {facts.name}: it "
                        "turns the edit's gradient into a weight update in one "
                        "forward/backward pass")
    unkeyed = [e.source for e in draft.edits if not e.keyed]
    if unkeyed:
        return "ft", (f"free-form edit(s) {', '.join(unkeyed)} name no subject for a "
                      "locate-then-edit method to key on; norm/KL-constrained fine-tuning "
                      "trains on the prompt and its scope directly")
    gen = _generality_first(spec)
    if gen is not None:
        return "ft", (f"generality first: the spec claims generality >= {gen:g} and declares "
                      f"no locality claim or preserve prompts; constrained fine-tuning trains on "
                      f"the paraphrases themselves (locate-then-edit methods reach ~0.6)")
    if n >= BATCH_THRESHOLD:
        return "memit", (f"{n} edits in one batch (>= {BATCH_THRESHOLD}): MEMIT inserts them "
                         "with one joint least-squares solve; ROME would need "
                         f"{n} sequential rank-one edits whose keys drift as each one lands")
    if spec.method.layers is not None and len(spec.method.layers) > 1:
        return "memit", (f"one edit but {len(spec.method.layers)} layers given: ROME edits a "
                         "single layer, so MEMIT spreads the edit over the given range")
    return "rome", ("a single edit: ROME's rank-one update of one mid-early MLP is the "
                    "cheapest precise edit (one solve, no batch interaction)")


def choose_backend(draft: Draft, facts: ModelFacts) -> Draft:
    """Choose the method for all of the spec's edits (see the module's policy table).

    Raises:
        PlanError: an explicit method that cannot satisfy the spec, or a chosen
            backend missing from the registry.

    >>> from kmec.planner.draft import example_backends, example_facts, example_spec
    >>> from kmec.planner.passes.resolve import resolve
    >>> d = resolve(Draft(spec=example_spec(), backends=example_backends()), example_facts())
    >>> d = choose_backend(d, example_facts())
    >>> d.backend, d.backend_reasons[0].because[:48]
    ('ft', 'free-form edit(s) messi name no subject for a lo')
    """
    if not draft.edits:
        return draft.note("no steps", "the spec declares no edits, so there is nothing to do")
    method = draft.spec.method.method
    if method != "auto":
        reasons = _explicit(draft, facts, method)
        name = method
    else:
        name, because = _auto(draft, facts)
        draft.info(name)  # the policy's choice must be registered
        reasons = (Reason(choice=f"backend {name}", because=because),)
    draft = draft.update(backend=name, backend_reasons=reasons)
    return draft.note(reasons[0].choice, reasons[0].because)
