"""Importers: public knowledge-editing benchmarks -> ``.kmec`` specs.

Contents:
    Dataset        one importer: name, record test, reader, scoring protocol
    DATASETS       counterfact (ROME and EasyEdit formats), zsre, mquake, knowedit
    Imported       the Spec, its header comment, and the text to write
    detect()       which dataset a record looks like (None if none)
    import_records()  records -> Imported (pure)
    import_file()  a release file -> Imported (reads the file, hashes it)

Each dataset module (``counterfact``, ``zsre``, ``mquake``, ``knowedit``)
maps record fields to spec statements on a :class:`~kmec.data.common.Builder`;
``docs/importers.md`` has the mapping tables. What the language cannot express
is counted in the header comment of the spec, never dropped silently.
``kmec/data/corpus/`` is package data (the statistics corpus), not an importer.
"""

from __future__ import annotations

import os
import re
import shlex
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmec._version import __version__
from kmec.data import counterfact, knowedit, mquake, zsre
from kmec.data.common import Builder, load_records
from kmec.errors import KmecError
from kmec.grammar import format_spec
from kmec.hashing import sha256_file
from kmec.spec import Spec

Reader = Callable[[Sequence[Mapping[str, Any]], int, Builder], None]
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


@dataclass(frozen=True)
class Dataset:
    """An importer: how to recognise a record, how to read records, how to score them."""

    name: str
    title: str
    looks_like: Callable[[Mapping[str, Any]], bool]
    read: Reader
    protocol: str  # the claims' scoring protocol (the benchmark's own)


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("counterfact", "CounterFact (ROME or EasyEdit format)", counterfact.looks_like,
            counterfact.read, "prob"),
    Dataset("zsre", "zsRE (MEND format)", zsre.looks_like, zsre.read, "token"),
    Dataset("mquake", "MQuAKE", mquake.looks_like, mquake.read, "token"),
    Dataset("knowedit", "KnowEdit (WikiData_counterfact, WikiData_recent, ZsRE)",
            knowedit.looks_like, knowedit.read, "token"),
)}


@dataclass(frozen=True)
class Imported:
    """An imported spec and the comment that heads it.

    Attributes:
        spec: the Spec (claims included).
        header: comment lines (each starting with ``#``).
        records: how many records were read.
    """

    spec: Spec
    header: tuple[str, ...]
    records: int

    @property
    def text(self) -> str:
        """The spec file: the header, a blank line, then the canonical spec."""
        return "\n".join(self.header) + "\n\n" + format_spec(self.spec)


def detect(record: Mapping[str, Any]) -> str | None:
    """The name of the dataset ``record`` looks like, or None.

    >>> detect({"src": "q?", "alt": "a", "answers": ["b"]})
    'zsre'
    """
    return next((d.name for d in DATASETS.values() if d.looks_like(record)), None)


def _dataset(name: str) -> Dataset:
    if name not in DATASETS:
        from kmec.errors import did_you_mean

        raise KmecError(f"unknown dataset {name!r}",
                        hint=did_you_mean(name, DATASETS) or f"datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def _clean(text: str) -> str:
    return _CONTROL.sub("?", text)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(_clean(text), 98, initial_indent=f"#{indent}",
                         subsequent_indent=f"#{indent}    ", break_on_hyphens=False,
                         break_long_words=False)


def _header(b: Builder, spec: Spec, *, command: str, source: str, sha: str, start: int,
            n: int, total: int) -> tuple[str, ...]:
    span = f"records {start}-{start + n - 1} of {total}" if n else f"no records (of {total})"
    lines = [f"# Imported from {b.title or 'an empty file'} by kmec {__version__}:",
             f"#   {_clean(command)}",
             f"# source: {_clean(source)}",
             f"# sha256: {sha}",
             *_wrap(f"{span} -> {_count(len(spec.edits), 'edit')}, "
                    f"{_count(len(spec.relations), 'relation')}, "
                    f"{_count(len(spec.claims), 'claim')}", " ")]
    sections = (("mapping (record field -> spec):", [f"{k}: {v}" for k, v in b.mapping]),
                ("not expressible in .kmec, left out:", b.lost.lines()),
                ("records not imported:", b.dropped.lines()),
                ("adjusted to make a valid spec:", b.adjusted.lines()))
    for title, items in sections:
        if items:
            lines += ["#", f"# {title}"]
            for item in items:
                lines += _wrap(item, "   ")
    return tuple(lines)


def import_records(dataset: str, records: Sequence[Mapping[str, Any]], *, start: int = 0,
                   total: int | None = None, model: str | None = None,
                   source: str = "<records>", sha: str = "-",
                   command: str | None = None) -> Imported:
    """Records of ``dataset`` -> an :class:`Imported` spec (pure: no file access).

    Args:
        dataset: a key of :data:`DATASETS`.
        records: the records to import (already sliced).
        start: the index in the file of ``records[0]`` (names use file indices).
        total: how many records the file has (for the header).
        model: a model reference to write as the spec's ``model``.
        source, sha: the file and its sha256, for the header.
        command: the command line to record in the header.

    Raises:
        KmecError: an unknown dataset, or a record it cannot read.
    """
    ds = _dataset(dataset)
    b = Builder(protocol=ds.protocol)
    ds.read(records, start, b)
    spec = b.spec(model=model)
    command = command or f"kmec import {dataset} {shlex.quote(source)}"
    header = _header(b, spec, command=command, source=source, sha=sha, start=start,
                     n=len(records), total=len(records) if total is None else total)
    return Imported(spec=spec, header=header, records=len(records))


def import_file(dataset: str, path: str | os.PathLike[str], *, limit: int | None = None,
                offset: int = 0, model: str | None = None,
                command: str | None = None) -> Imported:
    """Import records ``offset .. offset+limit`` of a release file of ``dataset``.

    Args:
        dataset: a key of :data:`DATASETS`.
        path: the file (a JSON array of records, or JSON Lines).
        limit: import at most this many records (None: all).
        offset: skip this many records first.
        model: a model reference to write as the spec's ``model``.
        command: the command line to record (default: one rebuilt from the arguments).

    Raises:
        KmecError: an unreadable file, records of another dataset (with a hint
            naming the one they look like), an offset past the end.
    """
    ds = _dataset(dataset)
    if offset < 0 or (limit is not None and limit < 0):
        raise KmecError("--offset and --limit must not be negative")
    records = load_records(path)
    name = os.fspath(path)
    if not records:
        raise KmecError(f"{name}: the file holds no records")
    if offset >= len(records):
        raise KmecError(f"{name}: offset {offset} is past the last record ({len(records)} records)")
    chosen = records[offset:None if limit is None else offset + limit]
    probe = chosen[0] if chosen else records[0]
    if not ds.looks_like(probe):
        guess = detect(probe)
        raise KmecError(f"{name}: record {offset} is not a {ds.title} record "
                        f"(its fields: {', '.join(list(probe)[:8])})",
                        hint=f"it looks like {guess}: kmec import {guess} {shlex.quote(name)}"
                        if guess else f"datasets: {', '.join(DATASETS)}")
    if command is None:
        opts = ([f"--limit {limit}"] if limit is not None else []) + \
            ([f"--offset {offset}"] if offset else []) + \
            ([f"--model {shlex.quote(model)}"] if model else [])
        command = " ".join([f"kmec import {dataset} {shlex.quote(name)}", *opts])
    try:
        return import_records(dataset, chosen, start=offset, total=len(records), model=model,
                              source=name, sha=sha256_file(Path(path)), command=command)
    except KmecError as e:  # readers name the record; say which file it is in
        raise KmecError(f"{name}: {e.message}", hint=e.hint) from e


__all__ = ["DATASETS", "Dataset", "Imported", "detect", "import_file", "import_records"]
