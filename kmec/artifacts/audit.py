"""The audit: prove an edited model differs from its base exactly as an artifact declares.

Contents:
    AuditResult   what moved, what matched, the largest delta error
    audit()       compare base and edited parameters against the artifact's deltas
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kmec.artifacts.apply import low_rank_delta
from kmec.artifacts.format import Artifact
from kmec.artifacts.payloads import LowRank, MemoryTable


@dataclass(frozen=True)
class AuditResult:
    """Outcome of :func:`audit`."""

    ok: bool
    undeclared: tuple[str, ...]  # parameters that moved but the artifact does not declare
    mismatched: tuple[str, ...]  # declared parameters whose change differs from the delta
    checked: int
    max_error: float  # over declared parameters with finite values
    nonfinite: tuple[str, ...] = ()  # declared parameters holding NaN or inf after the edit

    def summary(self) -> str:
        if self.ok:
            return f"audit passed: {self.checked} parameters checked, max delta error {self.max_error:.2e}"
        parts = []
        if self.nonfinite:
            parts.append("non-finite values (NaN or inf) in: " + ", ".join(self.nonfinite))
        if self.undeclared:
            parts.append("undeclared parameters moved: " + ", ".join(self.undeclared))
        if self.mismatched:
            parts.append("declared deltas do not match: " + ", ".join(self.mismatched))
        return "audit failed: " + "; ".join(parts)


def audit(base: Any, edited: Any, artifact: Artifact, *, rtol: float = 1e-4) -> AuditResult:
    """Check that ``edited`` differs from ``base`` exactly by the artifact's deltas.

    Every parameter not named in the manifest must be bit-identical; every
    declared parameter must be finite and satisfy
    ``‖(edited − base) − Δ‖ ≤ rtol·‖Δ‖ + 4·eps·‖W‖`` (Δ being the sum of the
    artifact's payloads on it). A NaN anywhere fails: comparisons with NaN are
    false, so "error > bound" alone would let it pass.
    """
    layout = artifact.manifest.weight_layout
    declared: dict[str, torch.Tensor] = {}
    for p in artifact.payloads():
        if isinstance(p, MemoryTable):
            continue
        d = (low_rank_delta(p, layout, torch.float32, "cpu") if isinstance(p, LowRank)
             else p.delta.float().cpu())
        declared[p.param] = declared.get(p.param, 0) + d
    base_params = dict(base.named_parameters())
    undeclared, mismatched, nonfinite, max_err, n = [], [], [], 0.0, 0
    for name, w_edit in edited.named_parameters():
        n += 1
        w_base = base_params.get(name)
        if w_base is None or w_base.shape != w_edit.shape:
            undeclared.append(name)
            continue
        if name not in declared:
            if not torch.equal(w_base, w_edit):
                undeclared.append(name)
            continue
        if not bool(torch.isfinite(w_edit).all()):
            nonfinite.append(name)
            continue
        # float64: squared norms of large but finite weights overflow float32
        diff = w_edit.detach().double().cpu() - w_base.detach().double().cpu()
        err = (diff - declared[name].double()).norm().item()
        # rounding of W + Δ in the parameter's dtype is at most ~eps·|W| per element
        eps = torch.finfo(w_edit.dtype).eps
        bound = rtol * declared[name].double().norm().item() + \
            4 * eps * w_base.double().norm().item()
        max_err = max(max_err, err)
        if err > bound:
            mismatched.append(name)
    ok = not undeclared and not mismatched and not nonfinite
    return AuditResult(ok, tuple(undeclared), tuple(mismatched), n, max_err, tuple(nonfinite))
