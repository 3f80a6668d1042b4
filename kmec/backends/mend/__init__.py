"""MEND (Mitchell et al. 2022): a hypernetwork trained by kmec turns an edit's
gradient into a low-rank weight update in one forward/backward pass.

Contents (one concept per module):
    records   EditRecord, read_records(), split_records(): zsRE / CounterFact training records
    model     EditorConfig, EditorNet: the gradient transform g(u, δ) -> (ũ, δ̃) and step α
    edit      gradient factors, per-row low-rank edits as hooks, losses (shared by the two below)
    train     TrainConfig, train_editor(), evaluate(): training with resumable checkpoints
    store     editors on disk: $KMEC_HOME/editors/<model fingerprint>/
    backend   Mend, MendParams: the ``mend`` backend
"""

from __future__ import annotations

from kmec.backends.mend.backend import Mend, MendParams
from kmec.backends.mend.model import EditorConfig, EditorNet
from kmec.backends.mend.records import EditRecord, read_records, split_records
from kmec.backends.mend.store import Editor, EditorManifest, find_editor, list_editors, load_editor
from kmec.backends.mend.train import DataInfo, TrainConfig, TrainResult, evaluate, train_editor

__all__ = [
    "DataInfo", "EditRecord", "Editor", "EditorConfig", "EditorManifest", "EditorNet", "Mend",
    "MendParams", "TrainConfig", "TrainResult", "evaluate", "find_editor", "list_editors",
    "load_editor", "read_records", "split_records", "train_editor",
]
