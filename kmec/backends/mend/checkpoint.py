"""Checkpoints of MEND training runs: resume exactly where a run stopped.

Contents:
    Run               a run's progress: step, elapsed seconds, loss curve, α after calibration
    checkpoint_dir()  ``$KMEC_HOME/editors/.checkpoints/<fingerprint>-<run key>/``
    save_checkpoint() network + optimiser + Run -> folder, atomically
    load_checkpoint() the reverse (None when there is none or it is unreadable)

A checkpoint folder holds ``checkpoint.safetensors`` (the network's tensors as
``net.*``, Adam's moments and step counts as ``opt.<param index>.*``) and
``state.json`` (the Run and Adam's param groups). Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kmec.backends.mend.model import EditorNet
from kmec.backends.mend.store import editors_root
from kmec.hashing import atomic_dir

log = logging.getLogger("kmec")


@dataclass
class Run:
    """Mutable state of a training run (what a checkpoint holds besides tensors)."""

    step: int = 0
    seconds: float = 0.0
    curve: list[dict[str, float]] | None = None
    window: dict[str, float] | None = None
    alpha0: float = 0.0

    def record(self, metrics: dict[str, float], every: int) -> dict[str, float] | None:
        """Add one step's metrics; every ``every`` steps, append their mean to the curve."""
        self.window = self.window or {}
        for k, v in metrics.items():
            self.window[k] = self.window.get(k, 0.0) + v
        self.window["n"] = self.window.get("n", 0.0) + 1
        return self.flush() if self.step % every == 0 else None

    def flush(self) -> dict[str, float] | None:
        """Append the mean of the metrics recorded since the last curve point."""
        if not self.window or not self.window.get("n"):
            return None
        n = self.window.pop("n")
        point = {"step": self.step, **{k: round(v / n, 5) for k, v in self.window.items()}}
        self.curve = [*(self.curve or []), point]
        self.window = {}
        return point


def checkpoint_dir(fingerprint: str, run_key: str) -> Path:
    """Where the checkpoints of one training run live."""
    return editors_root() / ".checkpoints" / f"{fingerprint[:16]}-{run_key[:16]}"


def save_checkpoint(path: Path, net: EditorNet, opt: torch.optim.Optimizer, run: Run) -> None:
    sd = opt.state_dict()
    tensors = {f"net.{k}": v.detach().cpu().contiguous().clone()
               for k, v in net.state_dict().items()}
    for i, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"opt.{i}.{name}"] = value.detach().cpu().contiguous().clone()
    meta = {"step": run.step, "seconds": run.seconds, "curve": run.curve or [],
            "window": run.window or {}, "alpha0": run.alpha0, "param_groups": sd["param_groups"]}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "checkpoint.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, sort_keys=True))


def load_checkpoint(path: Path, net: EditorNet, opt: torch.optim.Optimizer) -> Run | None:
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "checkpoint.safetensors"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, SafetensorError) as e:
        log.warning("mend: ignoring an unreadable checkpoint at %s (%s)", path, e)
        return None
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return Run(step=meta["step"], seconds=meta["seconds"], curve=meta["curve"],
                window=meta["window"], alpha0=meta["alpha0"])
