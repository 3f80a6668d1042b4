"""Edited model folders: an artifact applied and saved, and reverted exactly.

Contents:
    EDIT_RECORD / BASE_PARAMS / MEMORY_DIR   what kmec adds to an edited model folder
    EditedRecord       what ``kmec_edit.json`` holds (manifest, both fingerprints, hashes)
    load_weights()   a causal LM's weights (float32, CPU) without its tokenizer
    write_edited()   artifact + base model -> edited Hugging Face folder (atomic)
    split_memory()   an artifact's weight payloads and its memory payloads, apart
    read_record() / read_base_params()   read and hash-check an edited folder's kmec files
    EditedModel      a LoadedModel plus the handle of the memory installed on it
    load_edited()    edited folder -> model with its external memory installed (one call)
    revert_folder()  edited folder -> the base model, bit-for-bit (atomic)

An edited folder is an ordinary Hugging Face model folder (``config.json``,
``model.safetensors``, tokenizer files) plus::

    kmec_edit.json                 canonical JSON (EditedRecord)
    kmec_base_params.safetensors   the exact original tensors of the edited parameters

Only the parameters the artifact changes are stored, so the second file is
small (one MLP matrix per edited layer). Reverting copies them back and checks
that the result has the base model's fingerprint.

External memories (``memory`` / ``retrieval`` payloads) are hooks, not
weights: the folder keeps them as an artifact of their own next to the
weights, which they leave as they were (a memory-only folder holds the base
weights unchanged)::

    kmec_memory/manifest.json, kmec_memory/payloads.safetensors

:func:`load_edited` (also reached by ``kmec.load_model(folder)``) loads the
weights and installs the memory, checking its tensors against the hashes in
``kmec_edit.json``; ``kmec revert`` writes the weights without the memory.

Tokenizers: applying an artifact needs no tokenizer, so none is loaded. The
tokenizer files of a base model folder (or installed alias) are copied as they
are; for a hub id the tokenizer is loaded and saved by transformers. A base
folder without tokenizer files (e.g. a tiny test model) gives an edited folder
without them, and the record says so (``tokenizer: "none"``).

Weights are loaded in float32, as ``kmec compile`` loads them, so the base
fingerprint computed here is the one the artifact records.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kmec._version import __version__
from kmec.artifacts.apply import Applied, apply
from kmec.artifacts.format import (
    Artifact,
    Manifest,
    check_base,
    load_artifact,
    read_json_record,
    save_artifact,
    select,
)
from kmec.errors import ArtifactError, ModelError
from kmec.hashing import atomic_dir, canonical_json, sha256_tensor
from kmec.models.load import (
    LoadedModel,
    ModelRef,
    Runtime,
    fingerprint_model,
    load_model,
    native_bf16,
    require_safetensors,
    resolve_device,
    resolve_dtype,
    resolve_ref,
)
from kmec.outputs import check_output, write_marker

log = logging.getLogger("kmec")

EDITED_FORMAT = "kmec-edited-model/1"
EDIT_RECORD = "kmec_edit.json"
BASE_PARAMS = "kmec_base_params.safetensors"
MEMORY_DIR = "kmec_memory"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json")


class EditedRecord(BaseModel):
    """Contents of ``kmec_edit.json`` in an edited model folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = EDITED_FORMAT
    kmec_version: str
    base_model: str  # the reference the base weights were loaded from
    base_fingerprint: str
    edited_fingerprint: str
    base_params: dict[str, str]  # parameter name -> sha256 of its original tensor
    tokenizer: Literal["copied", "saved", "none"]
    manifest: Manifest
    # the dtype the folder's weights are stored in (kmec apply --dtype); in another dtype
    # than float32, the fingerprint of the base weights in it (what revert restores)
    dtype: str = "float32"
    base_weights_fingerprint: str | None = None


@dataclass(frozen=True)
class Written:
    """What :func:`write_edited` or :func:`revert_folder` wrote."""

    path: Path
    base_fingerprint: str
    edited_fingerprint: str
    params: tuple[str, ...]
    tokenizer: str


def load_weights(ref: str | ModelRef, *, dtype: str = "float32") -> tuple[Any, Any]:
    """Load a causal LM on CPU (float32 unless ``dtype``); return ``(model, tokenizer or None)``.

    Weights are read from safetensors only; pickle files are never loaded.

    Folders and aliases are loaded without a tokenizer (none is needed to
    apply or revert); hub ids go through :func:`kmec.models.load.load_model`,
    which handles an unreachable hub, and return its tokenizer.

    Raises:
        ModelError: the reference does not resolve or the files do not load.
    """
    dtype = resolve_dtype(dtype)
    if isinstance(ref, str):
        ref = resolve_ref(ref)
    if ref.path is None:
        lm = load_model(ref, dtype=dtype)
        return lm.model, lm.tok
    from transformers import AutoModelForCausalLM

    require_safetensors(ref.path)  # pickle weights are never loaded (they can run code)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(ref.path), dtype=getattr(torch, dtype),
                                                     use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ModelError(f"cannot load the model weights in {ref.path}: {first}") from None
    model.eval()
    model.requires_grad_(False)
    return model, None


def _write_tokenizer(src: Path | None, tok: Any, dest: Path) -> Literal["copied", "saved", "none"]:
    if src is not None:
        files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
        for f in files:
            shutil.copy2(f, dest / f.name)
        return "copied" if files else "none"
    if tok is not None:
        tok.save_pretrained(dest)
        return "saved"
    return "none"


def write_edited(artifact: Artifact, out: str | Path, *, model: str | None = None,
                 inputs: Sequence[str | Path] = (), force: bool = False, dtype: str = "float32",
                 device: str | None = None) -> Written:
    """Apply ``artifact`` to its base model and write the edited model folder.

    Args:
        artifact: the artifact (see :func:`kmec.artifacts.load_artifact`).
        out: the folder to write (replaced atomically; see :mod:`kmec.outputs`
            for what may be replaced).
        model: the base model reference; defaults to the manifest's ``base_model``.
        inputs: where the artifact was read from (``out`` may not be or hold it).
        force: replace ``out`` even if it is not an edited model folder kmec wrote.
        dtype: the dtype the edited folder stores its weights in: the base is loaded
            and checked in float32, cast, and the payloads are added in ``dtype``
            (``kmec revert`` then restores the base in ``dtype``).
        device: where the payloads are added (``cpu``, ``cuda``, ``auto``; the folder is
            written from the CPU either way).

    The recorded ``edited_fingerprint`` is the float32 fingerprint of the edited weights
    (of their exact upcast when ``dtype`` is lower), the one
    :func:`kmec.models.load.load_model` gives the folder in any dtype.

    External-memory payloads are not applied to the weights: they are saved in
    ``kmec_memory/`` and installed by :func:`load_edited`.

    Raises:
        ArtifactError: the model is not the artifact's base, or ``out`` is the
            base model's own folder.
        OutputError: ``out`` may not be written.
        ModelError: the base model cannot be resolved or loaded.
    """
    m = artifact.manifest
    weights_part, memory_part = split_memory(artifact)
    name = model or m.base_model
    try:
        ref = resolve_ref(name)
    except ModelError as e:
        if model is None:
            raise ModelError(f"cannot find the artifact's base model: {e.message}",
                             hint=f"pass --model with the folder or alias of {name!r}") from None
        raise
    out = Path(out)
    if ref.path is not None and out.resolve() == ref.path.resolve():
        raise ArtifactError(f"--out {out} is the base model's own folder",
                            hint="write the edited model to a new folder")
    check_output(out, "edited-model", force=force,
                 inputs=[*inputs, *([ref.path] if ref.path is not None else [])])
    dtype, target = resolve_dtype(dtype), resolve_device(device)
    weights, tok = load_weights(ref)
    base_fp = fingerprint_model(weights)
    check_base(m, base_fp, model=name)
    weights.to(device=target, dtype=getattr(torch, dtype))
    cast_fp = None if dtype == "float32" else fingerprint_model(weights)
    applied = apply(weights_part, weights, fingerprint=base_fp, check=False)
    weights.to("cpu")
    edited_fp = fingerprint_model(weights, as_float32=True)
    originals = {k: v.cpu().contiguous() for k, v in applied.originals.items()}
    with atomic_dir(out) as tmp:
        write_marker(tmp, "edited-model")
        weights.save_pretrained(tmp)
        tokenizer = _write_tokenizer(ref.path, tok, tmp)
        save_file(originals, str(tmp / BASE_PARAMS), metadata={"format": EDITED_FORMAT})
        if memory_part is not None:
            save_artifact(memory_part, tmp / MEMORY_DIR)
        record = EditedRecord(kmec_version=__version__, base_model=name, base_fingerprint=base_fp,
                            edited_fingerprint=edited_fp, tokenizer=tokenizer, manifest=m,
                            base_params={k: sha256_tensor(v) for k, v in originals.items()},
                            dtype=dtype, base_weights_fingerprint=cast_fp)
        (tmp / EDIT_RECORD).write_text(canonical_json(record.model_dump(mode="json")))
    log.info("wrote edited model %s (%d parameter(s) changed, %d memory table(s))", out,
             len(originals), 0 if memory_part is None else len(memory_part.manifest.payloads))
    return Written(out, base_fp, edited_fp, tuple(sorted(originals)), tokenizer)


def split_memory(artifact: Artifact) -> tuple[Artifact, Artifact | None]:
    """``(weight payloads, memory payloads or None)`` of ``artifact`` (see :func:`select`)."""
    memory = select(artifact, kinds=("memory",))
    return select(artifact, kinds=("low_rank", "dense")), (memory if memory.manifest.payloads
                                                           else None)


def read_record(folder: str | Path) -> EditedRecord:
    """Read and validate an edited folder's ``kmec_edit.json`` (JSON only).

    Raises:
        ArtifactError: the folder is missing, not a kmec-edited model, written in
            another format, or its record is corrupt.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder} does not exist or is not a folder",
                            hint="pass the folder kmec apply wrote")
    path = folder / EDIT_RECORD
    if not path.exists():
        raise ArtifactError(f"{folder} is not a kmec-edited model (no {EDIT_RECORD})",
                            hint="kmec revert only undoes folders written by kmec apply")
    record = read_json_record(path, EDITED_FORMAT, EditedRecord, "kmec edit record",
                              "the edited folder is corrupt; re-run kmec apply")
    if set(record.base_params) != set(record.manifest.params):
        raise ArtifactError(f"{path} records originals for {sorted(record.base_params)} but the "
                            f"artifact edits {list(record.manifest.params)}",
                            hint="the edited folder is corrupt; re-run kmec apply")
    return record


def read_base_params(folder: str | Path, record: EditedRecord) -> dict[str, torch.Tensor]:
    """Read ``kmec_base_params.safetensors`` and check each tensor's sha256 (no pickle).

    Raises:
        ArtifactError: the file is missing, unreadable, or a tensor is missing,
            extra, or does not match its recorded hash.
    """
    path = Path(folder) / BASE_PARAMS
    hint = "the original weights cannot be restored from this folder; load the base model instead"
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing", hint=hint) from None
    except (OSError, SafetensorError) as e:
        raise ArtifactError(f"cannot read {path}: {e}", hint=hint) from None
    if set(tensors) != set(record.base_params):
        missing = sorted(set(record.base_params) - set(tensors))
        extra = sorted(set(tensors) - set(record.base_params))
        raise ArtifactError(f"{path} does not hold the recorded parameters (missing {missing}, "
                            f"unexpected {extra})", hint=hint)
    for name, digest in record.base_params.items():
        if sha256_tensor(tensors[name]) != digest:
            raise ArtifactError(f"the original of {name} in {path} does not match its recorded "
                                "sha256 (the file was modified or is corrupt)", hint=hint)
    return tensors


@dataclass
class EditedModel(LoadedModel):
    """A model loaded from an edited folder.

    Attributes:
        record: the folder's ``kmec_edit.json``.
        memory: the handle of the installed external memory (``memory.revert()``
            removes it); None when the folder holds weight edits only.
    """

    record: EditedRecord | None = None
    memory: Applied | None = None


def load_edited(folder: str | Path, *, tok: Any = None, dtype: str = "float32",
                device: str | None = None) -> EditedModel:
    """Load a folder written by :func:`write_edited`, with its external memory installed.

    Args:
        folder: the edited model folder.
        tok: a tokenizer to use instead of the folder's (required when the
            folder has none and holds a retrieval memory).
        dtype, device: as :func:`kmec.models.load.load_model`. The weights (their
            float32 fingerprint, whatever ``dtype``) are checked against the one
            ``kmec apply`` recorded.

    Raises:
        ArtifactError: not a kmec-edited folder, weights changed since ``kmec
            apply``, or a memory that is missing or differs from the record.
        ModelError: the weights or tokenizer do not load, or a retrieval memory
            has no tokenizer.
    """
    folder = Path(folder)
    dtype = resolve_dtype(dtype)
    record = read_record(folder)
    ref = ModelRef(str(folder), "folder", folder.resolve())
    if record.tokenizer == "none":
        from kmec.models.facts import facts_from_config

        model, _ = load_weights(ref)
        fp = fingerprint_model(model)  # of the float32 weights, as load_model's facts have it
        target = resolve_device(device)
        model.to(device=target, dtype=getattr(torch, dtype))
        facts = facts_from_config(model.config, name=str(folder), fingerprint=fp,
                                  n_params=sum(p.numel() for p in model.parameters()), dtype=dtype)
        runtime = Runtime(target, dtype, bf16_units=native_bf16(target))
        lm = LoadedModel(model, tok, facts, ref, runtime=runtime,
                         weights_fingerprint="" if dtype == "float32" else fingerprint_model(model))
    else:
        lm = load_model(ref, dtype=dtype, device=device)
        lm.tok = tok if tok is not None else lm.tok
    if lm.facts.fingerprint != record.edited_fingerprint:
        raise ArtifactError(
            f"the weights in {folder} changed after kmec apply wrote them (fingerprint "
            f"{lm.facts.fingerprint[:12]}, recorded {record.edited_fingerprint[:12]})",
            hint="re-run kmec apply to write the folder again")
    handle = None
    expected = tuple(e for e in record.manifest.payloads if e.kind == "memory")
    if expected:
        if not (folder / MEMORY_DIR / "manifest.json").exists():
            raise ArtifactError(f"{folder} records an external memory but has no {MEMORY_DIR}/",
                                hint="re-run kmec apply to write the folder again")
        memory = load_artifact(folder / MEMORY_DIR)
        if memory.manifest.payloads != expected:
            raise ArtifactError(f"the memory in {folder / MEMORY_DIR} is not the one "
                                f"{EDIT_RECORD} records (payloads or hashes differ)",
                                hint="re-run kmec apply to write the folder again")
        handle = apply(memory, lm.model, check=False, tok=lm.tok)
    return EditedModel(lm.model, lm.tok, lm.facts, lm.ref, record=record, memory=handle)


def revert_folder(edited: str | Path, out: str | Path, *, force: bool = False) -> Written:
    """Restore the base model from an edited folder, bit-for-bit, and write it.

    Args:
        edited: a folder written by :func:`write_edited`.
        out: the folder to write the base model to (replaced atomically; see
            :mod:`kmec.outputs` for what may be replaced).
        force: replace ``out`` even if it is not a folder kmec revert wrote.

    Raises:
        ArtifactError: not a kmec-edited folder, missing or corrupt kmec files,
            weights changed since ``kmec apply``, or a result that is not the
            recorded base model.
    """
    edited = Path(edited)
    check_output(out, "base-model", inputs=[edited], force=force)
    record = read_record(edited)
    originals = read_base_params(edited, record)
    model, _ = load_weights(ModelRef(str(edited), "folder", edited.resolve()),
                            dtype=record.dtype)
    now = fingerprint_model(model, as_float32=True)
    if now != record.edited_fingerprint:
        raise ArtifactError(
            f"the weights in {edited} changed after kmec apply wrote them (fingerprint "
            f"{now[:12]}, recorded {record.edited_fingerprint[:12]}); reverting would not give "
            "the base model", hint=f"load the base model {record.base_model!r} instead")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, original in originals.items():
            w = params.get(name)
            if w is None or w.shape != original.shape or w.dtype != original.dtype:
                raise ArtifactError(f"{edited} has no parameter {name} of shape "
                                    f"{tuple(original.shape)} and dtype {original.dtype}")
            w.copy_(original)
    restored = fingerprint_model(model)
    if restored != (record.base_weights_fingerprint or record.base_fingerprint):
        raise ArtifactError(
            f"the restored model has fingerprint {restored[:12]}, not the recorded base "
            f"{record.base_fingerprint[:12]}", hint=f"load the base model {record.base_model!r}")
    with atomic_dir(out) as tmp:
        write_marker(tmp, "base-model")
        model.save_pretrained(tmp)
        tokenizer = _write_tokenizer(edited, None, tmp)
    log.info("restored base model %s -> %s", record.base_model, out)
    return Written(Path(out), restored, now, tuple(sorted(originals)), tokenizer)
