"""Shared: write target residuals over a range of MLP layers (MEMIT, AlphaEdit).

Contents:
    Solve              ``(layer, keys, residuals) -> (u, v)`` for one layer
    spread_over_layers()  the layer-by-layer loop both backends share

Each edit i has a target hidden state zᵢ at the top layer. Layer by layer,
with the earlier layers' updates in place (added temporarily and restored
exactly; the blocks below the first layer run once, see
:class:`~kmec.backends.keys.Below`), the remaining residual
rᵢ = (zᵢ − hᵢ(current)) / (layers left) is handed to the backend's ``solve``;
the factors are bounded by ``max_delta`` (‖ΔW‖_F ≤ max_delta · ‖W‖_F) and
returned as ``LowRank`` payloads (MEMIT, Meng et al. 2023, Alg. 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from kmec.artifacts.apply import temporarily_added
from kmec.artifacts.payloads import LowRank, Payload
from kmec.backends.base import ExecContext
from kmec.backends.keys import Below, compute_keys, context_keys, residual_at
from kmec.backends.linalg import bound_relative_change
from kmec.planner.model import EditRequest

Solve = Callable[[int, Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def spread_over_layers(ctx: ExecContext, name: str, layers: Sequence[int],
                       edits: Sequence[EditRequest], prefixes: Sequence[str], z: torch.Tensor,
                       solve: Solve, max_delta: float | None, *,
                       per_context: bool = False, scope_weight: float = 0.0,
                       borrowed_weight: float = 0.0,
                       scope_boost: Mapping[str, float] | None = None) -> list[Payload]:
    """One ``LowRank`` per layer that together move each edit's top-layer state to ``z``.

    ``solve`` gets the mean keys [n, d_mlp], or with ``per_context`` a
    :class:`~kmec.backends.keys.ContextKeys`: every context key of every declared
    prompt (the edit's own, and its scope prompts when ``scope_weight > 0``; the borrowed
    ones weighted by ``borrowed_weight``, see :func:`~kmec.backends.keys.context_keys`).
    """
    model, tok, adapter = ctx.model, ctx.tok, ctx.adapter
    layers = sorted(layers)
    top = layers[-1]
    payloads: list[Payload] = []
    below = Below(adapter, layers[0] - 1)  # no update below the first layer: run it once
    with temporarily_added(model, adapter.weight_layout) as tmp:
        for j, layer in enumerate(layers):
            k = (context_keys(model, tok, adapter, [layer], edits, prefixes, scope_weight,
                              below=below, borrowed_weight=borrowed_weight,
                              scope_boost=scope_boost)[layer]
                 if per_context else compute_keys(model, tok, adapter, [layer], edits,
                                                  prefixes, below=below)[layer])
            cur = residual_at(model, tok, adapter, top, edits, below=below)
            u, v = solve(layer, k, (z - cur) / (len(layers) - j))
            param = f"{adapter.site('mlp_out', layer)}.weight"
            scale, ratio = bound_relative_change(u, v, tmp.params[param], max_delta)
            if scale < 1.0:
                ctx.log.warning("%s layer %d: ‖ΔW‖/‖W‖ = %.4f exceeds max_delta %.4f; scaled down",
                                name, layer, ratio, max_delta)
                u = u * scale
            payloads.append(LowRank(param, u, v))
            tmp.add(param, u, v)
            if ctx.progress:
                ctx.progress(f"{name}: layer {layer}", j + 1, len(layers))
    return payloads
