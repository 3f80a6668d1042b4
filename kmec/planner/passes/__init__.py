"""The planner's passes, one per file, each a pure ``(draft, facts) -> draft``.

Contents (in the order :data:`PASSES` runs them):
    resolve          render edits into requests (templates, scope, subject)
    choose_backend   one method for the spec, by policy or by the spec's ``method``
    share_scope      sibling edits' scope wordings in each edit's objective (keyed methods)
    pair_reversals   add the inverse edit for ``expect reversal``
    group_edits      split edits into steps with stable ids
    choose_layers    layers per step (spec, else the per-architecture table)
    choose_params    backend defaults merged with the spec's overrides
    declare_locality the prompts each step must leave alone (preserve, declared neighbours)
    require_stats    second-moment statistics for ROME/MEMIT/AlphaEdit steps
    estimate_cost    rough seconds and peak memory per step
"""

from __future__ import annotations

from kmec.planner.passes.choose_backend import choose_backend
from kmec.planner.passes.choose_layers import choose_layers
from kmec.planner.passes.choose_params import choose_params
from kmec.planner.passes.declare_locality import declare_locality
from kmec.planner.passes.estimate_cost import estimate_cost
from kmec.planner.passes.group_edits import group_edits
from kmec.planner.passes.pair_reversals import pair_reversals
from kmec.planner.passes.require_stats import require_stats
from kmec.planner.passes.resolve import resolve
from kmec.planner.passes.share_scope import share_scope

__all__ = [
    "choose_backend", "choose_layers", "choose_params", "declare_locality", "estimate_cost",
    "group_edits",
    "pair_reversals", "require_stats", "resolve", "share_scope",
]
