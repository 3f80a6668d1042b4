"""Where trained MEND editors live: ``$KMEC_HOME/editors/<model fingerprint>/``.

Contents:
    EditorManifest   what an editor is for and how it was trained (JSON)
    Editor           a manifest and its loaded network
    editors_root()   ``$KMEC_HOME/editors``
    editor_dir()     the folder of one model's editor
    tensor_hash()    content hash of a network's tensors (the editor's identity)
    save_editor()    network + manifest -> folder, atomically
    find_editor()    the manifest for a model fingerprint, or None (no tensors read)
    planner_editors()  ``(fingerprint,)`` when that model has an editor, else ``()``
    load_editor()    the editor for a fingerprint, hash-checked, or None
    list_editors()   every stored editor's manifest

One editor per model: training again replaces it (the folder is swapped in
whole, so readers see the old editor or the new one). A folder holds::

    manifest.json        EditorManifest (canonical JSON)
    editor.safetensors   the network's parameters and running statistics

The manifest's ``sha256`` hashes the tensors and the network's config; plans
record it in the MEND step's params, so retraining an editor changes the plan
and invalidates cached compile steps. Checkpoints of unfinished training runs
live under ``editors/.checkpoints/`` (see :mod:`kmec.backends.mend.train`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kmec.backends.mend.model import EditorConfig, EditorNet
from kmec.errors import BackendError
from kmec.hashing import atomic_dir, canonical_json, sha256_tensor, sha256_text
from kmec.models.load import kmec_home

FORMAT = "kmec-mend-editor/1"
MANIFEST = "manifest.json"
TENSORS = "editor.safetensors"


class EditorManifest(BaseModel):
    """Provenance of a trained editor.

    Attributes:
        model, fingerprint, model_type: the base model it edits.
        layers: the edited layers; ``params`` the edited parameter names.
        d_in, d_out: the edited projection's input and output widths.
        config: the network's shape.
        training: the training configuration (``TrainConfig`` as JSON).
        metrics: loss curve, time, data file and hash, record counts, held-out scores.
        sha256: content hash of the tensors and config.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = FORMAT
    kmec_version: str
    model: str
    fingerprint: str
    model_type: str
    layers: tuple[int, ...]
    params: tuple[str, ...]
    d_in: int
    d_out: int
    config: EditorConfig
    training: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    sha256: str = ""


@dataclass
class Editor:
    """A stored editor: its manifest and the network (in eval mode)."""

    manifest: EditorManifest
    net: EditorNet


def editors_root() -> Path:
    """``$KMEC_HOME/editors``."""
    return kmec_home() / "editors"


def editor_dir(fingerprint: str) -> Path:
    """The folder holding the editor of the model with ``fingerprint``."""
    return editors_root() / fingerprint


def tensor_hash(net: EditorNet) -> str:
    """sha256 over the network's config and its tensors (names, shapes, bytes)."""
    tensors = {k: sha256_tensor(v) for k, v in sorted(net.state_dict().items())}
    return sha256_text(canonical_json({"config": net.config.model_dump(mode="json"),
                                       "tensors": tensors}))


def save_editor(net: EditorNet, manifest: EditorManifest) -> EditorManifest:
    """Write ``net`` and ``manifest`` (with its hash filled in) atomically; return the manifest."""
    manifest = manifest.model_copy(update={"sha256": tensor_hash(net)})
    state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    with atomic_dir(editor_dir(manifest.fingerprint)) as tmp:
        save_file(state, str(tmp / TENSORS))
        (tmp / MANIFEST).write_text(canonical_json(manifest.model_dump(mode="json")) + "\n")
    return manifest


def _read_manifest(folder: Path) -> EditorManifest | None:
    try:
        return EditorManifest.model_validate(json.loads((folder / MANIFEST).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, ValidationError) as e:
        raise BackendError(f"the MEND editor at {folder} has an unreadable manifest ({e})",
                           step_id="mend", hint="retrain it with kmec train-editor") from None


def find_editor(fingerprint: str) -> EditorManifest | None:
    """The manifest of the editor for ``fingerprint``, or None when there is none."""
    if not fingerprint:
        return None
    return _read_manifest(editor_dir(fingerprint))


def planner_editors(fingerprint: str) -> tuple[str, ...]:
    """The ``editors`` argument of :func:`kmec.planner.plan` for one model.

    ``(fingerprint,)`` when ``$KMEC_HOME/editors`` holds an editor for it (the
    planner may then choose ``mend``), else ``()``.
    """
    return (fingerprint,) if find_editor(fingerprint) else ()


def load_editor(fingerprint: str) -> Editor | None:
    """The editor for ``fingerprint`` (None if none), its tensors checked against the hash.

    Raises:
        BackendError: the files are damaged or do not match the manifest's hash.
    """
    manifest = find_editor(fingerprint)
    if manifest is None:
        return None
    folder = editor_dir(fingerprint)
    net = EditorNet(manifest.d_in, manifest.d_out, len(manifest.layers), manifest.config)
    try:
        net.load_state_dict(load_file(str(folder / TENSORS)))
    except (OSError, SafetensorError, RuntimeError) as e:
        raise BackendError(f"cannot load the MEND editor at {folder}: {e}", step_id="mend",
                           hint="retrain it with kmec train-editor") from None
    if tensor_hash(net) != manifest.sha256:
        raise BackendError(f"the MEND editor at {folder} does not match its manifest's hash",
                           step_id="mend", hint="retrain it with kmec train-editor")
    net.eval()
    net.requires_grad_(False)
    return Editor(manifest=manifest, net=net)


def list_editors() -> list[EditorManifest]:
    """Manifests of every stored editor (unreadable folders are skipped)."""
    root = editors_root()
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(root.iterdir()):
        if folder.name.startswith("."):
            continue
        try:
            m = _read_manifest(folder)
        except BackendError:
            continue
        if m is not None:
            out.append(m)
    return out
