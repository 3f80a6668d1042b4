"""Model facts for planning, read without loading weights where possible.

Contents:
    facts_for_ref()          alias / folder / hub id -> ModelFacts
    count_params_on_disk()   parameter count from safetensors headers (no tensors read)

For an installed alias the config comes from its folder and the fingerprint
from its ``kmec_model.json``; for a folder the fingerprint comes from
:func:`kmec.models.load.fingerprint_folder` (cached by the folder's file stamps,
so weights are read at most once per folder). A hub id has no local folder to
read, so its model is loaded. The facts equal those of
``load_model(ref).facts`` with the default dtype, so ``kmec plan`` and
``kmec compile`` plan the same thing.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from kmec.errors import ModelError
from kmec.models.facts import ModelFacts, facts_from_config
from kmec.models.load import (
    ALIASES,
    MODEL_META,
    fingerprint_folder,
    load_model,
    resolve_ref,
)


def count_params_on_disk(folder: Path) -> int:
    """Number of parameters stored in a folder's ``*.safetensors`` files (0 if none).

    Reads only each file's JSON header. Tied weights are stored once by
    ``save_pretrained``, so this matches ``sum(p.numel() for p in model.parameters())``.
    """
    total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def _alias_fingerprint(path: Path, name: str) -> str:
    try:
        return str(json.loads((path / MODEL_META).read_text())["fingerprint"])
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ModelError(f"the cached model {name!r} has no readable fingerprint ({e})",
                         hint=f"reinstall it with: kmec model install --force {name}") from None


def facts_for_ref(ref: str, *, dtype: str = "float32") -> ModelFacts:
    """The :class:`ModelFacts` of a model reference, reading config and metadata only.

    Args:
        ref: alias, model folder or hub id.
        dtype: the dtype the model will be loaded in (recorded in the facts).

    Raises:
        ModelError: the reference does not resolve, names an embedding model,
            or its config cannot be read.
    """
    from transformers import AutoConfig

    r = resolve_ref(ref)
    if r.path is None:  # a hub id: nothing local to read without loading
        return load_model(r, dtype=dtype).facts
    if r.kind == "alias" and ALIASES[r.text].kind != "gguf-causal-lm":
        raise ModelError(f"{r.text!r} is an embedding model, not a causal language model",
                         hint="plan against a causal LM such as smollm2-135m")
    try:
        config = AutoConfig.from_pretrained(str(r.path))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the model config in {r.path}: {e}") from None
    if r.kind == "alias":
        fingerprint = _alias_fingerprint(r.path, r.text)
    else:
        fingerprint = fingerprint_folder(r.path)
    return facts_from_config(config, name=r.text, fingerprint=fingerprint,
                             n_params=count_params_on_disk(r.path), dtype=dtype)
