"""Where kmec may write: outputs are new paths, or replace only what kmec wrote.

Contents:
    MARKER          the file kmec puts in every folder it writes (``.kmec-output``)
    FOLDER_KINDS    the kinds of folder kmec writes, and how older kmec folders are recognised
    FILE_KINDS      the kinds of single file kmec writes, and how they are recognised
    check_output()  refuse an output path that would destroy something not kmec's
    write_marker()  put the marker into a folder being written
    ensure_folder() create (or reuse) an output folder that files are written into

``kmec compile -o DIR`` replaces ``DIR`` as a whole, atomically. That is
right for the build it wrote last time and wrong for anything else, so every
command that writes checks its output first:

- a path that does not exist, or an empty folder, is always fine;
- a folder is replaced only if it holds kmec's marker of the same kind (or,
  for folders older kmec versions wrote, that kind's telltale files:
  ``plan.json`` and ``build.json`` for a build); a file is replaced only if
  kmec wrote it (an imported spec's header, a bench table's first line);
- ``--force`` replaces anything else, except what is never replaced: one of
  the command's inputs (or a folder holding one), the current folder or a
  folder above it, the home folder, and the kernel's file systems.

Refusals are :class:`OutputError` (exit code 2) naming the path, what it
holds and ``--force``; nothing is touched before the check.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from kmec._version import __version__
from kmec.errors import KmecError

MARKER = ".kmec-output"
_FORMAT = "kmec-output/1"
_KERNEL_FS = ("/proc", "/sys", "/dev")

# kind -> (what it is called, files that mark a folder an older kmec wrote as this kind)
FOLDER_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "build": ("build directory", ("plan.json", "build.json")),
    "edited-model": ("edited model folder", ("kmec_edit.json",)),
    "base-model": ("restored base model folder", ()),
    "report": ("report folder", ("report.json", "junit.xml")),
    "trace": ("trace folder", ("traces.json",)),
}
_IMPORTED = re.compile(r"# Imported from .* by kmec ")
BENCH_TABLE_HEAD = "<!-- kmec bench table -->"
# kind -> (what it is called, does its first line say kmec wrote it)
FILE_KINDS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "spec": ("imported spec", lambda first: bool(_IMPORTED.match(first))),
    "bench-table": ("bench table", lambda first: first.strip() == BENCH_TABLE_HEAD),
}


class OutputError(KmecError):
    """An output path kmec will not write to (exit code 2)."""


def _under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _marker_kind(folder: Path) -> str | None:
    try:
        raw = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw.get("kind") if isinstance(raw, dict) and raw.get("format") == _FORMAT else None


def _folder_kind(folder: Path) -> str | None:
    """The kind of kmec output ``folder`` is, by marker or by older kmec's files."""
    marked = _marker_kind(folder)
    if marked is not None:
        return marked
    for kind, (_, telltales) in FOLDER_KINDS.items():
        if telltales and all((folder / t).is_file() for t in telltales):
            return kind
    return None


def _first_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(4096).decode("utf-8", "replace").split("\n", 1)[0]
    except OSError:
        return ""


def _refuse(message: str, hint: str | None = None) -> OutputError:
    return OutputError(message, hint=hint)


def _never(path: Path, real: Path, inputs: Iterable[str | os.PathLike[str]], flag: str) -> None:
    """Refusals ``--force`` does not lift."""
    if any(_under(real, Path(k)) for k in _KERNEL_FS):
        raise _refuse(f"{flag} {path} is on a kernel file system ({real})",
                      "write to a folder of yours")
    cwd = _real(Path.cwd())
    if _under(cwd, real):
        raise _refuse(f"{flag} {path} is the current folder or a folder above it; writing "
                      "it would replace everything in it", f"name a new folder, e.g. {flag} build")
    if real == _real(Path.home()):
        raise _refuse(f"{flag} {path} is your home folder", "name a new folder")
    for given in inputs:
        item = _real(given)
        if _under(item, real):
            what = "is" if item == real else "holds"
            raise _refuse(f"{flag} {path} {what} one of this command's inputs ({given}); "
                          "writing it would destroy the input", "write to another path")
    parent = Path(os.path.abspath(os.fspath(path))).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise _refuse(f"cannot write {flag} {path}: {parent} is a file, not a folder",
                      "choose a path inside a folder")


def check_output(path: str | os.PathLike[str], kind: str, *,
                 inputs: Iterable[str | os.PathLike[str]] = (), force: bool = False,
                 flag: str = "--out") -> Path:
    """Check that the command may write (and replace) ``path``; return it.

    Args:
        path: the output path.
        kind: a key of :data:`FOLDER_KINDS` (a folder) or :data:`FILE_KINDS` (a file).
        inputs: paths the command reads; the output may not be one or hold one.
        force: replace an existing file or folder that kmec did not write.
        flag: the option's name, for messages.

    Raises:
        OutputError: the path may not be written (see the module docstring).
    """
    p = Path(path)
    real = _real(p)
    _never(p, real, inputs, flag)
    if not os.path.lexists(p):
        return p
    is_folder_kind = kind in FOLDER_KINDS
    name = (FOLDER_KINDS[kind][0] if is_folder_kind else FILE_KINDS[kind][0])
    force_hint = ("choose a new path, or pass --force to replace it (everything in it "
                  "is lost)")
    if p.is_symlink():
        if force:
            return p
        raise _refuse(f"{flag} {p} is a symbolic link (to {real}); kmec does not write "
                      "through links", force_hint)
    if p.is_dir():
        if not is_folder_kind:
            raise _refuse(f"{flag} {p} is a folder; kmec writes a {name} (a file) here",
                          "name a file")
        if not any(p.iterdir()):
            return p
        found = _folder_kind(p)
        if found == kind or force:
            return p
        what = (f"a kmec {FOLDER_KINDS[found][0]}, not a {name}" if found in FOLDER_KINDS
                else "files kmec did not write")
        raise _refuse(f"{flag} {p} already exists and holds {what}", force_hint)
    if is_folder_kind:
        if force:
            return p
        raise _refuse(f"{flag} {p} is a file; kmec writes a {name} (a folder) here", force_hint)
    if not p.is_file():
        raise _refuse(f"{flag} {p} is not a regular file (a device, FIFO or socket)",
                      "name a regular file")
    if force or FILE_KINDS[kind][1](_first_line(p)):
        return p
    raise _refuse(f"{flag} {p} already exists and kmec did not write it", force_hint)


def write_marker(folder: str | os.PathLike[str], kind: str) -> None:
    """Mark ``folder`` as a kmec output of ``kind`` (written inside it before it is renamed)."""
    text = json.dumps({"format": _FORMAT, "kind": kind, "kmec_version": __version__},
                      sort_keys=True) + "\n"
    Path(folder, MARKER).write_text(text, encoding="utf-8")


def ensure_folder(path: str | os.PathLike[str], kind: str) -> Path:
    """Create the output folder ``path`` (checked before with :func:`check_output`) and mark it.

    Raises:
        OutputError: it cannot be created or written (permissions, a read-only disk).
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        if _marker_kind(p) != kind:
            write_marker(p, kind)
    except OSError as e:
        raise _refuse(f"cannot write to {p}: {e.strerror or e}",
                      "choose a folder you can write to") from None
    return p
