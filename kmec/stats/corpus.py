"""Text corpora for the statistics pass, and the token windows cut from them.

Contents:
    DEFAULT_CORPUS     name of the corpus that ships with kmec ("default")
    Corpus             an ordered list of files + a content fingerprint
    resolve_corpus()   "default" | a text/JSONL file | a folder -> Corpus
    Window             one sample: token ids of at most max_len tokens
    special_prefix()   the special tokens a tokenizer puts before text (BOS)
    windows()          the deterministic, budgeted stream of windows

The default corpus is WikiText-2's test split, one article per JSONL record
(``kmec/data/corpus/``; CC BY-SA 3.0 / GFDL, see PROVENANCE.md there).

Formats: ``.jsonl`` files hold one JSON object per line with a ``"text"``
field; any other file is plain UTF-8 text whose documents are separated by
blank lines (a long paragraph is cut every 64k characters so memory stays
flat). A folder means its ``.txt``/``.text``/``.md``/``.jsonl`` files, recursively,
in sorted path order.

The fingerprint hashes the files' *contents* in order (and their format),
not their names, so renaming a corpus keeps its cache entries and editing
one byte invalidates them.

Windows: each document is tokenized without special tokens and cut into
consecutive chunks of ``max_len - len(prefix)`` tokens; each chunk gets the
tokenizer's special prefix (e.g. a BOS), which is fed to the model but not
counted. The stream stops when the counted tokens reach the token budget
(the last window is shortened to land on it exactly) or the sample budget.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from kmec.errors import StatsError
from kmec.hashing import sha256_file, sha256_text

log = logging.getLogger("kmec")

DEFAULT_CORPUS = "default"
_DEFAULT_FILE = "wikitext-2-raw-test.jsonl"
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw")
_JSONL_SUFFIXES = (".jsonl",)
_MAX_DOC_CHARS = 1 << 16


@dataclass(frozen=True)
class Corpus:
    """An ordered list of corpus files.

    Attributes:
        name: what the user called it ("default", a path) — for display only.
        files: the files, in reading order.
        fingerprint: sha256 over the files' formats and contents, in order.
    """

    name: str
    files: tuple[Path, ...]
    fingerprint: str

    def documents(self) -> Iterator[str]:
        """Yield the corpus's documents, in order."""
        for f in self.files:
            if f.suffix.lower() in _JSONL_SUFFIXES:
                yield from _jsonl_documents(f)
            else:
                yield from _text_documents(f)


def _kind(path: Path) -> str:
    return "jsonl" if path.suffix.lower() in _JSONL_SUFFIXES else "text"


def _fingerprint(files: tuple[Path, ...]) -> str:
    return sha256_text("\n".join(f"{_kind(f)}:{sha256_file(f)}" for f in files))


def default_corpus_path() -> Path:
    """Path of the packaged default corpus file."""
    return Path(str(resources.files("kmec") / "data" / "corpus" / _DEFAULT_FILE))


def resolve_corpus(ref: str | Path | Corpus | None = None) -> Corpus:
    """Resolve a corpus reference.

    Args:
        ref: ``"default"``/None (the packaged corpus), a ``.jsonl`` or text
            file, a folder of them, or a :class:`Corpus` (returned as is).

    Raises:
        StatsError: the path does not exist or holds no corpus files.
    """
    if isinstance(ref, Corpus):
        return ref
    if ref is None or str(ref) == DEFAULT_CORPUS:
        path = default_corpus_path()
        if not path.exists():
            raise StatsError(f"the packaged default corpus is missing ({path})",
                             hint="reinstall kmec, or pass --corpus PATH")
        return Corpus(DEFAULT_CORPUS, (path,), _fingerprint((path,)))
    path = Path(ref).expanduser()
    if path.is_dir():
        files = tuple(sorted(
            (p for p in path.rglob("*")
             if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES + _JSONL_SUFFIXES),
            key=lambda p: p.relative_to(path).as_posix()))
        if not files:
            raise StatsError(f"corpus folder {str(ref)!r} holds no .txt/.md/.jsonl files",
                             hint="point --corpus at a text or JSONL file, or a folder of them")
    elif path.is_file():
        files = (path,)
    else:
        raise StatsError(f"corpus {str(ref)!r} does not exist",
                         hint="use 'default', a text or JSONL file, or a folder")
    return Corpus(str(ref), files, _fingerprint(files))


def _jsonl_documents(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise StatsError(f"{path}:{lineno}: not a JSON object with a \"text\" field",
                                 hint='each line of a .jsonl corpus must look like {"text": "..."}'
                                 ) from None
            if isinstance(text, str) and text.strip():
                yield text


def _text_documents(path: Path) -> Iterator[str]:
    """Blank-line separated documents; very long ones are cut every 64k characters."""
    parts: list[str] = []
    size = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                if parts:
                    yield "".join(parts).strip()
                parts, size = [], 0
                continue
            parts.append(line)
            size += len(line)
            if size >= _MAX_DOC_CHARS:
                yield "".join(parts).strip()
                parts, size = [], 0
    if parts:
        yield "".join(parts).strip()


@dataclass(frozen=True)
class Window:
    """One sample: ``ids`` (prefix + text tokens); ``n_special`` leading ids are not counted."""

    index: int
    ids: tuple[int, ...]
    n_special: int

    @property
    def n_counted(self) -> int:
        return len(self.ids) - self.n_special


def _ids(encoded: Any) -> list[int]:
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


def special_prefix(tok: Any) -> tuple[int, ...]:
    """The ids a tokenizer puts before text by default (e.g. ``(bos,)``), or ``()``."""
    probe = "kmec statistics probe"
    plain = _ids(tok(probe, add_special_tokens=False))
    full = _ids(tok(probe))
    if len(full) > len(plain) and full[len(full) - len(plain):] == plain:
        return tuple(full[: len(full) - len(plain)])
    if len(full) > len(plain) and full[: len(plain)] == plain:
        return ()  # only a suffix (EOS): nothing to prepend
    return ()


def windows(
    corpus: Corpus,
    tok: Any,
    *,
    max_len: int,
    tokens: int,
    samples: int | None = None,
) -> Iterator[Window]:
    """The global, deterministic stream of windows under the budgets.

    Args:
        corpus: where the text comes from.
        tok: a Hugging Face-style tokenizer (``tok(text, add_special_tokens=False)``).
        max_len: most ids per window, special prefix included.
        tokens: token budget (counted ids, prefixes excluded).
        samples: sample budget (windows), None for no limit.

    Yields:
        Windows numbered 0, 1, 2, ... until a budget is met or the corpus ends.
    """
    prefix = special_prefix(tok)
    room = max_len - len(prefix)
    if room < 1:
        raise StatsError(f"max_len {max_len} leaves no room for text after the special tokens")
    left = tokens
    index = 0
    for doc in corpus.documents():
        if left <= 0 or (samples is not None and index >= samples):
            return
        ids = _ids(tok(doc, add_special_tokens=False))
        for start in range(0, len(ids), room):
            if left <= 0 or (samples is not None and index >= samples):
                return
            chunk = ids[start: start + min(room, left)]
            yield Window(index, prefix + tuple(chunk), len(prefix))
            left -= len(chunk)
            index += 1
