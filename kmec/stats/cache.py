"""Content-addressed, atomic cache of second moments (safetensors + metadata).

Contents:
    STATS_FORMAT   version of the window/accumulation scheme (part of every key)
    StatsKey       everything that changes the numbers, except the token count
    CacheEntry     what ``kmec stats --list`` shows about one file
    StatsCache     lookup / save entries; save / load / drop pass checkpoints

Keys. An entry is named by ``StatsKey.base_hash()``: sha256 of the canonical
JSON of the model fingerprint, module path, layer, corpus content
fingerprint, tokenizer hash, max_len, dtype, sample budget and format. The
token count is the one input left out of the name, and the file records it:
a request for ``n`` tokens is served by the entry when its count is at least
``n`` (or the corpus ran out before ``n``), so asking for fewer tokens reuses
a bigger run. ``StatsKey.full_hash(n)`` (the base key plus the count) is
written into the metadata to identify exactly what was computed. A new run
only replaces an entry it has more tokens than.

Files live under ``kmec_home()/stats/``::

    <base_hash>.safetensors          sum [d, d] float64 + metadata
    checkpoints/<pass>.r<rank>of<world>.safetensors   in-progress passes

Every write goes through :func:`kmec.hashing.atomic_write_bytes`, so a reader
sees a complete old file or a complete new one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kmec.hashing import atomic_write_bytes, canonical_json, sha256_text
from kmec.stats.accumulators import SecondMoment

log = logging.getLogger("kmec")

STATS_FORMAT = 1


class StatsKey(BaseModel):
    """What the numbers of one layer's moment depend on (except the token count)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_fingerprint: str
    module: str
    layer: int
    corpus_fingerprint: str
    tokenizer_hash: str
    max_len: int
    dtype: str
    max_samples: int | None = None
    products: Literal["float32", "bfloat16"] = "float32"
    format: int = STATS_FORMAT

    def _fields(self) -> dict[str, Any]:
        # float32 products leave the field out, so entries cached before the
        # field existed (all float32) keep their names.
        fields = self.model_dump(mode="json")
        if fields["products"] == "float32":
            del fields["products"]
        return fields

    def base_hash(self) -> str:
        """sha256 of the key without the token count (names the cache file)."""
        return sha256_text(canonical_json(self._fields()))

    def full_hash(self, tokens: int) -> str:
        """sha256 of the key plus the token count."""
        return sha256_text(canonical_json({**self._fields(), "tokens": tokens}))


@dataclass(frozen=True)
class CacheEntry:
    """One cache file, as read from its metadata."""

    path: Path
    key: StatsKey
    tokens: int
    requested: int
    exhausted: bool
    corpus: str
    model: str
    created: str
    size: int


class StatsCache:
    """The moments cache under ``root`` (default ``kmec_home()/stats``)."""

    def __init__(self, root: Path | str | None = None) -> None:
        if root is None:
            from kmec.models.load import kmec_home

            root = kmec_home() / "stats"
        self.root = Path(root)

    # ------------------------------------------------------------ entries

    def path_for(self, key: StatsKey) -> Path:
        return self.root / f"{key.base_hash()}.safetensors"

    def _read_meta(self, path: Path) -> dict[str, str] | None:
        try:
            with safe_open(str(path), framework="pt") as f:
                return dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:  # truncated or foreign: a miss
            log.warning("ignoring unreadable stats file %s (%s)", path, e)
            return None

    def lookup(self, key: StatsKey, tokens: int) -> CacheEntry | None:
        """The entry that can serve ``tokens`` tokens for ``key``, or None."""
        path = self.path_for(key)
        if not path.exists():
            return None
        entry = self._entry(path)
        if entry is None or entry.key != key:
            return None
        if entry.tokens >= tokens or entry.exhausted:
            return entry
        log.info("cached stats for %s have %d tokens < %d requested; recomputing",
                 key.module, entry.tokens, tokens)
        return None

    def load(self, entry: CacheEntry, *, device: torch.device | str = "cpu") -> SecondMoment:
        """The accumulator stored in ``entry``."""
        tensors = st_load(entry.path.read_bytes())
        return SecondMoment.from_state_dict(
            {"sum": tensors["sum"], "count": torch.tensor(entry.tokens)}, device=device)

    def save(self, key: StatsKey, sm: SecondMoment, *, requested: int, exhausted: bool,
             corpus: str = "", model: str = "") -> Path:
        """Write ``sm`` as the entry for ``key`` unless a bigger entry exists."""
        path = self.path_for(key)
        old = self._entry(path) if path.exists() else None
        if old is not None and old.key == key and old.tokens > sm.count:
            log.info("keeping the cached %d-token stats for %s", old.tokens, key.module)
            return path
        meta = {
            "kmec_stats": str(STATS_FORMAT),
            "key": canonical_json(key.model_dump(mode="json")),
            "full_hash": key.full_hash(sm.count),
            "tokens": str(sm.count),
            "requested": str(requested),
            "exhausted": "1" if exhausted else "0",
            "corpus": corpus,
            "model": model,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_bytes(path, st_save({"sum": sm.state_dict()["sum"]}, metadata=meta))
        return path

    def _entry(self, path: Path) -> CacheEntry | None:
        meta = self._read_meta(path)
        if not meta or "key" not in meta:
            return None
        try:
            return CacheEntry(
                path=path, key=StatsKey.model_validate(json.loads(meta["key"])),
                tokens=int(meta["tokens"]), requested=int(meta.get("requested", 0)),
                exhausted=meta.get("exhausted") == "1", corpus=meta.get("corpus", ""),
                model=meta.get("model", ""), created=meta.get("created", ""),
                size=path.stat().st_size)
        except (ValueError, KeyError) as e:
            log.warning("ignoring stats file %s with bad metadata (%s)", path, e)
            return None

    def entries(self) -> list[CacheEntry]:
        """Every readable entry, sorted by model, module order and layer."""
        if not self.root.is_dir():
            return []
        found = (self._entry(p) for p in self.root.glob("*.safetensors"))
        return sorted((e for e in found if e is not None),
                      key=lambda e: (e.model, e.key.model_fingerprint, e.key.layer, e.created))

    # ------------------------------------------------------------ checkpoints

    def checkpoint_path(self, keys: Iterable[StatsKey], tokens: int, rank: int, world: int) -> Path:
        """Where the pass over ``keys`` for ``tokens`` tokens keeps rank ``rank``'s checkpoint."""
        pass_id = sha256_text(canonical_json(sorted(k.full_hash(tokens) for k in keys)))
        return self.root / "checkpoints" / f"{pass_id[:32]}.r{rank}of{world}.safetensors"

    def save_checkpoint(self, path: Path, acc: dict[int, SecondMoment], position: int,
                        tokens_done: int) -> None:
        """Atomically write the accumulators and stream position of a running pass."""
        tensors = {}
        for layer, sm in acc.items():
            state = sm.state_dict()
            tensors[f"layer{layer}.sum"] = state["sum"]
            tensors[f"layer{layer}.count"] = state["count"].reshape(1)
        meta = {"position": str(position), "tokens_done": str(tokens_done)}
        atomic_write_bytes(path, st_save(tensors, metadata=meta))
        log.debug("checkpoint at window %d (%d tokens): %s", position, tokens_done, path)

    def load_checkpoint(self, path: Path) -> tuple[int, int, dict[int, dict[str, torch.Tensor]]] | None:
        """``(position, tokens_done, {layer: state})`` from a checkpoint, or None."""
        if not path.exists():
            return None
        meta = self._read_meta(path)
        if meta is None or "position" not in meta:
            return None
        tensors = st_load(path.read_bytes())
        states: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            layer, field = name.removeprefix("layer").split(".")
            states.setdefault(int(layer), {})[field] = t if field == "sum" else t.reshape(())
        return int(meta["position"]), int(meta["tokens_done"]), states

    def drop_checkpoint(self, path: Path) -> None:
        path.unlink(missing_ok=True)
