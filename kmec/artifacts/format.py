"""The artifact format: manifest, payload tensors, save / load, and the checks on both.

Contents:
    FORMAT / MANIFEST / TENSORS   format name and file names of an artifact folder
    PayloadEntry    manifest row for one payload (kind, parameter, shapes, hashes)
    Manifest        base model fingerprint, plan hash, payload rows, per-field digests, sha256
    Artifact        manifest + payload tensors
    build_artifact()  payloads + provenance -> Artifact (hashes computed, manifest sealed)
    save_artifact() / load_artifact()   safetensors + JSON, atomic, no pickle, every hash checked
    select()        the artifact cut down to some steps and/or payload kinds
    check_format()  refuse JSON written in another kmec format
    check_against_plan()  refuse payloads the plan does not declare (steps, parameters)
    check_base()    refuse a model whose fingerprint is not the artifact's base

On disk an artifact is a folder::

    manifest.json         canonical JSON (Manifest)
    payloads.safetensors  tensors named ``<payload-id>.u`` / ``.v`` / ``.delta`` / ...

Nothing here unpickles: tensors are read with safetensors and everything else
is JSON, so a downloaded artifact cannot run code.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kmec._version import __version__
from kmec.artifacts.payloads import Dense, LowRank, MemoryTable, Payload
from kmec.errors import ArtifactError
from kmec.hashing import atomic_dir, canonical_json, sha256_tensor, sha256_text
from kmec.planner.model import Plan

_Record = TypeVar("_Record", bound=BaseModel)
FORMAT = "kmec-artifact/2"  # /2: the manifest carries its own sha256
MANIFEST = "manifest.json"
TENSORS = "payloads.safetensors"


_PARTS = {"low_rank": ("u", "v"), "dense": ("delta",), "memory": ("keys", "values", "radius")}


class PayloadEntry(BaseModel):
    """One payload as recorded in the manifest.

    The id is ``p`` and four or more digits, and ``tensors`` names exactly the
    tensors of the payload's kind (``<id>.u`` and ``<id>.v`` for a low-rank
    update, ``<id>.delta`` for a dense one, ``<id>.keys``/``.values``/
    ``.radius`` for a memory): a manifest cannot point a payload at another
    payload's tensors or at a path.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^p[0-9]{4,9}$")
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

    @model_validator(mode="after")
    def _tensor_names(self) -> PayloadEntry:
        expected = {f"{self.id}.{part}" for part in _PARTS[self.kind]}
        if set(self.tensors) != expected:
            raise ValueError(f"payload {self.id} ({self.kind}) must name the tensors "
                             f"{sorted(expected)}, not {sorted(self.tensors)}")
        if self.kind == "memory" and self.site is None or \
                self.kind != "memory" and self.param is None:
            raise ValueError(f"payload {self.id} ({self.kind}) lacks its "
                             f"{'site' if self.kind == 'memory' else 'param'}")
        if not all(isinstance(d, str) and len(d) == 64 for d in self.tensors.values()):
            raise ValueError(f"payload {self.id} has a tensor hash that is not a sha256")
        return self


class Manifest(BaseModel):
    """Provenance and contents of an artifact.

    ``sha256`` is the hash of every other field (:meth:`content_hash`): payload
    ids, parameters, sites, layers, shapes, ranks, scales, tensor hashes (which
    cover each tensor's dtype, shape and bytes), the weight layout, the base
    fingerprint and the plan hash. :func:`load_artifact` refuses a manifest
    whose fields no longer match it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = FORMAT
    kmec_version: str
    base_model: str
    base_fingerprint: str
    base_arch: str
    weight_layout: Literal["out_in", "in_out"]
    plan_hash: str
    payloads: tuple[PayloadEntry, ...]
    fields: dict[str, str] = {}  # field path -> short digest of its value (names what changed)
    sha256: str = ""

    @property
    def params(self) -> tuple[str, ...]:
        """Names of the parameters this artifact changes (sorted, unique)."""
        return tuple(sorted({p.param for p in self.payloads if p.param}))

    def content_hash(self) -> str:
        """sha256 of the canonical JSON of every field but ``sha256`` and ``fields``."""
        return sha256_text(_json(self.model_dump(mode="json", exclude={"sha256", "fields"})))

    def sealed(self) -> Manifest:
        """This manifest with ``sha256`` (and the per-field digests) set from its content."""
        return self.model_copy(update={"sha256": self.content_hash(),
                                       "fields": _field_digests(self)})


def _json(value: Any) -> str:
    """Canonical JSON that also takes NaN (a diverged scale must still hash, to be refused
    by :func:`apply` with its name rather than crash here)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=True)


def _field_digests(manifest: Manifest) -> dict[str, str]:
    """``{"payloads[0].scale": digest, ...}``: a short digest of every leaf field's value."""
    out: dict[str, str] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict) and value and path.count(".") < 2:
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, list) and value and path == "payloads":
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        else:
            out[path] = sha256_text(_json(value))[:16]

    walk(manifest.model_dump(mode="json", exclude={"sha256", "fields"}), "")
    return out


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
                        weight_layout=weight_layout, plan_hash=plan_hash,
                        payloads=tuple(entries)).sealed()
    return Artifact(manifest, tensors)


def _payload_tensors(pid: str, p: Payload) -> dict[str, torch.Tensor]:
    if isinstance(p, LowRank):
        return {f"{pid}.u": _cpu(p.u), f"{pid}.v": _cpu(p.v)}
    if isinstance(p, Dense):
        return {f"{pid}.delta": _cpu(p.delta)}
    return {f"{pid}.keys": _cpu(p.keys), f"{pid}.values": _cpu(p.values),
            f"{pid}.radius": _cpu(p.radius)}


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """On the CPU, and floating tensors in float32: an artifact stores its payloads in one
    dtype whatever device and dtype computed them (apply casts to the weights' dtype)."""
    t = t.detach().to("cpu")
    if t.is_floating_point() and t.dtype != torch.float32:
        t = t.float()
    return t.contiguous()


def save_artifact(artifact: Artifact, path: str | Path) -> Path:
    """Write the artifact folder atomically; return its path."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(artifact.tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(canonical_json(artifact.manifest.model_dump(mode="json")))
    return path


def load_artifact(path: str | Path) -> Artifact:
    """Load an artifact folder and check every tensor against its recorded sha256.

    Args:
        path: the artifact folder, or a build directory holding ``artifact/``.

    Raises:
        ArtifactError: the folder, manifest or tensors are missing, unreadable,
            written in another artifact format, or do not match their hashes.
    """
    path = Path(path)
    if (path / "artifact" / MANIFEST).exists():
        path = path / "artifact"  # a build directory
    if not path.exists():
        raise ArtifactError(f"{path} does not exist",
                            hint="pass the build directory kmec compile wrote, or its artifact/ folder")
    mpath = path / MANIFEST
    if not mpath.exists():
        raise ArtifactError(f"{path} is not a kmec artifact (no {MANIFEST})",
                            hint="pass the artifact folder or the build directory kmec compile wrote")
    manifest = read_json_record(mpath, FORMAT, Manifest, "manifest",
                                "the artifact is corrupt; recompile it")
    _check_sealed(manifest, mpath)
    tensors = _read_tensors(path / TENSORS) if manifest.payloads else {}
    named = {n for e in manifest.payloads for n in e.tensors}
    if set(tensors) - named:
        extra = sorted(set(tensors) - named)[:3]
        raise ArtifactError(f"{path / TENSORS} holds tensors the manifest does not list: {extra}",
                            hint="the artifact was modified after compilation; recompile it")
    for entry in manifest.payloads:
        for name, digest in entry.tensors.items():
            if name not in tensors:
                raise ArtifactError(f"artifact {path} lacks tensor {name}",
                                    hint="the artifact is incomplete; recompile it")
            if sha256_tensor(tensors[name]) != digest:
                raise ArtifactError(f"tensor {name} in {path} does not match its recorded sha256",
                                    hint="the artifact was modified after compilation; recompile it")
        _check_shapes(entry, tensors, path)
    return Artifact(manifest, tensors)


def _check_sealed(manifest: Manifest, where: Path) -> None:
    """Refuse a manifest whose fields were changed after it was sealed; name the fields."""
    now = _field_digests(manifest)
    if manifest.sha256 == manifest.content_hash() and manifest.fields == now:
        return
    changed = sorted(k for k in now.keys() | manifest.fields.keys()
                     if now.get(k) != manifest.fields.get(k))
    if manifest.sha256 == manifest.content_hash():
        what = "its per-field digests ('fields') were changed"
    elif changed:
        what = f"field(s) {', '.join(changed[:5])}{' …' if len(changed) > 5 else ''} changed"
    else:
        what = "its sha256 does not match its fields"
    raise ArtifactError(f"{where} was modified after kmec wrote it: {what}",
                        hint="recompile the spec; an artifact is never edited by hand")


def _check_shapes(entry: PayloadEntry, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """The shape and rank the manifest records are those of the tensors."""
    t = {part: tensors[f"{entry.id}.{part}"] for part in _PARTS[entry.kind]}
    if entry.kind == "low_rank":
        u, v = t["u"], t["v"]
        ok = (u.ndim == 2 and v.ndim == 2 and u.shape[1] == v.shape[1]
              and entry.shape == (u.shape[0], v.shape[0]) and entry.rank == u.shape[1])
    elif entry.kind == "dense":
        ok = entry.shape == tuple(t["delta"].shape)
    else:
        ok = entry.shape == tuple(t["keys"].shape)
    if not ok:
        raise ArtifactError(f"payload {entry.id} in {where} records shape {entry.shape} "
                            f"(rank {entry.rank}), which its tensors do not have",
                            hint="the artifact was modified after compilation; recompile it")


def read_json_record(path: Path, fmt: str, model: type[_Record], what: str, hint: str) -> _Record:
    """Read a kmec JSON record (a manifest, an edit record): valid JSON, written in
    format ``fmt``, and valid as ``model``.

    Raises:
        ArtifactError: unreadable, not JSON, another format, or invalid; ``hint`` says
            what to do.
    """
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}", hint=hint) from None
    check_format(raw, fmt, path)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ArtifactError(f"{path} is not a valid {what}: {_first_error(e)}",
                            hint=hint) from None


def check_format(raw: Any, expected: str, where: Path) -> None:
    """Refuse JSON written in another kmec format (checked before validating its fields).

    Raises:
        ArtifactError: ``raw`` is not an object or its ``format`` is not ``expected``.
    """
    if not isinstance(raw, dict):
        raise ArtifactError(f"{where} is not a {expected.split('/')[0]} record (not a JSON object)")
    found = raw.get("format")
    if found == expected:
        return
    if isinstance(found, str) and found.split("/")[0] == expected.split("/")[0]:
        writer = raw.get("kmec_version", "another version")
        raise ArtifactError(
            f"{where} was written in format {found!r} (by kmec {writer}); this kmec "
            f"({__version__}) reads {expected!r}",
            hint=f"use kmec {writer} to read it, or recompile the spec with this kmec")
    raise ArtifactError(f"{where} has format {found!r}; this kmec reads {expected!r}",
                        hint="it was not written by kmec, or is corrupt")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never pickle) whose metadata names this format."""
    try:
        with safe_open(str(file), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except (OSError, SafetensorError) as e:
        raise ArtifactError(f"cannot read {file}: {e}",
                            hint="the artifact is incomplete or corrupt; recompile it") from None
    if fmt != FORMAT:
        raise ArtifactError(f"{file} has tensor format {fmt!r}; this kmec reads {FORMAT!r}",
                            hint="the artifact was assembled from mixed versions; recompile it")
    return tensors


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err.get("loc", ())) or "<root>"
    return f"{where}: {err.get('msg', 'invalid')}"


def check_against_plan(manifest: Manifest, plan: Plan, *, where: str = "the artifact") -> None:
    """Refuse an artifact that is not what ``plan`` declares.

    The manifest must name the plan's hash and base model, every payload must
    belong to one of the plan's steps, and a weight payload may change only a
    parameter its step lists in ``writes`` (a memory payload only a layer of
    its step).

    Raises:
        ArtifactError: the first mismatch, naming the payload and the field.
    """
    hint = "recompile the spec; an artifact is never edited by hand"
    if manifest.plan_hash != plan.sha256:
        raise ArtifactError(f"{where} records plan {manifest.plan_hash[:12]}, but plan.json is "
                            f"{plan.sha256[:12]} (field 'plan_hash')", hint=hint)
    if manifest.base_fingerprint != plan.model_fingerprint:
        raise ArtifactError(f"{where} records base fingerprint {manifest.base_fingerprint[:12]}, "
                            f"but plan.json was planned for {plan.model_fingerprint[:12]} "
                            "(field 'base_fingerprint')", hint=hint)
    steps = {s.id: s for s in plan.steps}
    for e in manifest.payloads:
        step = steps.get(e.step)
        if step is None:
            raise ArtifactError(f"payload {e.id} of {where} belongs to step {e.step!r}, which "
                                "plan.json does not have (field 'step')", hint=hint)
        if e.kind == "memory":
            if e.layer not in (*step.layers, -1) or step.writes:
                raise ArtifactError(f"payload {e.id} of {where} is a memory at layer {e.layer}, "
                                    f"which step {step.id} ({step.backend}) does not declare "
                                    "(field 'layer')", hint=hint)
        elif e.param not in step.writes:
            allowed = ", ".join(step.writes) or "no parameter"
            raise ArtifactError(f"payload {e.id} of {where} changes {e.param}, but step "
                                f"{step.id} ({step.backend}) may change only {allowed} "
                                "(field 'param')", hint=hint)


def check_base(manifest: Manifest, fingerprint: str, *, model: str | None = None) -> None:
    """Refuse a model that is not the base the artifact was compiled for.

    Args:
        manifest: the artifact's manifest.
        fingerprint: :func:`kmec.models.load.fingerprint_model` of the model.
        model: how the user named the model (for the message), if known.

    Raises:
        ArtifactError: the fingerprints differ; the message names both prefixes.
    """
    if fingerprint == manifest.base_fingerprint:
        return
    given = f"the model {model!r}" if model else "the model given"
    raise ArtifactError(
        f"this artifact was compiled for base model {manifest.base_model!r} "
        f"(fingerprint {manifest.base_fingerprint[:12]}), but {given} has fingerprint "
        f"{fingerprint[:12]}",
        hint="apply it to the model it was compiled for (--model), or recompile the spec for "
        "this model (kmec compile SPEC --model ...)",
    )


def select(artifact: Artifact, *, steps: Collection[str] | None = None,
           kinds: Collection[str] | None = None) -> Artifact:
    """The artifact cut down to the payloads of ``steps`` and of ``kinds`` (None: all).

    The manifest keeps its provenance and is sealed again for the subset.

    >>> empty = build_artifact([], base_model="m", base_fingerprint="f", base_arch="a",
    ...                        weight_layout="out_in", plan_hash="p")
    >>> select(empty, kinds=("memory",)).manifest.payloads
    ()
    """
    entries = tuple(e for e in artifact.manifest.payloads
                    if (steps is None or e.step in steps) and (kinds is None or e.kind in kinds))
    names = {n for e in entries for n in e.tensors}
    manifest = artifact.manifest.model_copy(update={"payloads": entries}).sealed()
    return Artifact(manifest, {k: v for k, v in artifact.tensors.items() if k in names})
