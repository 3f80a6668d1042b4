"""Artifacts: what an edit *is*, every on-disk format, and the only code that writes weights.

Contents (modules):
    payloads   LowRank, Dense, MemoryTable: the three things a backend returns
    format     Manifest, Artifact, build / save / load / select, and the checks
               (sealed manifest, against the plan, against the base model)
    apply      apply() / Applied.revert() and temporarily_added: every parameter write;
               copy_for(): a model copy that shares what an artifact does not write
    memory     the runtime of external memories (codebook and retrieval hooks)
    scope      the retrieval memory's sentence encoder and scope classifier
    audit      prove an edited model differs from its base only as declared
    edited     edited Hugging Face folders (kmec apply / kmec revert / load_edited)
    build      the build directory compile writes and verify reads

This package imports no backend: backends import their payload types and the
apply helpers from here, and the pipeline and the verifier read what it
writes. ``from kmec.artifacts import apply, load_artifact, ...`` gives the
common names.
"""

from __future__ import annotations

from kmec.artifacts.apply import Applied, apply, copy_for, low_rank_delta, temporarily_added
from kmec.artifacts.audit import AuditResult, audit
from kmec.artifacts.format import (
    FORMAT,
    MANIFEST,
    TENSORS,
    Artifact,
    Manifest,
    PayloadEntry,
    build_artifact,
    check_against_plan,
    check_base,
    check_format,
    load_artifact,
    save_artifact,
    select,
)
from kmec.artifacts.payloads import Dense, LowRank, MemoryTable, Payload

__all__ = [
    "FORMAT", "MANIFEST", "TENSORS", "Applied", "Artifact", "AuditResult", "Dense", "LowRank",
    "Manifest", "MemoryTable", "Payload", "PayloadEntry", "apply", "audit", "build_artifact",
    "check_against_plan", "check_base", "check_format", "copy_for", "load_artifact",
    "low_rank_delta",
    "save_artifact", "select", "temporarily_added",
]
