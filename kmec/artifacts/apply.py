"""Apply and revert: the only code that writes a model's parameters.

Contents:
    Applied             an artifact applied in place; ``revert()`` restores exact bytes
    apply()             add an artifact's payloads to a model (checked first, all or nothing)
    copy_for()          a copy of a model to apply an artifact to, sharing what it does not write
    low_rank_delta()    a LowRank payload as a dense delta in the parameter's storage layout
    temporarily_added   context manager: add ``u vᵀ`` deltas for a computation, restore on exit

A ``LowRank`` payload adds ``scale · u vᵀ`` to a parameter in the math layout
``[out, in]``; the ``weight_layout`` recorded in the manifest (from the
ArchAdapter) says whether the stored weight is ``[out, in]`` (``nn.Linear``)
or ``[in, out]`` (GPT-2's ``Conv1D``), so no shapes are sniffed. Payloads
holding NaN or inf are refused before any weight changes; a memory table is
installed as a forward hook (:mod:`kmec.artifacts.memory`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Self

import torch

from kmec.artifacts.format import Artifact, check_base
from kmec.artifacts.payloads import Dense, LowRank, MemoryTable
from kmec.errors import ArtifactError


@dataclass
class Applied:
    """An artifact applied to a model in place; ``revert()`` restores exact bytes."""

    model: Any
    artifact: Artifact
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    hooks: list[Any] = field(default_factory=list)
    reverted: bool = False

    def revert(self) -> None:
        """Restore every touched parameter bit-for-bit and remove memory hooks."""
        if self.reverted:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, original in self.originals.items():
                params[name].copy_(original)
        for h in self.hooks:
            h.close()
        self.reverted = True


def low_rank_delta(p: LowRank, layout: str, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """Dense delta of a LowRank payload in the parameter's storage layout."""
    d = p.scale * (p.u.to(device, torch.float32) @ p.v.to(device, torch.float32).T)
    return (d.T if layout == "in_out" else d).to(dtype)


def _check_payloads(artifact: Artifact) -> None:
    """Refuse non-finite or malformed payloads before any weight is touched."""
    for entry, p in zip(artifact.manifest.payloads, artifact.payloads()):
        where = f"payload {entry.id} (step {entry.step}, {entry.param or entry.site})"
        if isinstance(p, LowRank):
            if p.u.ndim != 2 or p.v.ndim != 2 or p.u.shape[1] != p.v.shape[1]:
                raise ArtifactError(f"{where} has factors of shapes {tuple(p.u.shape)} and "
                                    f"{tuple(p.v.shape)}; expected [out, r] and [in, r]",
                                    hint="the artifact is corrupt; recompile it")
            named = {"u": p.u, "v": p.v, "scale": torch.tensor(p.scale)}
        elif isinstance(p, Dense):
            named = {"delta": p.delta}
        else:
            named = {"keys": p.keys, "values": p.values, "radius": p.radius}
        for part, t in named.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ArtifactError(f"{where} holds non-finite values (NaN or inf) in {part}",
                                    hint="the edit diverged when it was computed; recompile the "
                                    "spec (lower the learning rate or max_delta) and check its log")


def apply(artifact: Artifact, model: Any, *, fingerprint: str | None = None,
          check: bool = True, tok: Any = None) -> Applied:
    """Add the artifact's payloads to ``model`` in place.

    Every payload is checked (finite, well-formed) before any weight changes;
    if applying fails part way, the weights already touched are restored.

    Args:
        artifact: the artifact.
        model: a model whose weights equal the artifact's base model.
        fingerprint: the model's fingerprint if already known (else computed).
        check: refuse a model whose fingerprint differs from the base's.
        tok: the model's tokenizer, passed to memory tables that read text
            (a retrieval memory needs it; weight deltas and codebooks do not).

    Raises:
        ModelError: a retrieval memory without ``tok``.
        ArtifactError: fingerprint mismatch, non-finite payload, unknown
            parameter, shape mismatch, or a delta that overflows the weights' dtype.
    """
    if check:
        if fingerprint is None:
            from kmec.models.load import fingerprint_model

            fingerprint = fingerprint_model(model)
        check_base(artifact.manifest, fingerprint)
    _check_payloads(artifact)
    params = dict(model.named_parameters())
    applied = Applied(model, artifact)
    layout = artifact.manifest.weight_layout
    try:
        with torch.no_grad():
            for p in artifact.payloads():
                if isinstance(p, MemoryTable):
                    from kmec.artifacts.memory import install_memory

                    applied.hooks.append(install_memory(model, p, tok=tok))
                    continue
                if p.param not in params:
                    raise ArtifactError(f"the model has no parameter {p.param!r} that the artifact edits")
                w = params[p.param]
                if p.param not in applied.originals:
                    applied.originals[p.param] = w.detach().clone()
                if isinstance(p, LowRank):
                    delta = low_rank_delta(p, layout, w.dtype, w.device)
                else:
                    delta = p.delta.to(w.device, w.dtype)
                if delta.shape != w.shape:
                    raise ArtifactError(f"delta for {p.param} has shape {tuple(delta.shape)}, "
                                        f"the parameter has {tuple(w.shape)}")
                w.add_(delta)
                if not bool(torch.isfinite(w).all()):
                    raise ArtifactError(f"applying the delta makes {p.param} non-finite in "
                                        f"{w.dtype} (overflow)",
                                        hint="load the model in float32, or recompile with a "
                                        "smaller max_delta")
    except BaseException:
        applied.revert()
        raise
    return applied


def copy_for(model: Any, artifact: Artifact) -> Any:
    """A copy of ``model`` to :func:`apply` ``artifact`` to: the parameters the artifact's
    payloads write are copied; every other parameter is ``model``'s own tensor, shared
    (modules, buffers and hooks are copied). A rank-one edit writes a few matrices, so
    this costs a fraction of copying the whole model (the embedded model: 0.5 GB and
    ~1.7 s). Neither model may then be written anywhere but through :func:`apply`,
    which writes only the copied parameters; an audit of the two (:func:`audit`) cannot
    see a write to a shared tensor, so verification keeps a whole copy and compile's
    loop, which uses this, checks the base model's fingerprint afterwards."""
    written = {e.param for e in artifact.manifest.payloads if e.param}
    shared = {id(p): p for name, p in model.named_parameters() if name not in written}
    return copy.deepcopy(model, shared)


class temporarily_added:
    """Context manager: add ``u vᵀ`` deltas to parameters, restore exact bytes on exit.

    MEMIT needs the model *with* its earlier layers' updates to compute the
    keys and residuals of later layers. Rather than copying the model, the
    deltas are added in place (as :func:`apply` adds a ``LowRank`` payload) and
    the original tensors are copied back on exit (bit-for-bit), so the caller's
    model is unchanged afterwards; the compile loop checks this with the model
    fingerprint.
    """

    def __init__(self, model: Any, layout: str) -> None:
        self.params = dict(model.named_parameters())
        self.layout = layout
        self.saved: dict[str, torch.Tensor] = {}

    def add(self, name: str, u: torch.Tensor, v: torch.Tensor) -> None:
        w = self.params[name]
        if name not in self.saved:
            self.saved[name] = w.detach().clone()
        with torch.no_grad():
            w.add_(low_rank_delta(LowRank(name, u, v), self.layout, w.dtype, w.device))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        with torch.no_grad():
            for name, original in self.saved.items():
                self.params[name].copy_(original)
        self.saved.clear()
