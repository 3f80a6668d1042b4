"""Files -> a checked Spec: includes, semantic checks, one aggregated error.

Contents:
    Analysis        a spec (or None) and every diagnostic about it, sorted, with source lines
    analyze()       text -> Analysis; never raises for bad input
    analyze_file()  the same for a file (a missing or unreadable file is a diagnostic)
    read_spec_text() a spec file's text (UTF-8; a missing file is a located SpecError)
    parse()         text -> Spec, or one SpecError with every error (warnings are logged)
    parse_file()    a file -> Spec
    parse_many()    files -> specs; one SpecError for all of them
    parse_dir()     every ``*.kmec`` under a folder (sorted), except files other
                    files there include
    parse_built()   one file's own statements, for the formatter (no includes, no checks)
    subjects_of()   a relation's subjects, inline and from its ``subjects from`` file

``include "x.kmec"`` is resolved relative to the including file's folder. An
included file's relations, edits and claims take the place of its ``include``
statement (so ``order sequence`` sees them where they were included); its
settings (``model``, ``seed``...) are ignored with a warning. A file included
twice is read once; a cycle is an error. In the merged Spec, ``subjects from``
paths are rewritten to be relative to the main spec's folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmec.errors import Diagnostic, Span, SpecError
from kmec.grammar.assemble import Built, Key
from kmec.grammar.check import check
from kmec.grammar.files import (
    MAX_SPEC_BYTES,
    FileRefused,
    confine,
    find_root,
    read_subjects,
    read_text_file,
)
from kmec.grammar.parser import build
from kmec.spec import Relation, Spec

log = logging.getLogger("kmec")
_SETTINGS = ("model", "seed", "order", "method", "chat")


@dataclass
class Analysis:
    """The outcome of reading a spec: the Spec if it has no errors, and every diagnostic."""

    spec: Spec | None
    diagnostics: list[Diagnostic] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # every file read, main first

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity != "error"]


@dataclass
class _Loader:
    """State of one load: files read, their sources, spans, diagnostics."""

    includes: bool
    root: Path  # files a spec names must lie under it (kmec.grammar.files)
    built: dict[str, Built] = field(default_factory=dict)  # by real path
    sources: dict[str, str] = field(default_factory=dict)  # by span file name
    spans: dict[Key, Span] = field(default_factory=dict)
    diags: list[Diagnostic] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # span file names, in reading order
    shown: dict[str, str] = field(default_factory=dict)  # real path -> path as named

    def load(self, text: str, file: str, stack: tuple[str, ...]) -> Built | None:
        self.sources[file] = text
        self.order.append(file)
        result = build(text, file)
        if isinstance(result, list):
            self.diags.extend(result)
            return None
        self.diags.extend(result.diagnostics)
        self.spans.update(result.spans)
        if self.includes:
            self._merge_includes(result, file, stack)
        return result

    def _merge_includes(self, built: Built, file: str, stack: tuple[str, ...]) -> None:
        folder = Path(file).parent if file != "<string>" else Path(".")
        extra: dict[str, list[tuple[tuple[int, int, int], Any]]] = {
            "relations": [], "edits": [], "claims": []}
        paths: list[str] = []
        for target, at in built.includes:
            if not target.strip():
                continue  # check() reports the empty string
            child = self._include(folder, target, at, stack)
            if child is None:
                continue
            child_file = child.spec.span.file if child.spec.span else target
            paths.extend([child_file, *child.spec.includes])
            for group, placed in extra.items():
                nodes = getattr(child.spec, group)
                if group == "relations":
                    nodes = tuple(self._rebase(r, Path(child_file).parent, folder) for r in nodes)
                placed.extend(((at.line, at.col, n), node) for n, node in enumerate(nodes))
        if not built.includes:
            return
        update: dict[str, Any] = {"includes": tuple(dict.fromkeys(paths))}
        for group, placed in extra.items():
            own = [((n.span.line, n.span.col, 0), n) if n.span else ((0, 0, 0), n)
                   for n in getattr(built.spec, group)]
            update[group] = tuple(n for _, n in sorted(own + placed, key=lambda p: p[0]))
        merged = built.spec.model_copy(update=update)
        _rekey(self.spans, built.spec, merged)
        built.spec = merged

    def _include(self, folder: Path, target: str, at: Span, stack: tuple[str, ...]) -> Built | None:
        try:
            path = os.fspath(confine(folder, target, self.root, "included file"))
        except FileRefused as e:
            self.diags.append(Diagnostic(at, e.message, e.hint))
            return None
        real = os.path.realpath(path)
        self.shown.setdefault(real, path)
        if real in stack:
            chain = " -> ".join(self.shown.get(p, p) for p in (*stack, real))
            self.diags.append(Diagnostic(at, f"include cycle: {chain}",
                                         "remove one of the include statements"))
            return None
        if real in self.built:
            return None  # already merged through another include
        if not (target.endswith(".kmec") and real.endswith(".kmec")):
            # a spec's errors quote its lines: only spec files may be parsed as one
            self.diags.append(Diagnostic(at, f"included file {target!r} is not a .kmec file",
                                         "include only spec files (*.kmec)"))
            return None
        try:
            text = read_text_file(path, limit=MAX_SPEC_BYTES, what="included file")
        except FileRefused as e:
            self.diags.append(Diagnostic(at, e.message, e.hint))
            return None
        except UnicodeDecodeError as e:
            self.diags.append(Diagnostic(at, f"included file {target!r} is not UTF-8 text "
                                         f"({e.reason} at byte {e.start})"))
            return None
        except OSError as e:
            self.diags.append(Diagnostic(at, f"included file {target!r} not found"
                                         if isinstance(e, FileNotFoundError)
                                         else f"cannot read included file {target!r}: "
                                         f"{e.strerror or e}",
                                         f"looked for {path}; includes are relative to the "
                                         "including file's folder"))
            return None
        child = self.load(text, path, (*stack, real))
        if child is not None:
            self.built[real] = child
            self._warn_settings(child)
        return child

    def _warn_settings(self, child: Built) -> None:
        spec = child.spec
        for name in _SETTINGS:
            if name in spec.model_fields_set:
                at = child.spans.get((id(spec), name), spec.span or Span())
                self.diags.append(Diagnostic(
                    at, f"`{name}` in an included file is ignored", "settings apply only in "
                    "the spec you compile; move it there", severity="warning"))

    def _rebase(self, rel: Relation, child_dir: Path, main_dir: Path) -> Relation:
        if rel.subjects_file is None or child_dir == main_dir or not rel.subjects_file.strip():
            return rel
        new = rel.model_copy(update={"subjects_file": os.path.relpath(
            os.path.normpath(child_dir / rel.subjects_file), main_dir)})
        _rekey(self.spans, rel, new)
        return new


def _rekey(spans: dict[Key, Span], old: Any, new: Any) -> None:
    """Move the spans noted for ``old`` to its copy ``new``."""
    for key in [k for k in spans if k[0] == id(old)]:
        spans[(id(new), key[1])] = spans.pop(key)


def _finish(loader: _Loader, spec: Spec | None, semantic: bool, base_dir: Path | None) -> Analysis:
    diags = list(loader.diags)
    if spec is not None and semantic:
        diags += check(spec, locate=lambda node, name: loader.spans.get((id(node), name)),
                       base_dir=base_dir, root=loader.root)
    rank = {f: i for i, f in enumerate(loader.order)}
    diags.sort(key=lambda d: (rank.get(d.span.file, len(rank)), d.span.line, d.span.col))
    diags = [_with_source(d, loader.sources) for d in dict.fromkeys(diags)]
    has_errors = any(d.severity == "error" for d in diags)
    return Analysis(None if has_errors else spec, diags, list(loader.order))


def _with_source(d: Diagnostic, sources: dict[str, str]) -> Diagnostic:
    text = sources.get(d.span.file)
    if text is None or d.source_line is not None:
        return d
    lines = text.split("\n")
    line = lines[d.span.line - 1] if 0 < d.span.line <= len(lines) else ""
    return dataclasses.replace(d, source_line=line)


def analyze(text: str, *, path: str = "<string>", includes: bool = True,
            semantic: bool = True, root: str | os.PathLike[str] | None = None) -> Analysis:
    """Read a spec without raising: the Spec (None on errors) and all diagnostics.

    Args:
        text: the spec's text.
        path: its file name (spans carry it; includes resolve from its folder).
        includes: follow ``include`` statements (False: list them, as written).
        semantic: run :func:`kmec.grammar.check.check` after parsing.
        root: files the spec names must lie under it (default:
            :func:`kmec.grammar.files.find_root` of ``path``).

    >>> a = analyze('edit e { prompt "The 2022 World Cup was won by" -> "" }')
    >>> a.spec is None, [d.message for d in a.diagnostics]
    (True, ['empty target'])
    """
    loader = _Loader(includes=includes, root=_root(path, root))
    try:
        stack = (os.path.realpath(path),) if path != "<string>" else ()
        loader.shown.update({real: path for real in stack})
        built = loader.load(text, path, stack)
        base = Path(path).parent if path != "<string>" else Path(".")
        return _finish(loader, built.spec if built else None, semantic, base)
    except Exception as e:  # a bug must still come out as a located error, never a traceback
        log.debug("internal error while reading %s", path, exc_info=True)
        d = Diagnostic(Span(file=path), f"internal error while reading the spec: "
                       f"{type(e).__name__}: {e}", "please report this as a kmec bug")
        return Analysis(None, [d], [path])


def parse_built(text: str, path: str = "<string>") -> Built:
    """One file's own statements (includes listed, not followed; no semantic checks).

    Raises:
        SpecError: syntax errors, or values the language cannot hold.
    """
    loader = _Loader(includes=False, root=_root(path, None))
    try:
        built = loader.load(text, path, ())
    except Exception as e:  # see analyze()
        log.debug("internal error while reading %s", path, exc_info=True)
        raise SpecError([Diagnostic(Span(file=path), f"internal error while reading the spec: "
                                    f"{type(e).__name__}: {e}")]) from e
    errors = [_with_source(d, loader.sources) for d in loader.diags if d.severity == "error"]
    if errors or built is None:
        raise SpecError(errors)
    return built


def _root(path: str, root: str | os.PathLike[str] | None) -> Path:
    return Path(os.path.realpath(os.fspath(root))) if root is not None else find_root(path)


def analyze_file(path: str | os.PathLike[str], *, includes: bool = True,
                 semantic: bool = True, root: str | os.PathLike[str] | None = None) -> Analysis:
    """:func:`analyze` for a file; an unreadable or refused file becomes a diagnostic."""
    name = os.fspath(path)
    try:
        text = read_spec_text(name, root=root)
    except SpecError as e:
        return Analysis(None, list(e.diagnostics), [name])
    found = analyze(text, path=name, includes=includes, semantic=semantic, root=root)
    if found.errors and not name.endswith(".kmec"):
        return Analysis(None, list(not_a_spec(name, found.errors)), found.files)
    return found


def not_a_spec(name: str, errors: Iterable[Diagnostic]) -> tuple[Diagnostic, ...]:
    """The errors of a file that is not named ``*.kmec``, without its contents.

    A file that does not parse and is not named as a spec may be anything
    (``.env``, a key): its errors would quote its lines, so they are replaced
    by one message that names the file and the rule.
    """
    n = len(list(errors))
    return (Diagnostic(Span(file=name), f"{name} is not a .kmec file and does not parse as a "
                       f"spec ({n} error(s); its contents are not shown)",
                       "pass a spec file (*.kmec); rename the file to see its errors"),)


def read_spec_text(path: str | os.PathLike[str], *,
                   root: str | os.PathLike[str] | None = None) -> str:
    """A spec file's text, read under the rules of :mod:`kmec.grammar.files`.

    The file must be a regular file of at most ``MAX_SPEC_BYTES``; when it is
    reached through a symbolic link, the file linked to must also be a
    ``.kmec`` file under the root, and not hidden (a committed link to
    ``/proc/self/environ`` or ``.env`` is not read).

    Raises:
        SpecError: missing, refused or unreadable, located at the file.
    """
    name = os.fspath(path)
    hint: str | None = None
    try:
        real = os.path.realpath(name)
        if real != os.path.abspath(name) and os.path.exists(name):
            base = Path(os.path.abspath(name))
            confine(base.parent, base.name, _root(name, root), "spec file")
            if not real.endswith(".kmec"):
                raise FileRefused(f"spec file {name} is a symbolic link to {real}, which is "
                                  "not a .kmec file", "link only to spec files (*.kmec)")
        return read_text_file(name, limit=MAX_SPEC_BYTES, what="spec file")
    except FileRefused as e:
        message, hint = e.message, e.hint
        if message.startswith(f"spec file {name} is a folder"):
            message, hint = f"{name} is a folder, not a spec file", "pass a .kmec file"
    except FileNotFoundError:
        message, hint = f"spec file not found: {name}", "check the path"
    except UnicodeDecodeError as e:
        message = f"{name} is not UTF-8 text ({e.reason} at byte {e.start})"
    except (OSError, ValueError) as e:
        message = f"cannot read {name}: {getattr(e, 'strerror', None) or e}"
    raise SpecError([Diagnostic(Span(file=name), message, hint)])


def _raise_or_return(results: list[Analysis]) -> list[Spec]:
    errors = [d for a in results for d in a.errors]
    for a in results:
        for w in a.warnings:
            log.warning("%s", w.render())
    if errors:
        raise SpecError(errors)
    return [a.spec for a in results if a.spec is not None]


def parse(text: str, *, path: str = "<string>", includes: bool = True) -> Spec:
    """Parse and check a spec.

    Args:
        text: the spec's text.
        path: its file name; ``include`` paths resolve from its folder.
        includes: follow ``include`` statements.

    Returns:
        The Spec, includes merged.

    Raises:
        SpecError: with every error found (syntax, or all semantic errors).

    >>> spec = parse('relation r { prompt "{{ subject }} lives in" }\\n'
    ...              'edit e { subject "Ada" relation r -> "Paris" }')
    >>> spec.edits[0].new
    'Paris'
    """
    return _raise_or_return([analyze(text, path=path, includes=includes)])[0]


def parse_file(path: str | os.PathLike[str], *,
               root: str | os.PathLike[str] | None = None) -> Spec:
    """Parse and check a spec file (see :func:`parse`); a missing file is a SpecError.

    ``root`` confines the files the spec may read (see :mod:`kmec.grammar.files`).
    """
    return _raise_or_return([analyze_file(path, root=root)])[0]


def parse_many(paths: Iterable[str | os.PathLike[str]], *,
               root: str | os.PathLike[str] | None = None) -> list[Spec]:
    """Parse and check several spec files; one SpecError carries the errors of all."""
    return _raise_or_return([analyze_file(p, root=root) for p in paths])


def spec_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The ``*.kmec`` files under ``folder`` (recursive, sorted, hidden folders skipped)."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*.kmec")
                  if not any(part.startswith(".") for part in p.relative_to(root).parts[:-1]))


def analyze_dir(folder: str | os.PathLike[str], *,
                root: str | os.PathLike[str] | None = None) -> list[Analysis]:
    """Analyses of the specs under ``folder``, leaving out files that others there include."""
    files = spec_files(folder)
    results = [analyze_file(p, root=root) for p in files]
    included = {os.path.realpath(f) for a in results for f in a.files[1:]}
    return [a for p, a in zip(files, results) if os.path.realpath(p) not in included]


def parse_dir(folder: str | os.PathLike[str], *,
              root: str | os.PathLike[str] | None = None) -> list[Spec]:
    """Parse and check every spec under ``folder`` (see :func:`spec_files`).

    A file included by another file in the folder is part of that spec, not a
    spec of its own.
    """
    if not Path(folder).is_dir():
        raise SpecError([Diagnostic(Span(file=os.fspath(folder)),
                                    f"not a folder: {os.fspath(folder)}")])
    return _raise_or_return(analyze_dir(folder, root=root))


def subjects_of(spec: Spec, relation: Relation, *,
                root: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """A relation's subjects: the inline ones, then the lines of its ``subjects from`` file.

    The file is read relative to the spec's folder, under the rules of
    :mod:`kmec.grammar.files` (confined to ``root``, default the spec's
    repository); blank lines and lines starting with ``#`` are skipped;
    repeated subjects are kept once.

    Raises:
        SpecError: the file is refused or cannot be read (the message names
            the file and the reason, never its contents).
    """
    found = list(relation.subjects)
    if relation.subjects_file:
        text = read_subjects_file(spec, relation, root=root)
        found += [s.strip() for s in text.splitlines()
                  if s.strip() and not s.lstrip().startswith("#")]
    return tuple(dict.fromkeys(found))


def read_subjects_file(spec: Spec, relation: Relation, *,
                       root: str | os.PathLike[str] | None = None) -> str:
    """The text of ``relation``'s ``subjects from`` file (see :func:`subjects_of`).

    Raises:
        SpecError: refused, missing or unreadable.
    """
    base = Path(spec.source).parent if spec.source else Path(".")
    at = relation.span or Span(file=spec.source or "<string>")
    try:
        return read_subjects(base, relation.subjects_file or "",
                             _root(spec.source or "<string>", root))
    except FileRefused as e:
        raise SpecError([Diagnostic(at, e.message, e.hint)]) from None
