"""Pass ``estimate_cost``: rough seconds and peak memory of each step, from sizes alone.

The units are :mod:`kmec.planner.costs` (one token through the whole model
is a *token-forward*, about ``2 · n_params`` FLOPs on a calibrated CPU). Per
step:

* statistics, on first use only: ``tokens`` forwards through the layers up
  to the deepest requested one (the pass stops there), plus what the backend
  derives from them once (its record's ``stats_cost``: AlphaEdit's
  eigendecomposition);
* the step's own work: its backend's cost model (the ``cost`` of its
  :class:`~kmec.planner.backend_info.BackendInfo`, written next to the backend:
  value optimisation and solves for ROME/MEMIT/AlphaEdit, training steps for
  fine-tuning and the codebook, the encoder pass for retrieval, editing and,
  when none is registered, editor training for MEND).

Peak memory is the weights plus what the step holds at once: activations kept
for backward (``tokens × layers × (4·d_model + 2·d_mlp)`` floats), ``C`` per
layer, optimiser state for fine-tuned matrices; the statistics pass is
forward-only, so it holds one block's activations for one batch plus its
accumulators. These are rough planning estimates, not promises.
"""

from __future__ import annotations

from kmec.models.facts import ModelFacts
from kmec.planner import costs
from kmec.planner.backend_info import Work
from kmec.planner.draft import Draft
from kmec.planner.model import Cost, Reason, StatsRequest, Step
from kmec.planner.passes.choose_backend import has_editor

STATS_BATCH = 16  # sequences per forward in the statistics pass


def _work(draft: Draft, step: Step, facts: ModelFacts, setup: bool) -> Work:
    """The step's own work, from its backend's cost model (statistics excluded)."""
    info = draft.info(step.backend)
    if info.cost is None:
        return Work(0.0, 0.0, ("no cost model for this backend",))
    return info.cost(step, facts, setup)


def statistics_seconds(request: StatsRequest, facts: ModelFacts, *,
                       layers: tuple[int, ...] | None = None) -> float:
    """Seconds of the statistics pass over ``layers`` (default: every requested layer).

    The pass stops after the deepest layer it computes, so a pass for the layers a
    cache lacks costs what a pass up to the deepest of them costs.

    >>> from kmec.planner.draft import example_facts
    >>> from kmec.planner.model import StatsRequest
    >>> r = StatsRequest(layers=(4, 5, 6), tokens=100_000, max_len=256)
    >>> statistics_seconds(r, example_facts()) > statistics_seconds(r, example_facts(), layers=(4,))
    True
    >>> statistics_seconds(r, example_facts(), layers=())
    0.0
    """
    layers = request.layers if layers is None else layers
    if not layers:
        return 0.0
    return costs.seconds(request.tokens, costs.params_through(facts, max(layers)))


def _stats(draft: Draft, request: StatsRequest, step: Step,
           facts: ModelFacts) -> tuple[float, float]:
    secs = statistics_seconds(request, facts)
    info = draft.info(step.backend)
    if info.stats_cost is not None:  # what the backend derives from them once (AlphaEdit)
        secs += info.stats_cost(request, facts)
    mb = len(request.layers) * facts.d_mlp**2 * costs.BYTES.get(request.dtype, 4) / costs.MB
    # forward only: one block's activations for one batch are alive at a time
    batch = (STATS_BATCH * request.max_len * (4 * facts.d_model + 2 * facts.d_mlp) * 4
             / costs.MB)
    return secs, mb + batch


def estimate_cost(draft: Draft, facts: ModelFacts) -> Draft:
    """Set ``cost`` on every step (statistics are charged to the first step that needs them).

    >>> from kmec.planner.draft import example_facts, example_spec
    >>> from kmec.planner.passes.group_edits import group_edits
    >>> from kmec.planner.passes.resolve import resolve
    >>> from kmec.planner.backend_info import BackendInfo, Work
    >>> class Toy:
    ...     info = BackendInfo(name="toy", changes="memory", layers="one", layer_role="rome",
    ...                        cost=lambda step, facts, setup: Work(3.0, 10.0, ("toy",)))
    >>> d = resolve(Draft(spec=example_spec(), backends={"toy": Toy()}), example_facts())
    >>> d = d.update(backend="toy")
    >>> d = estimate_cost(group_edits(d, example_facts()), example_facts())
    >>> d.steps[0].cost.seconds, d.steps[0].cost.peak_mb > 500
    (3.0, True)
    """
    weights_mb = costs.model_params(facts) * costs.BYTES.get(facts.dtype, 4) / costs.MB
    seen: set[StatsRequest] = set()
    editor_ready = has_editor(draft, facts)
    for i, step in enumerate(draft.steps):
        needs_editor = draft.info(step.backend).needs_editor
        work = _work(draft, step, facts, setup=needs_editor and not editor_ready)
        secs, extra, parts = work.seconds, work.extra_mb, list(work.parts)
        editor_ready = editor_ready or needs_editor
        req = step.needs_stats
        if req is not None and req not in seen:
            seen.add(req)
            s_secs, s_mb = _stats(draft, req, step, facts)
            secs += s_secs
            extra = max(extra, s_mb)
            parts.insert(0, f"statistics {s_secs:.0f} s (first use)")
        cost = Cost(seconds=round(secs, 1), peak_mb=round(weights_mb + extra, 1))
        because = (f"rough CPU estimate: {'; '.join(parts)}; peak = weights "
                   f"{weights_mb:.0f} MB + {extra:.0f} MB working memory")
        reason = Reason(choice=f"~{cost.seconds:g} s, ~{cost.peak_mb:g} MB", because=because)
        draft = draft.replace_step(i, step.model_copy(
            update={"cost": cost, "reasons": (*step.reasons, reason)}))
    return draft
