"""The MEND editor network: gradient factors (u, δ) -> edited factors (ũ, δ̃).

Contents:
    EditorConfig   size and initialisation of the network (frozen pydantic)
    EditorNet      the network: running normalisation, residual low-rank MLP
                   blocks shared across layers, per-layer scale/shift and step α

Mitchell et al. 2022 ("Fast Model Editing at Scale", §3): for a linear layer
``y = W u`` and a loss L, the gradient is a sum of rank-one terms,
``∇W L = Σ_t δ_t u_tᵀ`` with ``δ_t = ∂L/∂y_t``. MEND learns a map
``g(u_t, δ_t) = (ũ_t, δ̃_t)`` and edits with::

    ΔW = −α_ℓ Σ_t δ̃_t ũ_tᵀ                        (a matrix of rank ≤ #tokens)

Here ``g`` acts on the concatenation ``z = [u; δ]`` after normalising each
feature by running statistics of the layer it comes from, and applies
``blocks`` residual blocks ``z ← z + B · relu(s_ℓ ⊙ (A z + b) + o_ℓ)`` whose
matrices ``A`` [rank, d] and ``B`` [d, rank] are shared by all edited layers
(all edited projections have the same shape) while ``s_ℓ``, ``o_ℓ`` and the
step ``α_ℓ = exp(log_alpha_ℓ)`` belong to layer ℓ (the paper's layer-specific
scale and offset). ``B`` starts at zero, so an untrained editor is the identity
and MEND starts as (feature-normalised) gradient descent.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

EPS = 1e-7  # added to the running standard deviation (as in the MEND reference code)


class EditorConfig(BaseModel):
    """Shape and initialisation of an :class:`EditorNet`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(default=256, ge=1)      # hidden width of each residual block
    blocks: int = Field(default=2, ge=1)      # residual blocks
    alpha: float = Field(default=1e-4, gt=0)  # initial step α (calibrated before training)


class EditorNet(nn.Module):
    """MEND's gradient transform for ``len(layers)`` linear layers of one shape.

    Args:
        d_in: the layer's input width (``u``; d_mlp for an MLP output projection).
        d_out: its output width (``δ``; d_model).
        n_layers: how many edited layers share the network.
        config: sizes and initial α.
        seed: seeds the random initialisation of ``A``.
    """

    def __init__(self, d_in: int, d_out: int, n_layers: int, config: EditorConfig,
                 *, seed: int = 0) -> None:
        super().__init__()
        self.d_in, self.d_out, self.n_layers, self.config = d_in, d_out, n_layers, config
        d, r, k = d_in + d_out, config.rank, config.blocks
        gen = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(k, r, d, generator=gen) / math.sqrt(d))
        self.b = nn.Parameter(torch.zeros(k, r))
        self.B = nn.Parameter(torch.zeros(k, d, r))
        self.scale = nn.Parameter(torch.ones(k, n_layers, r))
        self.shift = nn.Parameter(torch.zeros(k, n_layers, r))
        self.log_alpha = nn.Parameter(torch.full((n_layers,), math.log(config.alpha)))
        # Running statistics of z = [u; δ] per layer (Welford: count, mean, sum of squares).
        self.register_buffer("count", torch.zeros(n_layers, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n_layers, d, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(n_layers, d, dtype=torch.float64))

    @torch.no_grad()
    def observe(self, layer: int, u: torch.Tensor, delta: torch.Tensor) -> None:
        """Merge the rows of (u [n, d_in], δ [n, d_out]) into layer ``layer``'s statistics."""
        z = torch.cat([u, delta], -1).double()
        n = z.shape[0]
        if n == 0:
            return
        mean_b = z.mean(0)
        m2_b = ((z - mean_b) ** 2).sum(0)
        count = self.count[layer]
        total = count + n
        diff = mean_b - self.mean[layer]
        self.mean[layer] += diff * (n / total)
        self.m2[layer] += m2_b + diff**2 * (count * n / total)
        self.count[layer] = total

    def _normalise(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        if float(self.count[layer]) < 2:
            return z
        var = self.m2[layer] / (self.count[layer] - 1)
        return ((z.double() - self.mean[layer]) / (var.sqrt() + EPS)).float()

    def forward(self, layer: int, u: torch.Tensor,
                delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ũ [n, d_in], δ̃ [n, d_out]) for the rows of (u, δ) at edited layer ``layer``
        (an index into the editor's layers, not a model layer number)."""
        z = self._normalise(layer, torch.cat([u, delta], -1).float())
        for k in range(self.config.blocks):
            h = torch.relu(self.scale[k, layer] * (z @ self.A[k].T + self.b[k])
                           + self.shift[k, layer])
            z = z + h @ self.B[k].T
        return z[:, : self.d_in], z[:, self.d_in:]

    def alpha(self, layer: int) -> torch.Tensor:
        """The learned step α of edited layer ``layer`` (a positive scalar tensor)."""
        return self.log_alpha[layer].exp()
