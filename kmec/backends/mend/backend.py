"""The ``mend`` backend: one forward/backward pass through a trained editor per step.

Contents:
    MendParams   the editor's hash (from the store), a weight-change bound, row length
    Mend         the backend (``name = "mend"``)

``execute`` loads the editor stored for the model's fingerprint, runs the base
model once on every edit's ``prompt + target`` to get the gradient factors
(u, δ) of the target's NLL at the edited layers, maps them through the editor
and returns, per layer, ``ΔW = −α Σ_t δ̃_t ũ_tᵀ`` as a ``LowRank`` payload with
``u = (−α δ̃)ᵀ`` [d_out, tokens] and ``v = ũᵀ`` [d_in, tokens]. Several edits in
one step add their updates (the gradient of the summed loss), as MEND does for
batched edits.

``default_params`` reads the stored editor's manifest, so the plan records the
editor's hash: retraining the editor changes the plan and invalidates cached
compile steps, and ``execute`` refuses an editor other than the planned one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from kmec.artifacts.payloads import LowRank, Payload
from kmec.backends.base import ExecContext
from kmec.backends.linalg import bound_relative_change
from kmec.backends.mend.edit import base_pass, editor_factors, tokenize
from kmec.backends.mend.store import find_editor, load_editor
from kmec.errors import BackendError
from kmec.models.facts import ModelFacts
from kmec.models.hooks import device_of, get_module
from kmec.planner import costs
from kmec.planner.backend_info import BackendInfo, Work
from kmec.planner.model import Step

CHUNK = 32  # edits per forward/backward pass


class MendParams(BaseModel):
    """MEND step parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    editor: str = ""  # sha256 of the trained editor (empty: none was stored when planning)
    max_delta: float | None = Field(default=None, ge=0)  # bound on ‖ΔW‖_F / ‖W‖_F per parameter
    max_len: int = 96


def _train_hint(facts: ModelFacts) -> str:
    return (f"train one first: kmec train-editor --model {facts.name or 'MODEL'} "
            "--data zsre_mend_train_1k.json (zsRE or CounterFact records)")


MEND_TRAIN_STEPS = 10_000  # editor training, once per model (then cached)
MEND_BATCH = 10


def _cost(step: Step, facts: ModelFacts, setup: bool) -> Work:
    """One forward+backward per edit, plus training the editor (``MEND_TRAIN_STEPS`` steps)
    when none is registered for the model (``setup``)."""
    p, L = costs.model_params(facts), max(len(step.layers), 1)
    d, m = facts.d_model, facts.d_mlp
    prompts = sum(1 + len(e.scope) for e in step.edits)
    secs = costs.seconds(prompts * costs.PROMPT_TOKENS * costs.FWD_BWD, p)
    parts = [f"editing {secs:.0f} s"]
    if setup:
        train = costs.seconds(MEND_TRAIN_STEPS * MEND_BATCH * costs.PROMPT_TOKENS
                              * costs.FWD_BWD, p)
        secs += train
        parts.append(f"editor training {train:.0f} s (once per model)")
    hyper = L * 2 * (d + m) * (d + m) * 4 / costs.MB
    return Work(secs, costs.activations_mb(facts, MEND_BATCH * costs.PROMPT_TOKENS) + hyper,
                tuple(parts))


INFO = BackendInfo(
    name="mend", changes="weights", layers="range", layer_role="mend", needs_editor=True,
    uses=frozenset({"scope"}), cost=_cost)


class Mend:
    """Edits through a MEND editor trained by ``kmec train-editor``."""

    name: ClassVar[str] = "mend"
    info: ClassVar[BackendInfo] = INFO
    Params: ClassVar[type[BaseModel]] = MendParams

    def default_params(self, facts: ModelFacts) -> MendParams:
        manifest = find_editor(facts.fingerprint)
        return MendParams(editor=manifest.sha256 if manifest else "")

    def execute(self, step: Step, ctx: ExecContext) -> Sequence[Payload]:
        p = MendParams.model_validate(step.params)
        if not p.editor:
            raise BackendError(f"no trained MEND editor for {ctx.facts.name}", step_id=step.id,
                               hint=_train_hint(ctx.facts))
        editor = load_editor(ctx.facts.fingerprint)
        if editor is None or editor.manifest.sha256 != p.editor:
            raise BackendError(
                f"the MEND editor for {ctx.facts.name} is not the one this plan was made with "
                f"({p.editor[:12]})", step_id=step.id,
                hint="recompile: the plan is made again with the current editor")
        layers = editor.manifest.layers
        if tuple(sorted(step.layers)) != layers:
            raise BackendError(
                f"the MEND editor edits layers {list(layers)}, the plan asks for "
                f"{list(step.layers)}", step_id=step.id,
                hint="leave `layers` out of the spec, or train an editor for those layers")
        u, v = _factors(step, ctx, editor.net, layers, p.max_len)
        payloads: list[Payload] = []
        for layer in layers:
            module = ctx.adapter.site("mlp_out", layer)
            payloads.append(_payload(step, ctx, layer, module, u[layer], v[layer], p.max_delta))
        return payloads


def _factors(step: Step, ctx: ExecContext, net: Any, layers: Sequence[int],
             max_len: int) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per layer, ``u = (−α δ̃)ᵀ`` [d_out, tokens] and ``v = ũᵀ`` [d_in, tokens] of all edits."""
    device = device_of(ctx.model)
    net = net.to(device)
    us: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    vs: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(step.edits), CHUNK):
        chunk = step.edits[start:start + CHUNK]
        rows = tokenize(ctx.tok, [(e.prompt, e.target_new) for e in chunk], max_len=max_len,
                        device=device)
        base = base_pass(ctx.model, ctx.adapter, layers, rows,
                         torch.arange(len(chunk), device=device))
        with torch.no_grad():
            factors = editor_factors(net, layers, base, rows.active)
        for layer, (U, D) in factors.items():
            us[layer].append(D[rows.active].T.cpu())
            vs[layer].append(U[rows.active].T.cpu())
        if ctx.progress:
            ctx.progress("mend", start + len(chunk), len(step.edits))
    return ({k: torch.cat(x, 1) for k, x in us.items()},
            {k: torch.cat(x, 1) for k, x in vs.items()})


def _payload(step: Step, ctx: ExecContext, layer: int, module: str, u: torch.Tensor,
             v: torch.Tensor, max_delta: float | None) -> LowRank:
    """One layer's update as a LowRank payload (rank capped at d_out, bounded by max_delta)."""
    if u.shape[1] > u.shape[0]:  # more tokens than output features: u vᵀ = Q (v Rᵀ)ᵀ, exactly
        q, r = torch.linalg.qr(u)
        u, v = q, v @ r.T
    if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
        raise BackendError("the MEND editor produced NaN/inf", step_id=step.id)
    weight = get_module(ctx.model, module).weight
    scale, ratio = bound_relative_change(u, v, weight, max_delta)
    if scale < 1.0:
        ctx.log.warning("mend layer %d: ‖ΔW‖/‖W‖ = %.4f exceeds max_delta %.4f; scaled down",
                        layer, ratio, max_delta)
    ctx.log.debug("mend layer %d: rank %d, ‖ΔW‖/‖W‖ = %.4f", layer, u.shape[1], ratio)
    return LowRank(f"{module}.weight", (u * scale).contiguous(), v.contiguous())
