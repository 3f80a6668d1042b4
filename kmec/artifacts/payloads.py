"""What an edit *is*: three payload types, each a delta or a table keyed by name.

Contents:
    LowRank        W += scale · u vᵀ   (u: [out, r], v: [in, r], in the math layout)
    Dense          W += delta          (in the parameter's own storage layout)
    MemoryTable    an external memory installed at a hook site (keys, values, radii, meta)
    Payload        LowRank | Dense | MemoryTable

Backends return these; only :mod:`kmec.artifacts.apply` adds them to a model.
``u`` lives in the output space of the edited module (d_model for
``mlp_out``) and ``v`` in its input space (the key space), whatever the
module's storage layout; the ArchAdapter's ``weight_layout`` says how ``u vᵀ``
is added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class LowRank:
    """A low-rank delta ``scale · u vᵀ`` on parameter ``param`` (math layout [out, in])."""

    param: str
    u: torch.Tensor
    v: torch.Tensor
    scale: float = 1.0
    kind: str = field(default="low_rank", init=False)

    def dense(self) -> torch.Tensor:
        """The delta as a dense [out, in] matrix (float32)."""
        return self.scale * (self.u.float() @ self.v.float().T)


@dataclass(frozen=True)
class Dense:
    """A dense delta on parameter ``param`` in the parameter's own storage layout."""

    param: str
    delta: torch.Tensor
    kind: str = field(default="dense", init=False)


@dataclass(frozen=True)
class MemoryTable:
    """An external memory: keys → values at a hook site, within ``radius``."""

    site: str
    layer: int
    keys: torch.Tensor
    values: torch.Tensor
    radius: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = field(default="memory", init=False)


Payload = LowRank | Dense | MemoryTable
