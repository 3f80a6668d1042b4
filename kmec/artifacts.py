"""Artifacts: what an edit *is*, and the only code that writes weights.

Contents:
    PayloadEntry    manifest row for one payload (kind, parameter, shapes, hashes)
    Manifest        base model fingerprint, plan hash, payload rows, kmec version
    Artifact        manifest + payload tensors
    build_artifact()  payloads + provenance -> Artifact (hashes computed here)
    save_artifact() / load_artifact()   safetensors + JSON, atomic, no pickle
    apply()         add the payloads to a model in place -> Applied (revertible)
    Applied         handle with ``revert()`` (restores exact original bytes)
    audit()         prove an edited model differs from its base only as declared
    AuditResult

On disk an artifact is a folder::

    manifest.json         canonical JSON (Manifest)
    payloads.safetensors  tensors named ``<payload-id>.u`` / ``.v`` / ``.delta`` / ...

A ``LowRank`` payload adds ``scale · u vᵀ`` to a parameter in the math layout
``[out, in]``; the ``weight_layout`` recorded in the manifest (from the
ArchAdapter) says whether the stored weight is ``[out, in]`` (``nn.Linear``)
or ``[in, out]`` (GPT-2's ``Conv1D``), so no shapes are sniffed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kmec import __version__
from kmec.backends.base import Dense, LowRank, MemoryTable, Payload
from kmec.errors import ArtifactError
from kmec.hashing import atomic_dir, canonical_json, sha256_tensor

FORMAT = "kmec-artifact/1"
MANIFEST = "manifest.json"
TENSORS = "payloads.safetensors"


class PayloadEntry(BaseModel):
    """One payload as recorded in the manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    kind: Literal["low_rank", "dense", "memory"]
    step: str
    param: str | None = None
    site: str | None = None
    layer: int | None = None
    shape: tuple[int, ...] = ()
    rank: int | None = None
    scale: float = 1.0
    tensors: dict[str, str]  # tensor name -> sha256
    meta: dict[str, Any] = {}


class Manifest(BaseModel):
    """Provenance and contents of an artifact."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = FORMAT
    kmec_version: str
    base_model: str
    base_fingerprint: str
    base_arch: str
    weight_layout: Literal["out_in", "in_out"]
    plan_hash: str
    payloads: tuple[PayloadEntry, ...]

    @property
    def params(self) -> tuple[str, ...]:
        """Names of the parameters this artifact changes (sorted, unique)."""
        return tuple(sorted({p.param for p in self.payloads if p.param}))


@dataclass
class Artifact:
    """A manifest and its payload tensors (``tensors`` keyed as in the manifest)."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]

    def payloads(self) -> list[Payload]:
        """Rebuild the typed payloads from the tensors."""
        out: list[Payload] = []
        for e in self.manifest.payloads:
            t = self.tensors
            if e.kind == "low_rank":
                out.append(LowRank(e.param or "", t[f"{e.id}.u"], t[f"{e.id}.v"], e.scale))
            elif e.kind == "dense":
                out.append(Dense(e.param or "", t[f"{e.id}.delta"]))
            else:
                out.append(MemoryTable(e.site or "", e.layer or 0, t[f"{e.id}.keys"],
                                       t[f"{e.id}.values"], t[f"{e.id}.radius"], dict(e.meta)))
        return out


def build_artifact(
    steps: Sequence[tuple[str, Sequence[Payload]]],
    *,
    base_model: str,
    base_fingerprint: str,
    base_arch: str,
    weight_layout: Literal["out_in", "in_out"],
    plan_hash: str,
) -> Artifact:
    """Assemble an artifact from each step's payloads (hashes computed here)."""
    entries: list[PayloadEntry] = []
    tensors: dict[str, torch.Tensor] = {}
    n = 0
    for step_id, payloads in steps:
        for p in payloads:
            pid = f"p{n:04d}"
            n += 1
            named = _payload_tensors(pid, p)
            tensors.update(named)
            hashes = {k: sha256_tensor(v) for k, v in named.items()}
            if isinstance(p, LowRank):
                e = PayloadEntry(id=pid, kind="low_rank", step=step_id, param=p.param,
                                 shape=(p.u.shape[0], p.v.shape[0]), rank=p.u.shape[1],
                                 scale=p.scale, tensors=hashes)
            elif isinstance(p, Dense):
                e = PayloadEntry(id=pid, kind="dense", step=step_id, param=p.param,
                                 shape=tuple(p.delta.shape), tensors=hashes)
            else:
                e = PayloadEntry(id=pid, kind="memory", step=step_id, site=p.site, layer=p.layer,
                                 shape=tuple(p.keys.shape), tensors=hashes, meta=p.meta)
            entries.append(e)
    manifest = Manifest(kmec_version=__version__, base_model=base_model,
                        base_fingerprint=base_fingerprint, base_arch=base_arch,
                        weight_layout=weight_layout, plan_hash=plan_hash, payloads=tuple(entries))
    return Artifact(manifest, tensors)


def _payload_tensors(pid: str, p: Payload) -> dict[str, torch.Tensor]:
    if isinstance(p, LowRank):
        return {f"{pid}.u": _cpu(p.u), f"{pid}.v": _cpu(p.v)}
    if isinstance(p, Dense):
        return {f"{pid}.delta": _cpu(p.delta)}
    return {f"{pid}.keys": _cpu(p.keys), f"{pid}.values": _cpu(p.values),
            f"{pid}.radius": _cpu(p.radius)}


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def save_artifact(artifact: Artifact, path: str | Path) -> Path:
    """Write the artifact folder atomically; return its path."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(artifact.tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(canonical_json(artifact.manifest.model_dump(mode="json")))
    return path


def load_artifact(path: str | Path) -> Artifact:
    """Load an artifact folder and check every tensor against its recorded sha256.

    Raises:
        ArtifactError: the folder, manifest or tensors are missing, unreadable,
            or do not match their hashes.
    """
    path = Path(path)
    if (path / "artifact" / MANIFEST).exists():
        path = path / "artifact"  # a build directory
    mpath = path / MANIFEST
    if not mpath.exists():
        raise ArtifactError(f"{path} is not a kmec artifact (no {MANIFEST})",
                            hint="pass the artifact folder or the build directory kmec compile wrote")
    try:
        manifest = Manifest.model_validate(json.loads(mpath.read_text()))
    except (json.JSONDecodeError, ValidationError) as e:
        raise ArtifactError(f"{mpath} is not a valid manifest: {str(e).splitlines()[0]}") from None
    if manifest.format != FORMAT:
        raise ArtifactError(f"{path} has format {manifest.format!r}; this kmec reads {FORMAT!r}")
    try:
        tensors = load_file(str(path / TENSORS)) if manifest.payloads else {}
    except (OSError, SafetensorError) as e:
        raise ArtifactError(f"cannot read {path / TENSORS}: {e}",
                            hint="the artifact is incomplete or corrupt; recompile it") from None
    for entry in manifest.payloads:
        for name, digest in entry.tensors.items():
            if name not in tensors:
                raise ArtifactError(f"artifact {path} lacks tensor {name}")
            if sha256_tensor(tensors[name]) != digest:
                raise ArtifactError(f"tensor {name} in {path} does not match its recorded sha256",
                                    hint="the artifact was modified after compilation; recompile it")
    return Artifact(manifest, tensors)


# ---------------------------------------------------------------- apply / revert


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


def apply(artifact: Artifact, model: Any, *, fingerprint: str | None = None,
          check: bool = True) -> Applied:
    """Add the artifact's payloads to ``model`` in place.

    Args:
        artifact: the artifact.
        model: a model whose weights equal the artifact's base model.
        fingerprint: the model's fingerprint if already known (else computed).
        check: refuse a model whose fingerprint differs from the base's.

    Raises:
        ArtifactError: fingerprint mismatch, unknown parameter, shape mismatch.
    """
    if check:
        if fingerprint is None:
            from kmec.models.load import fingerprint_model

            fingerprint = fingerprint_model(model)
        if fingerprint != artifact.manifest.base_fingerprint:
            raise ArtifactError(
                f"this artifact was compiled for base model {artifact.manifest.base_model!r} "
                f"(fingerprint {artifact.manifest.base_fingerprint[:12]}), but the model given "
                f"has fingerprint {fingerprint[:12]}",
                hint="apply it to the model it was compiled for, or recompile the spec for this model",
            )
    params = dict(model.named_parameters())
    applied = Applied(model, artifact)
    layout = artifact.manifest.weight_layout
    try:
        with torch.no_grad():
            for p in artifact.payloads():
                if isinstance(p, MemoryTable):
                    from kmec.backends.memory_hook import install_memory  # type: ignore[import-not-found]

                    applied.hooks.append(install_memory(model, p))
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
    except BaseException:
        applied.revert()
        raise
    return applied


# ---------------------------------------------------------------- audit


@dataclass(frozen=True)
class AuditResult:
    """Outcome of :func:`audit`."""

    ok: bool
    undeclared: tuple[str, ...]  # parameters that moved but the artifact does not declare
    mismatched: tuple[str, ...]  # declared parameters whose change differs from the delta
    checked: int
    max_error: float

    def summary(self) -> str:
        if self.ok:
            return f"audit passed: {self.checked} parameters checked, max delta error {self.max_error:.2e}"
        parts = []
        if self.undeclared:
            parts.append("undeclared parameters moved: " + ", ".join(self.undeclared))
        if self.mismatched:
            parts.append("declared deltas do not match: " + ", ".join(self.mismatched))
        return "audit failed: " + "; ".join(parts)


def audit(base: Any, edited: Any, artifact: Artifact, *, rtol: float = 1e-4) -> AuditResult:
    """Check that ``edited`` differs from ``base`` exactly by the artifact's deltas.

    Every parameter not named in the manifest must be bit-identical; every
    declared parameter must satisfy ``‖(edited − base) − Δ‖ ≤ rtol·‖Δ‖ + 4·eps·‖W‖``
    (Δ being the sum of the artifact's payloads on it).
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
    undeclared, mismatched, max_err, n = [], [], 0.0, 0
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
        diff = w_edit.detach().float().cpu() - w_base.detach().float().cpu()
        err = (diff - declared[name]).norm().item()
        # rounding of W + Δ in the parameter's dtype is at most ~eps·|W| per element
        eps = torch.finfo(w_edit.dtype).eps
        bound = rtol * declared[name].norm().item() + 4 * eps * w_base.float().norm().item()
        max_err = max(max_err, err)
        if err > bound:
            mismatched.append(name)
    return AuditResult(not undeclared and not mismatched, tuple(undeclared), tuple(mismatched),
                       n, max_err)
