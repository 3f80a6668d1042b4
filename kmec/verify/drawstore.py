"""Sampled neighbourhoods kept on disk, so a verification repeats no hypothesis run.

Contents:
    DrawStore   a mapping from a locality job's key to its drawn prompts, backed by files

Drawing a claim's neighbourhood is pure: the same space (its digest is in the key),
sample size, seed, kmec, hypothesis and Python give the same prompts. Compile's repair
loop draws each locality claim's neighbourhood with the seed ``kmec verify`` uses, so
with a store the verification after a compile reads them instead of running hypothesis
again (about 5 s of the README demo's verification: 12 edits × 200 prompts).

Files are ``<root>/<sha256 of the key and the versions>.json``, written atomically.
A file that cannot be read or does not hold a list of draws is a miss (and is
rewritten), never an error: the store only saves time. ``kmec verify --no-cache``
verifies without it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import hypothesis

from kmec._version import __version__
from kmec.hashing import atomic_write_text, canonical_json, sha256_text
from kmec.verify.strategies import Draw

log = logging.getLogger("kmec")

_FORMAT = "kmec-draws/1"


class DrawStore(MutableMapping[str, list[Draw]]):
    """Drawn prompts by job key, in memory and under ``root`` (created on first write)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._mem: dict[str, list[Draw]] = {}

    def _path(self, key: str) -> Path:
        name = sha256_text(canonical_json({
            "format": _FORMAT, "kmec": __version__, "hypothesis": hypothesis.__version__,
            "python": list(sys.version_info[:2]), "key": key}))
        return self.root / f"{name}.json"

    def _read(self, key: str) -> list[Draw] | None:
        path = self._path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not (isinstance(data, dict) and data.get("format") == _FORMAT
                and data.get("key") == key and isinstance(data.get("draws"), list)):
            return None
        draws = data["draws"]
        if not all(isinstance(d, list) and len(d) == 2 and all(isinstance(x, str) for x in d)
                   for d in draws):
            return None
        return [Draw(source, prompt) for source, prompt in draws]

    def __getitem__(self, key: str) -> list[Draw]:
        if key not in self._mem:
            found = self._read(key)
            if found is None:
                raise KeyError(key)
            self._mem[key] = found
        return self._mem[key]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        try:
            self[key]
        except KeyError:
            return False
        return True

    def __setitem__(self, key: str, draws: list[Draw]) -> None:
        self._mem[key] = list(draws)
        text = canonical_json({"format": _FORMAT, "key": key,
                               "draws": [[d.source, d.prompt] for d in draws]})
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self._path(key), text)
        except OSError as e:  # a read-only cache costs time, not the verification
            log.warning("could not keep the drawn neighbourhood in %s: %s", self.root, e)

    def __delitem__(self, key: str) -> None:
        self._mem.pop(key, None)
        self._path(key).unlink(missing_ok=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self._mem)

    def __len__(self) -> int:
        return len(self._mem)


__all__ = ["DrawStore"]
