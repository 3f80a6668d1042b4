"""Canonical JSON and content hashes.

Contents:
    canonical_json()   deterministic JSON text (sorted keys, no whitespace drift)
    sha256_text()      sha256 hex digest of a string
    sha256_bytes()     sha256 hex digest of bytes
    sha256_tensor()    sha256 of a tensor's dtype, shape and raw bytes
    sha256_file()      streaming sha256 of a file
    spec_hash()        sha256 of a spec's canonical JSON (spans and source path excluded)
    atomic_write_bytes() / atomic_write_text()   write-then-rename
    atomic_dir()       build a directory under a temporary name, then rename
    umask()            the process's file-mode creation mask

Files and folders written here get the modes an ordinary ``open``/``mkdir`` would
give them (0644/0755 under umask 022), not the private 0600/0700 of ``mkstemp``
and ``mkdtemp``: a build or an edited model must be readable by another user or
a serving container.

Plans, specs and artifacts are hashed through these functions so that the same
inputs give the same bytes on every machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def canonical_json(value: Any) -> str:
    """Serialise ``value`` to canonical JSON (sorted keys, 2-space indent, LF).

    >>> canonical_json({"b": 1, "a": [1.5, "x"]})
    '{\\n  "a": [\\n    1.5,\\n    "x"\\n  ],\\n  "b": 1\\n}\\n'
    """
    return json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def sha256_text(text: str) -> str:
    """sha256 hex digest of UTF-8 text.

    >>> sha256_text("")[:12]
    'e3b0c44298fc'
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_bytes(data: bytes) -> str:
    """sha256 hex digest of bytes."""
    return hashlib.sha256(data).hexdigest()


def sha256_tensor(tensor: Any) -> str:
    """sha256 of a tensor's dtype, shape and contents (on CPU, contiguous)."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    # view as bytes so bf16 (no numpy dtype) hashes too
    h.update(t.reshape(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def spec_hash(spec: Any) -> str:
    """sha256 of a spec's canonical JSON (its dump leaves out spans and the source path).

    Takes any pydantic model, so this module needs no import of :mod:`kmec.spec`.
    """
    return sha256_text(canonical_json(spec.model_dump(mode="json")))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Streaming sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def umask() -> int:
    """The process's umask (read from /proc where it can be, so no thread sees it change)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half.

    The new file gets ``0o666 & ~umask`` (``mkstemp`` alone would leave it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomic UTF-8 text write (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _open_modes(top: Path) -> None:
    """Give ``top`` and everything under it the modes ``open``/``mkdir`` would have given
    them under the umask (folders and executables ``0o777 & ~umask``, files
    ``0o666 & ~umask``); links are left alone."""
    mask = umask()
    for folder, dirs, files in os.walk(top):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o100
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` on success.

    The folder and everything the body wrote into it get the umask's modes
    (:func:`_open_modes`): ``mkdtemp`` makes the folder 0700, and some writers
    (safetensors' ``save_file``) make their files 0600.
    If the body raises, the temporary directory is removed and ``path`` is left
    as it was. An existing ``path`` (folder, file or link: callers decide
    first whether it may be replaced, see :mod:`kmec.outputs`) is replaced
    only after the new one is complete.

    Raises:
        KmecError: the folder cannot be created or renamed into place (the
            body's own exceptions pass through unchanged).
    """
    from kmec.errors import KmecError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    except OSError as e:
        raise KmecError(f"cannot write {path}: {e.strerror or e}",
                        hint="choose a folder you can write to") from None
    try:
        yield tmp
        _open_modes(tmp)
        old = None
        try:
            if os.path.lexists(path):
                old = path.with_name(f".{path.name}.old.{os.getpid()}")
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                if old is not None:
                    os.replace(old, path)  # put the previous one back
                    old = None
                raise
        except OSError as e:
            raise KmecError(f"cannot write {path}: {e.strerror or e}",
                            hint="choose a folder you can write to") from None
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
