"""MEMIT: many edits at once, spread over a range of MLP layers.

Contents:
    MemitParams   prefixes, value optimisation, λ (relative), chunking
    Memit         the backend (``name = "memit"``)
    batch_update() the closed-form batched update for one layer

Meng et al. 2023 ("Mass-Editing Memory in a Transformer"), eq. 14–16 and
Alg. 1. For layers l₁ < … < l_L, each edit i gets a target hidden state
zᵢ = hᵢ + δᵢ at the last layer l_L (δᵢ from the value optimisation). Layer by
layer, with the earlier layers' updates in place, the remaining residual
rᵢ = (zᵢ − hᵢ(current)) / (layers left) is written with::

    ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹        (R: d_model × n residuals, K: d_mlp × n keys)

which we store as the rank-n factors u = R, v = (λC + KKᵀ)⁻¹ K — no dense
per-edit matrices, memory O((d_model + d_mlp)·n + d_mlp²).

λ scaled to the model: with C the key second moment, the whitened key norm
kᵀC⁻¹k of a typical key is about d_mlp, and a single-edit update achieves a
fraction ≈ kᵀC⁻¹k / (λ + kᵀC⁻¹k) of its residual. GPT-J's published
λ = 15000 at d_mlp = 16384 is λ ≈ 0.92·d_mlp; copying 15000 to a model with
d_mlp = 1536 makes λ ≈ 10·d_mlp and the edits mostly fail. kmec therefore
takes λ = ``lambda_rel`` · d_mlp, with ``lambda_rel = 0.5``: on SmolLM2-135M
the published scale (≈ 1) left efficacy on the table at no locality gain
(BENCHMARKS.md, "MEMIT: λ and key fit", measured on records the tables do not
score: 100 edits 0.91 → 0.95, 1,000 edits 0.86 → 0.89, neighbourhood −0.8
points at 1,000 and unchanged at 100).

``key_fit``: ``"contexts"`` (the default) fits every context's key kᵢⱼ — the
bare prompt and each prefix — in the least-squares sense
(:func:`batch_update`); ``"mean"`` is the paper's fit of each edit's mean key
k̄ᵢ, which under-serves the bare prompt when the subject opens it (see
:mod:`kmec.backends.rome`). Measured the same way: 100 edits 0.95 → 0.98 at
λ 0.5; no difference at 1,000, where the batch's size is the limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from kmec.artifacts.payloads import Payload
from kmec.backends.base import ExecContext
from kmec.backends.keys import (
    ContextKeys,
    context_prefixes,
    key_opening_scopes,
    locate_then_edit_cost,
    prompt_keys,
    residual_at,
)
from kmec.backends.linalg import spd_solve
from kmec.backends.spread import spread_over_layers
from kmec.backends.values import ValueParams, optimise_deltas, value_cache
from kmec.backends.wordings import with_wordings
from kmec.errors import BackendError
from kmec.models.facts import ModelFacts
from kmec.planner.backend_info import BackendInfo
from kmec.planner.model import Step


class MemitParams(BaseModel):
    """MEMIT hyper-parameters (the layers come from the step)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_prefixes: int = 4
    prefix_len: int = 6
    lambda_rel: float = 0.5
    key_fit: Literal["contexts", "mean"] = "contexts"
    value: ValueParams = ValueParams()
    max_delta: float | None = None  # bound on ‖ΔW‖_F / ‖W‖_F per parameter (spec: max_delta)
    locality_weight: float = 1.0  # ρ: weight of the declared locality set's keys (Step.protect)
    # a scope prompt the subject opens is keyed at the token after it (see
    # keys.key_opening_scopes); "subject" keys it at the subject like the others
    opening_scope: Literal["next", "subject"] = "next"
    # edit name -> weight of its keys in the least-squares fit (1 when absent); compile's
    # repair raises it for edits whose claims fail (kmec.planner.repair, rung "weigh")
    fit_weight: dict[str, float] = {}


def declared_update(ck: ContextKeys, resid: torch.Tensor, c: torch.Tensor, lam: float,
                    protected: tuple[torch.Tensor, torch.Tensor] | None = None,
                    rho: float = 0.0, edit_weight: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (u, v) of the batched update fitted on every declared prompt, with the
    declared locality set kept in place::

        min Σᵢ Σⱼ wᵢⱼ ‖ΔW kᵢⱼ − rᵢ‖² + λ tr(ΔW C ΔWᵀ) + ρ Σ_t w_t ‖ΔW k_t‖²
        ΔW = R K̄ᵀ (λC + Σᵢⱼ wᵢⱼ kᵢⱼ kᵢⱼᵀ + ρ Σ_t w_t k_t k_tᵀ)⁻¹,   K̄ᵢ = Σⱼ wᵢⱼ kᵢⱼ

    over edit i's context keys kᵢⱼ (its prompt and its scope prompts under every
    prefix, weights summing to 1 per edit: :class:`~kmec.backends.keys.ContextKeys`)
    and the keys k_t at every token of the step's ``protect`` prompts. With one
    prompt per edit and nothing protected it is :func:`batch_update` exactly.
    ``edit_weight`` [n] multiplies each edit's weights (its share of the fit).
    """
    n = resid.shape[0]
    counts = torch.bincount(ck.owner, minlength=n)
    if edit_weight is not None:
        ck = ContextKeys(ck.keys, ck.owner, ck.weight * edit_weight.to(ck.weight)[ck.owner])
    uniform = bool((counts == counts[0]).all()) and bool(
        torch.allclose(ck.weight, torch.full_like(ck.weight, 1.0 / int(counts[0]))))
    plain = protected is None or rho <= 0 or protected[0].shape[0] == 0
    if uniform and plain:  # the papers' least squares over the edit prompt's contexts
        return batch_update(ck.keys.view(n, int(counts[0]), -1), resid, c, lam)
    k = ck.keys.float()
    w = ck.weight.float().to(k.device)
    a = lam * c.float().to(k.device) + (k * w[:, None]).T @ k
    if not plain:
        kp, wp = protected[0].float().to(k.device), protected[1].float().to(k.device)
        a = a + rho * (kp * wp[:, None]).T @ kp
    kbar = torch.zeros(n, k.shape[1], device=k.device).index_add_(0, ck.owner.to(k.device),
                                                                   k * w[:, None])
    v = spd_solve(a, kbar.T)  # [d_in, n]
    return resid.float().T.contiguous(), v


def batch_update(keys: torch.Tensor, resid: torch.Tensor, c: torch.Tensor,
                 lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (u, v) of ΔW = R Kᵀ (λC + KKᵀ)⁻¹ for keys [n, d_in], residuals [n, d_out].

    With every context's key, ``keys`` [n, P, d_in], the least-squares fit is
    over all of them (``key_fit = "contexts"``)::

        min Σᵢ (1/P) Σⱼ ‖ΔW kᵢⱼ − rᵢ‖² + λ tr(ΔW C ΔWᵀ)
        ΔW = R K̄ᵀ (λC + (1/P) Σⱼ Kⱼ Kⱼᵀ)⁻¹          (K̄: the mean keys)

    >>> k = torch.eye(2); r = torch.tensor([[1.0], [2.0]])
    >>> u, v = batch_update(k, r, torch.eye(2), 1e-9)
    >>> (u @ v.T @ k.T).round(decimals=4).tolist()
    [[1.0, 2.0]]
    >>> u, v = batch_update(torch.stack([k, k], 1), r, torch.eye(2), 1e-9)  # same keys twice
    >>> (u @ v.T @ k.T).round(decimals=4).tolist()
    [[1.0, 2.0]]
    """
    k = keys.float()
    if k.ndim == 3:
        flat = k.reshape(-1, k.shape[-1])
        a = lam * c.float().to(k.device) + flat.T @ flat / k.shape[1]
        k = k.mean(1)
    else:
        a = lam * c.float().to(k.device) + k.T @ k
    v = spd_solve(a, k.T)  # [d_in, n]
    return resid.float().T.contiguous(), v


# MEMIT's paper evaluates batches up to 10,000 edits in one solve (Meng et al. 2023, Fig. 5);
# beyond that there is no evidence one solve stays accurate, so larger batches are split.
INFO = BackendInfo(
    name="memit", changes="weights", needs_stats=True, layers="range", layer_role="memit",
    max_batch=10_000, keyed=True, uses=frozenset({"scope", "preserve", "locality"}),
    cost=locate_then_edit_cost)


class Memit:
    """Batched edits over a layer range (one step may hold thousands of edits)."""

    name: ClassVar[str] = "memit"
    info: ClassVar[BackendInfo] = INFO
    Params: ClassVar[type[BaseModel]] = MemitParams

    def default_params(self, facts: ModelFacts) -> MemitParams:
        return MemitParams()

    def execute(self, step: Step, ctx: ExecContext) -> Sequence[Payload]:
        p = MemitParams.model_validate(step.params)
        if not step.layers:
            raise BackendError("MEMIT needs at least one layer", step_id=step.id)
        if ctx.stats is None:
            raise BackendError("MEMIT needs key statistics, none were provided", step_id=step.id)
        model, tok, adapter = ctx.model, ctx.tok, ctx.adapter
        layers = sorted(step.layers)
        top = layers[-1]
        edits = with_wordings(model, tok, step.edits, keep=p.value.wordings, seed=ctx.seed,
                              cache_dir=ctx.cache_dir, weights=ctx.weights, logger=ctx.log)
        if p.opening_scope == "next":
            edits = key_opening_scopes(tok, edits)
        prefixes = context_prefixes(model, tok, n=p.n_prefixes, length=p.prefix_len, seed=ctx.seed,
                                    cache_dir=ctx.cache_dir, fingerprint=ctx.facts.fingerprint)
        done = [0]

        def tick(k: int) -> None:
            done[0] += k
            if ctx.progress:
                ctx.progress("memit: target values", done[0], len(edits))

        delta, prob = optimise_deltas(model, tok, adapter, top, edits, prefixes, p.value,
                                      seed=ctx.seed, progress=tick,
                                      cache=value_cache(ctx.cache_dir, ctx.weights))
        ctx.log.info("memit: %d targets, mean target prob %.3f", len(edits), float(prob.mean()))
        h = residual_at(model, tok, adapter, top, edits)  # on the top layer's device
        z = h + delta.to(h.device)
        lam = p.lambda_rel * ctx.facts.d_mlp
        protected: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if step.protect and p.locality_weight > 0:
            protected = prompt_keys(model, tok, adapter, layers, step.protect)
            ctx.log.info("memit: %d declared prompt(s) kept in place (ρ %g)", len(step.protect),
                         p.locality_weight)

        weight = None
        if p.fit_weight:
            weight = torch.tensor([p.fit_weight.get(e.name.split("~")[0], 1.0) for e in edits])

        def solve(layer: int, k: Any, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            c = ctx.stats.second_moment(layer)
            if isinstance(k, ContextKeys):
                return declared_update(k, resid, c, lam, protected.get(layer), p.locality_weight,
                                       weight)
            return batch_update(k, resid, c, lam)

        return spread_over_layers(ctx, "memit", layers, edits, prefixes, z, solve, p.max_delta,
                                  per_context=p.key_fit == "contexts",
                                  scope_weight=p.value.scope_weight,
                                  borrowed_weight=p.value.borrowed_weight,
                                  scope_boost=p.value.scope_boost)
