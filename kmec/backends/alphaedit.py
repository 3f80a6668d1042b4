"""AlphaEdit: sequential edits projected onto the null space of preserved knowledge.

Contents:
    ProtectedKey        an earlier edit whose key this step must not disturb
    AlphaEditParams     null-space threshold, ridge, prefixes, values, protected keys
    AlphaEdit           the backend (``name = "alphaedit"``)
    null_space()        basis Û of the small-eigenvalue directions of C, and their energy
    null_space_update() the closed-form projected update for one layer (factors)

Fang et al. 2025 ("AlphaEdit: Null-Space Constrained Knowledge Editing for
Language Models"), eq. 7–14. Preserved knowledge K0 enters only through the
key second moment C = E[k kᵀ] ≈ K0 K0ᵀ / N of the base model. With
C = U Λ Uᵀ, let Û hold the eigenvectors whose eigenvalue is below
``null_space_rel`` · λ_max and P = Û Ûᵀ: then ‖P k0‖ is small for every
preserved key, so any update of the form Δ = Δ̃ P leaves W k0 (almost)
unchanged. For the new keys K1 (d_mlp × n), their residuals R (d_model × n)
and the keys Kp of earlier edits (d_mlp × m), the paper solves::

    min_Δ̃ ‖Δ̃ P K1 − R‖² + α ‖Δ̃ P‖² + ‖Δ̃ P Kp‖²

Setting the gradient to zero gives Δ̃ P (K1K1ᵀ + KpKpᵀ + αI) P = R K1ᵀ P, whose
minimum-norm solution is the paper's::

    Δ = R K1ᵀ P (Kp Kpᵀ P + K1 K1ᵀ P + α I)⁻¹

It satisfies Δ = Δ P (for x with P x = 0 the inverse maps x to x/α and
K1ᵀ P x = 0), so it is applied directly, W ← W + Δ, and Δ K0 ≈ 0. kmec
computes it in the r-dimensional null-space coordinates, where the system is
symmetric positive definite (writing Δ = Y Ûᵀ turns the objective into a ridge
regression in Y)::

    Δ = R · (Û M⁻¹ Ûᵀ K1)ᵀ,   M = Ûᵀ (K1K1ᵀ + KpKpᵀ) Û + α I_r

and returns it as the rank-n factors u = R, v = Û M⁻¹ Ûᵀ K1 — never a dense
d_model × d_mlp matrix; the solve is r × r with r ≤ d_mlp.

α scaled to the statistics (DESIGN: constants copied between models fail):
a single edit achieves a fraction a / (a + α) of its residual, a = ‖Ûᵀk‖². A
typical key has E‖Ûᵀk‖² = tr(Ûᵀ C Û) = Σ of the null-space eigenvalues, so
kmec takes α = ``alpha_rel`` · tr(Ûᵀ C Û). ``project = False`` sets P = I
(the ablation: a ridge update without null-space protection).

Like MEMIT, each edit's target z = h + δ is set at the top layer of the step's
range (δ from :func:`~kmec.backends.values.optimise_deltas`) and the remaining
residual is spread over the layers bottom-up, recomputing keys with the lower
layers' updates in place.

How earlier edits are protected (Kp). In a plan with ``order sequence`` the
planner (pass ``choose_params``) lists in every alphaedit step's
``params.protect`` the name, prompt and subject of each edit of the steps
before it. The backend recomputes their keys k* (same prefixes, same
averaging as the new keys) on the model it is given, which for ``order
sequence`` already carries the earlier edits — the keys as they are now, which
are what the update must leave alone. Why this and not a cache of the keys
computed at edit time: the plan then says, for an auditor, exactly which edits
each step protects; the step depends on nothing outside the plan and the
model (no cache state that could be missing or stale); the step cache key
changes when the protected set does. The cost is a plan that grows
quadratically with the number of sequential edits (about 60 bytes per edit
per later step) and one extra forward pass per step over the earlier prompts,
stopped after the deepest edited layer. An earlier edit with the same prompt
and subject as one of this step's edits is superseded, not protected.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from kmec.artifacts.payloads import Payload
from kmec.backends.base import ExecContext
from kmec.backends.keys import (
    compute_keys,
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
from kmec.hashing import atomic_write_bytes, sha256_tensor
from kmec.models.facts import ModelFacts
from kmec.planner import costs
from kmec.planner.backend_info import BackendInfo
from kmec.planner.model import EditRequest, StatsRequest, Step


class ProtectedKey(BaseModel):
    """An earlier edit whose key k* this step's update must leave unchanged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    prompt: str
    subject: str | None = None


class AlphaEditParams(BaseModel):
    """AlphaEdit hyper-parameters (the layers come from the step).

    Attributes:
        null_space_rel: C's eigen-directions with λ < null_space_rel · λ_max
            form the null space the update lives in (SmolLM2-135M, layers 4–8:
            1e-2 keeps 750–1270 of 1536 directions, holding 15–37 % of the key
            energy).
        project: False sets P = I (no null-space protection; the ablation).
        alpha_rel: ridge α relative to the null space's key energy tr(ÛᵀCÛ).
        protect: earlier edits whose keys are protected (set by the planner).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_prefixes: int = 4
    prefix_len: int = 6
    null_space_rel: float = Field(default=1e-2, gt=0, le=1)
    project: bool = True
    alpha_rel: float = Field(default=0.1, gt=0)
    value: ValueParams = ValueParams()
    max_delta: float | None = None  # bound on ‖ΔW‖_F / ‖W‖_F per parameter (spec: max_delta)
    protect: tuple[ProtectedKey, ...] = ()
    locality_weight: float = 1.0  # ρ: weight of the declared locality set's keys (Step.protect)
    # λ = cov_rel · d_mlp on the preserved keys' second moment inside the null space,
    # M += λ ÛᵀCÛ (MEMIT's λC restricted to P): the directions the projection keeps are not
    # all empty on a small model, and this spends the update where C is smallest. 0: the
    # paper's solve. Left out of the dump when 0, so plans keep their bytes.
    cov_rel: float = Field(default=0.0, ge=0, exclude_if=lambda v: v == 0)
    # a scope prompt the subject opens is keyed at the token after it (see
    # keys.key_opening_scopes); "subject" keys it at the subject like the others
    opening_scope: Literal["next", "subject"] = "next"


def null_space(c: torch.Tensor, rel: float) -> tuple[torch.Tensor, float]:
    """Orthonormal basis Û [d, r] of C's eigenvectors with λ < rel · λ_max, and Σ of those λ.

    >>> u, energy = null_space(torch.diag(torch.tensor([1.0, 1e-4, 2.0])), 1e-2)
    >>> u.abs().T.tolist(), round(energy, 6)
    ([[0.0, 1.0, 0.0]], 0.0001)
    """
    evals, evecs = torch.linalg.eigh(c.double())
    keep = evals < rel * evals.max()
    return evecs[:, keep].float().contiguous(), float(evals[keep].clamp_min(0).sum())


def null_space_update(keys: torch.Tensor, resid: torch.Tensor, basis: torch.Tensor | None,
                      protected: torch.Tensor | None, alpha: float,
                      cov: torch.Tensor | None = None, lam: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (u, v) of Δ = R K1ᵀ P (Kp Kpᵀ P + K1 K1ᵀ P + λ C P + α I)⁻¹, P = Û Ûᵀ.

    Args:
        keys: new keys K1ᵀ, [n, d_in].
        resid: residuals Rᵀ, [n, d_out].
        basis: Û [d_in, r] (None: P = I).
        protected: earlier edits' keys Kpᵀ, [m, d_in] (None or m = 0: none).
        alpha: the ridge α > 0.
        cov: the preserved keys' second moment C [d_in, d_in], weighted by ``lam``
            inside the null space (None or lam = 0: the paper's solve).

    Returns:
        u = R [d_out, n] and v = Û M⁻¹ Ûᵀ K1 [d_in, n], so that Δ = u vᵀ.

    >>> u, v = null_space_update(torch.eye(2), torch.tensor([[1.0], [2.0]]),
    ...                          torch.tensor([[1.0], [0.0]]), None, 1e-6)
    >>> (u @ v.T).round(decimals=4).tolist()   # only the null-space direction moves
    [[1.0, 0.0]]
    """
    k = keys.float()
    a = k if basis is None else k @ basis.to(k.device)  # K1ᵀ Û, [n, r]
    m = a.T @ a
    if protected is not None and protected.shape[0]:
        kp = protected.float().to(k.device)
        b = kp if basis is None else kp @ basis.to(k.device)
        m = m + b.T @ b
    if cov is not None and lam > 0:
        c = cov.float().to(k.device)
        m = m + lam * (c if basis is None else basis.to(k.device).T @ c @ basis.to(k.device))
    m = m + alpha * torch.eye(m.shape[0], device=m.device)
    y = spd_solve(m, a.T)  # M⁻¹ Ûᵀ K1, [r, n]
    v = y if basis is None else basis.to(k.device) @ y
    return resid.float().T.contiguous(), v


def _eigen_cost(request: StatsRequest, facts: ModelFacts) -> float:
    """The null-space projector: an eigendecomposition per layer, about ``10 · d_mlp³``."""
    return len(request.layers) * 10 * facts.d_mlp**3 / costs.CPU_FLOPS


INFO = BackendInfo(
    name="alphaedit", changes="weights", needs_stats=True, layers="range", layer_role="memit",
    layer_note="AlphaEdit edits MEMIT's layers (as in its paper)", keyed=True,
    uses=frozenset({"scope", "preserve", "locality"}), cost=locate_then_edit_cost,
    stats_cost=_eigen_cost)


class AlphaEdit:
    """Null-space–projected edits over a layer range; one step per edit under ``order sequence``."""

    name: ClassVar[str] = "alphaedit"
    info: ClassVar[BackendInfo] = INFO
    Params: ClassVar[type[BaseModel]] = AlphaEditParams

    def default_params(self, facts: ModelFacts) -> AlphaEditParams:
        return AlphaEditParams()

    def execute(self, step: Step, ctx: ExecContext) -> Sequence[Payload]:
        p = AlphaEditParams.model_validate(step.params)
        if not step.layers:
            raise BackendError("AlphaEdit needs at least one layer", step_id=step.id)
        if ctx.stats is None:
            raise BackendError("AlphaEdit needs key statistics, none were provided",
                               step_id=step.id)
        stats, model, tok, adapter = ctx.stats, ctx.model, ctx.tok, ctx.adapter
        layers = sorted(step.layers)
        top = layers[-1]
        edits = with_wordings(model, tok, step.edits, keep=p.value.wordings, seed=ctx.seed,
                              cache_dir=ctx.cache_dir, weights=ctx.weights, logger=ctx.log)
        if p.opening_scope == "next":
            edits = key_opening_scopes(tok, edits)
        prefixes = context_prefixes(model, tok, n=p.n_prefixes, length=p.prefix_len, seed=ctx.seed,
                                    cache_dir=ctx.cache_dir, fingerprint=ctx.facts.fingerprint)
        protected = _protected_keys(ctx, layers, edits, p.protect, prefixes)
        if step.protect and p.locality_weight > 0:  # the declared locality set, weighted rows
            for layer, (kp, w) in prompt_keys(model, tok, adapter, layers, step.protect).items():
                rows = kp * (p.locality_weight * w).sqrt()[:, None]
                earlier = protected.get(layer)
                protected[layer] = rows if earlier is None else torch.cat([earlier, rows.to(
                    earlier.device)])
        done = [0]

        def tick(k: int) -> None:  # after each chunk of target values (δ), as MEMIT reports
            done[0] += k
            if ctx.progress:
                ctx.progress("alphaedit: target values", done[0], len(edits))

        delta, prob = optimise_deltas(model, tok, adapter, top, edits, prefixes, p.value,
                                      seed=ctx.seed, progress=tick,
                                      cache=value_cache(ctx.cache_dir, ctx.weights))
        ctx.log.info("alphaedit: %d target(s), mean target prob %.3f, %d protected key(s)",
                     len(edits), float(prob.mean()), len(p.protect))
        h = residual_at(model, tok, adapter, top, edits)  # on the top layer's device
        z = h + delta.to(h.device)

        lam = p.cov_rel * ctx.facts.d_mlp

        def solve(layer: int, k: torch.Tensor, resid: torch.Tensor):
            c = stats.second_moment(layer)
            basis, alpha = _projection(ctx, step, layer, c, p)
            return null_space_update(k, resid, basis, protected.get(layer), alpha,
                                     c if lam > 0 else None, lam)

        return spread_over_layers(ctx, "alphaedit", layers, edits, prefixes, z, solve, p.max_delta)


def _projection(ctx: ExecContext, step: Step, layer: int, c: torch.Tensor,
                p: AlphaEditParams) -> tuple[torch.Tensor | None, float]:
    """(Û, or None for P = I; and α) for ``layer``, whose key second moment is ``c``."""
    if not p.project:
        return None, p.alpha_rel * float(torch.diagonal(c.double()).sum())
    basis, energy = _cached_null_space(c, p.null_space_rel, ctx.cache_dir)
    if basis.shape[1] == 0:
        raise BackendError(f"layer {layer}: no eigenvalue of C is below "
                           f"{p.null_space_rel:g}·λ_max, so no direction preserves the "
                           "statistics and the edit would do nothing", step_id=step.id,
                           hint="raise null_space_rel, or set project = false")
    ctx.log.debug("alphaedit layer %d: null space %d of %d directions", layer,
                  basis.shape[1], basis.shape[0])
    return basis, p.alpha_rel * max(energy, 1e-12)


def _cached_null_space(c: torch.Tensor, rel: float,
                       cache_dir: Path | None) -> tuple[torch.Tensor, float]:
    """:func:`null_space`, cached on disk by the sha256 of C and ``rel`` (eigh is O(d³))."""
    from safetensors.torch import load, save

    if cache_dir is None:
        return null_space(c, rel)
    path = Path(cache_dir) / "alphaedit" / f"{sha256_tensor(c)[:32]}-{rel!r}.safetensors"
    if path.exists():
        try:
            t = load(path.read_bytes())
            return t["basis"].to(c.device), float(t["energy"])
        except (OSError, KeyError, ValueError, RuntimeError):
            pass  # a corrupt entry is recomputed and replaced
    basis, energy = null_space(c, rel)
    atomic_write_bytes(path, save({"basis": basis.cpu(),
                                   "energy": torch.tensor(energy, dtype=torch.float64)}))
    return basis, energy


def _protected_keys(ctx: ExecContext, layers: Sequence[int], edits: Sequence[EditRequest],
                    protect: Sequence[ProtectedKey], prefixes: Sequence[str]
                    ) -> dict[int, torch.Tensor]:
    """Kpᵀ per layer ([m, d_mlp]) for the earlier edits this step does not supersede.

    One forward pass for all layers, before this step's own updates: those
    updates leave these keys' layer outputs (almost) unchanged, which is the
    point of protecting them, so later layers' keys stay valid.
    """
    own = {(e.prompt, e.subject) for e in edits}
    keep = [q for q in protect if (q.prompt, q.subject) not in own]
    if len(keep) < len(protect):
        ctx.log.info("alphaedit: %d earlier edit(s) superseded by this step, not protected",
                     len(protect) - len(keep))
    if not keep:
        return {}
    requests = [EditRequest(name=q.name, prompt=q.prompt, subject=q.subject, target_new="")
                for q in keep]
    return compute_keys(ctx.model, ctx.tok, ctx.adapter, layers, requests, prefixes)

