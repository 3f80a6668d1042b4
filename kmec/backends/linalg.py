"""Shared linear algebra for closed-form edits: guarded SPD solves.

Contents:
    spd_solve()     solve A X = B for symmetric positive (semi-)definite A in
                    float64 with a Cholesky factorisation, adding the smallest
                    ridge that makes it succeed; refuses NaN/inf
    math_weight()   a parameter as the [out, in] matrix the math uses
"""

from __future__ import annotations

import torch


def spd_solve(a: torch.Tensor, b: torch.Tensor, *, ridge: float = 1e-6) -> torch.Tensor:
    """Solve ``a x = b`` for SPD ``a`` (float64 Cholesky), returning float32.

    A ridge ``ε · tr(a)/d · I`` is added, starting at ``ridge`` and growing ×10
    until the factorisation succeeds, so an ill-conditioned second moment (few
    tokens, dead MLP units) still gives a finite, smallest-change answer.

    Raises:
        FloatingPointError: ``a`` or ``b`` holds NaN/inf, or no ridge up to 1 works.

    >>> a = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    >>> spd_solve(a, torch.tensor([[2.0], [4.0]])).round(decimals=4).tolist()
    [[1.0], [1.0]]
    """
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise FloatingPointError("NaN or inf in a linear solve's inputs")
    a64, b64 = a.double(), b.double()
    d = a64.shape[0]
    scale = (torch.diagonal(a64).sum() / d).clamp_min(1e-30)
    eye = torch.eye(d, dtype=a64.dtype, device=a64.device)
    eps = ridge
    while eps <= 1.0:
        chol, info = torch.linalg.cholesky_ex(a64 + eps * scale * eye)
        if int(info) == 0:
            x = torch.cholesky_solve(b64, chol)
            if torch.isfinite(x).all():
                return x.float()
        eps *= 10
    raise FloatingPointError("the matrix is too ill-conditioned to solve even with a ridge")


def math_weight(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """``weight`` as the ``[out, in]`` matrix W with ``y = W k`` (float32 copy)."""
    w = weight.detach().float()
    return w.T if layout == "in_out" else w


def bound_relative_change(u: torch.Tensor, v: torch.Tensor, weight: torch.Tensor,
                          max_delta: float | None) -> tuple[float, float]:
    """Scale factor that keeps ``‖u vᵀ‖_F ≤ max_delta · ‖W‖_F``, and the unscaled ratio.

    ``‖u vᵀ‖_F² = tr((uᵀu)(vᵀv))``, so no dense matrix is formed.

    >>> bound_relative_change(torch.ones(2, 1), torch.ones(2, 1), torch.ones(2, 2), 0.5)
    (0.5, 1.0)
    """
    uu, vv = u.float().T @ u.float(), v.float().T @ v.float()
    norm = float(torch.sqrt(torch.clamp(torch.trace(uu @ vv), min=0.0)))
    ratio = norm / max(float(weight.detach().float().norm()), 1e-30)
    if max_delta is None or ratio <= max_delta:
        return 1.0, ratio
    return max_delta / ratio, ratio
