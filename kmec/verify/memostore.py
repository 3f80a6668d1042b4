"""The base model's side of a verification, kept on disk from compile to verify.

Contents:
    memo_key()    what the base side of a verification depends on, as one string
    load_memo()   a :class:`VerifyMemo` from ``$KMEC_HOME/verify/base`` (None: not there)
    save_memo()   write one there (atomically; the oldest files beyond a few are removed)

``kmec compile`` scores the claims on the base and the edited model; ``kmec verify``
then scores the same prompts on the same base model again: more than half of the README
demo's scoring. With the memo on disk, verify runs the base model only on prompts compile
did not score (held-out variants drawn for the report), and reads its perplexity and
greedy continuations. What is kept is exactly what the in-process memo of compile's
repair loop keeps (:class:`kmec.verify.runner.VerifyMemo`: each item's base score and its
full next-token distribution in float32, the KL reference), so the report is the one a
verification without it gives (tested). The key covers kmec's version, the base model's
fingerprint, where and how it runs (device, dtype, torch threads: they change the last
bits) and the spec's hash (claims, prompts, seed, chat frame).

A file is about ``vocab × 4`` bytes per item (200 KB for SmolLM2; 130 MB for the demo's
633 items); a memo over :data:`MAX_BYTES` is not kept, and only the :data:`KEEP` newest
files stay. A file that cannot be read, or whose key or format differs, is a miss, never
an error. ``kmec verify --no-cache`` recomputes everything.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from kmec._version import __version__
from kmec.hashing import atomic_write_bytes, canonical_json, sha256_text
from kmec.verify.runner import VerifyMemo
from kmec.verify.scoring import BaseMemo, Item, ItemScore

log = logging.getLogger("kmec")

_FORMAT = "kmec-base-memo/1"
MAX_BYTES = 512 * 2**20  # a memo larger than this is not written
KEEP = 6  # newest memo files kept


def memo_key(*, fingerprint: str, runtime: dict[str, Any], spec_sha: str) -> str:
    """The key of a base memo: kmec, the base weights, the runtime, threads, the spec."""
    return sha256_text(canonical_json({
        "format": _FORMAT, "kmec": __version__, "fingerprint": fingerprint,
        "runtime": runtime, "threads": torch.get_num_threads(), "spec": spec_sha}))


def _path(root: Path, key: str) -> Path:
    return root / f"{key}.safetensors"


def _score_json(s: ItemScore) -> list[Any]:
    return [list(s.target_ids), list(s.target_logprobs), list(s.target_hits), list(s.top_ids),
            list(s.top_probs), s.kl]


def _score_of(row: list[Any]) -> ItemScore:
    ids, lps, hits, top, probs, kl = row
    return ItemScore(tuple(int(x) for x in ids), tuple(float(x) for x in lps),
                     tuple(bool(x) for x in hits), tuple(int(x) for x in top),
                     tuple(float(x) for x in probs), float(kl))


def save_memo(root: str | Path, key: str, memo: VerifyMemo) -> bool:
    """Write ``memo``'s base side (scores, distributions, perplexity, greedy text) under
    ``root``. Returns False when it was not written (too large, or the folder is not
    writable: a warning, since the memo only saves time)."""
    from safetensors.torch import save

    root = Path(root)
    items = list(memo.base.scores.items())
    if not items:
        return False
    refs = torch.stack([ref.float().reshape(-1).cpu() for _, (_, ref) in items])
    if refs.numel() * 4 > MAX_BYTES:
        log.info("base memo of %d items not kept (over %d MB)", len(items), MAX_BYTES >> 20)
        return False
    meta = {"format": _FORMAT, "key": key, "kmec": __version__,
            "items": json.dumps([[it.prompt, it.target, _score_json(sc)]
                                 for it, (sc, _) in items]),
            "base_ppl": json.dumps(memo.base_ppl),
            "greedy": json.dumps(sorted(memo.base_greedy.items()))}
    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(_path(root, key), save({"refs": refs.contiguous()}, metadata=meta))
    except OSError as e:
        log.warning("could not keep the base model's scores in %s: %s", root, e)
        return False
    olds = sorted(root.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in olds[KEEP:]:
        old.unlink(missing_ok=True)
    return True


def load_memo(root: str | Path, key: str) -> VerifyMemo | None:
    """The memo saved under ``key`` (its draws left empty), or None."""
    from safetensors import SafetensorError, safe_open

    path = _path(Path(root), key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT or meta.get("key") != key:
                return None
            refs = f.get_tensor("refs")
        rows = json.loads(meta["items"])
        ppl = json.loads(meta["base_ppl"])
        greedy = json.loads(meta["greedy"])
        if len(rows) != refs.shape[0] or refs.dtype != torch.float32:
            return None
        base = BaseMemo()
        for (prompt, target, score), ref in zip(rows, refs):
            base.scores[Item(str(prompt), None if target is None else str(target))] = (
                _score_of(score), ref.clone())
        memo = VerifyMemo(base=base, base_ppl=None if ppl is None else float(ppl))
        memo.base_greedy.update({str(k): tuple(str(t) for t in v) for k, v in greedy})
    except (OSError, SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as e:
        # a damaged file is a miss: the memo only saves time
        log.info("base memo %s not used: %s", path, e)
        return None
    return memo


__all__ = ["KEEP", "MAX_BYTES", "load_memo", "memo_key", "save_memo"]
