"""What a spec may read: confined, bounded reads of spec files and the files they name.

Contents:
    MAX_SPEC_BYTES / MAX_SUBJECTS_BYTES   size limits of a spec file and a subjects file
    FileRefused        why a file was not read (message and hint; never the file's contents)
    find_root()        the confinement root of a spec: the repository it is in, else its folder
    confine()          a path a spec names (``include``, ``subjects from``) -> the file, if allowed
    read_text_file()   read a regular file under a size limit, as UTF-8 text
    read_subjects()    a ``subjects from`` file's text, every failure one FileRefused

Specs arrive in pull requests and run in CI jobs that hold secrets, so a spec
must not be able to read (and print, or copy into a report) files outside
its project. The rules, in the order they are checked:

- a path a spec names is relative: absolute paths (``/etc/passwd``) and
  ``~`` are refused;
- it stays under the **root**: after resolving ``..`` and every symbolic
  link, the file lies under the root folder (the repository the spec is in,
  found by its ``.git``; else the spec's own folder; ``--root`` overrides);
- it is not hidden: no part of the path as written, and not the file it
  resolves to, starts with ``.`` (``.env``, ``.git/config``);
- it is a regular file (not a device, FIFO, socket or folder) and no larger
  than its limit, and it is not on a kernel file system (``/proc``,
  ``/sys``, ``/dev``), whose files report a size of 0.

Files are opened without blocking (a FIFO cannot hang a read) and read up to
their limit only. A refusal names the file and the rule, never what the file
holds.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_SPEC_BYTES = 4 << 20  # a spec file (the largest example is ~20 kB; 2,000 imported edits ~1 MB)
MAX_SUBJECTS_BYTES = 8 << 20  # a `subjects from` file (~400,000 subjects)
_KERNEL_FS = ("/proc", "/sys", "/dev")


class FileRefused(Exception):
    """A file a spec names, or a spec file, was not read; ``str()`` says why."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def find_root(spec_path: str | os.PathLike[str] | None) -> Path:
    """The confinement root of a spec: the nearest folder above it holding ``.git``,
    else the spec's own folder (the current folder for a spec given as text).

    >>> import tempfile; d = Path(tempfile.mkdtemp()); (d / "s").mkdir()
    >>> find_root(d / "s" / "x.kmec") == (d / "s").resolve()
    True
    >>> (d / ".git").mkdir(); find_root(d / "s" / "x.kmec") == d.resolve()
    True
    """
    if spec_path is None or os.fspath(spec_path) in ("", "<string>"):
        return Path.cwd().resolve()
    folder = Path(os.path.abspath(os.fspath(spec_path))).parent
    for candidate in (folder, *folder.parents):
        if (candidate / ".git").exists():
            return Path(os.path.realpath(candidate))
    return Path(os.path.realpath(folder))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def confine(base_dir: str | os.PathLike[str], target: str, root: str | os.PathLike[str],
            what: str) -> Path:
    """The file ``target`` (written in a spec in ``base_dir``) names, if a spec may read it.

    Args:
        base_dir: the folder the path is relative to (the naming spec's folder).
        target: the path as written in the spec.
        root: the confinement root (:func:`find_root`).
        what: ``"included file"`` or ``"subjects file"``, for messages.

    Raises:
        FileRefused: an absolute path, an escape from the root (by ``..`` or a
            symbolic link), or a hidden file.

    >>> import tempfile; d = Path(tempfile.mkdtemp())
    >>> confine(d, "/etc/passwd", d, "subjects file")
    Traceback (most recent call last):
    kmec.grammar.files.FileRefused: subjects file '/etc/passwd' is an absolute path
    """
    hint = (f"spec files may read only files under their root {os.fspath(root)} "
            "(the repository they are in, or --root), named by relative paths")
    if "\0" in target:
        raise FileRefused(f"{what} {target!r} is not a valid path", hint)
    if os.path.isabs(target) or target.startswith("~"):
        raise FileRefused(f"{what} {target!r} is an absolute path", hint)
    parts = Path(target).parts
    if any(p.startswith(".") and p not in (".", "..") for p in parts):
        raise FileRefused(f"{what} {target!r} is hidden (a part of its path starts with '.')",
                          "kmec does not read hidden files such as .env or .git/ for a spec")
    root_real = os.path.realpath(os.fspath(root))
    joined = os.path.normpath(os.path.join(os.path.abspath(os.fspath(base_dir)), target))
    real = os.path.realpath(joined)
    if not _under(real, root_real):
        lexical = _under(joined, os.path.normpath(os.path.abspath(os.fspath(root))))
        if lexical or _under(joined, root_real):
            raise FileRefused(f"{what} {target!r} is a symbolic link that leaves the root "
                              f"{os.fspath(root)}", hint)
        raise FileRefused(f"{what} {target!r} lies outside the root {os.fspath(root)}", hint)
    if Path(real).name.startswith("."):
        raise FileRefused(f"{what} {target!r} resolves to a hidden file",
                          "kmec does not read hidden files such as .env for a spec")
    return Path(os.path.normpath(Path(base_dir) / target))  # as the user would write it


def read_text_file(path: str | os.PathLike[str], *, limit: int, what: str) -> str:
    """Read ``path`` as UTF-8 text (BOM dropped, newlines normalised), if it is a regular
    file of at most ``limit`` bytes outside the kernel's file systems.

    Raises:
        FileNotFoundError: no such file.
        FileRefused: a folder, device, FIFO or socket, a kernel file, or too large.
        UnicodeDecodeError: not UTF-8.
        OSError: any other reason the file cannot be read.
    """
    name = os.fspath(path)
    real = os.path.realpath(name)
    if any(_under(real, k) for k in _KERNEL_FS):
        raise FileRefused(f"{what} {name} is a kernel file ({real}), not a file of yours",
                          "kmec reads only regular files for a spec")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags)
    except IsADirectoryError:
        raise FileRefused(f"{what} {name} is a folder, not a file") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise FileRefused(f"{what} {name} is a folder, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{what} {name} is not a regular file (a device, FIFO or socket)",
                              "kmec reads only regular files")
        if st.st_size > limit:
            raise FileRefused(f"{what} {name} is {st.st_size:,} bytes, over the limit of "
                              f"{limit:,}", "split it into smaller files")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while being read
        raise FileRefused(f"{what} {name} is over the limit of {limit:,} bytes")
    text = data.decode("utf-8").removeprefix("\ufeff")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_subjects(base_dir: str | os.PathLike[str], name: str,
                  root: str | os.PathLike[str]) -> str:
    """The text of the ``subjects from`` file ``name`` (relative to ``base_dir``), read under
    the rules above; every reason it cannot be read is one :class:`FileRefused`.

    Raises:
        FileRefused: refused, missing, not UTF-8, or unreadable (message and hint).
    """
    path = Path(base_dir) / name
    try:
        path = confine(base_dir, name, root, "subjects file")
        return read_text_file(path, limit=MAX_SUBJECTS_BYTES, what="subjects file")
    except FileNotFoundError:
        raise FileRefused(f"subjects file {name!r} not found",
                          f"looked for {path}; paths are relative to the spec's folder") from None
    except UnicodeDecodeError as e:
        raise FileRefused(f"subjects file {name!r} is not UTF-8 text ({e.reason} at byte "
                          f"{e.start})") from None
    except OSError as e:
        raise FileRefused(f"cannot read subjects file {name!r}: {e.strerror or e}") from None
