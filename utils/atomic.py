"""Atomic writes: a reader never sees a half-written file or folder.

Write to a temporary sibling, then ``os.replace`` it into place (atomic on POSIX when
both live on the same filesystem, which a sibling guarantees). Files end up with the
usual umask-respecting modes (``0666 & ~umask`` for files, ``0777 & ~umask`` for folders,
so 0644 / 0755 under the common umask 022), not the 0600 / 0700 that ``tempfile`` creates,
so a bundle or a run folder can be shared like any other file.

Temporary siblings are named ``.<name>.<random>.tmp``; a process killed mid-write leaves
one behind, and :func:`remove_stale_temps` (called by the writers of run folders, loss
caches and bundles on their next successful write) removes those older than a grace period.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK_LOCK = threading.Lock()
STALE_TEMP_AGE_S = 60.0
"""A temporary sibling untouched for this long belongs to a dead writer."""


def current_umask() -> int:
    """The process umask (read without changing it for longer than two syscalls)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """``0o666 & ~umask``: what ``open(path, "w")`` would have created."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """``0o777 & ~umask``: what ``os.mkdir`` would have created."""
    return 0o777 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (mode ``0666 & ~umask``); returns the final path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Serialise ``obj`` as JSON and write it atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def temp_sibling(path: str | os.PathLike[str]) -> Path:
    """A fresh, unused name ``.<name>.<random>.tmp<suffix>`` next to ``path``.

    For writers that only take a file name (``algo.save(name)``): write there, then
    ``os.replace`` it onto ``path``. The name keeps ``path``'s suffix (SB3 wants ``.zip``)
    and is recognised by :func:`remove_stale_temps` if the writer is killed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, file_mode())
    return Path(tmp)


def remove_stale_temps(
    folder: str | os.PathLike[str], *, older_than_s: float = STALE_TEMP_AGE_S, prefix: str = "."
) -> list[Path]:
    """Delete ``.<name>.<random>.tmp*`` / ``.old`` siblings in ``folder`` left by killed writers.

    Only entries whose name starts with ``prefix`` (``".<name>."`` for one file's temps) and
    untouched for ``older_than_s`` seconds go (a live writer's temp is young; a writer that
    holds a lock on the file may pass 0). Returns what was removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.iterdir():
        name = p.name
        if not name.startswith(prefix) or not name.startswith(".") or not (".tmp" in name or name.endswith(".old")):
            continue
        try:
            if now - p.lstat().st_mtime < older_than_s:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()
            removed.append(p)
        except FileNotFoundError:
            continue
    return removed


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Build a folder in a temporary sibling; move it to ``path`` only if the block succeeds.

    Usage::

        with atomic_dir(out) as tmp:
            (tmp / "a.json").write_text(...)
        # `out` now holds the complete folder; on an exception nothing was written.

    Replacing an existing folder swaps the two in one step where the OS allows it (Linux),
    so a reader sees the old folder or the new one, never no folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, prefix=f".{path.name}.")  # a killed earlier write of this folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, dir_mode())
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists")
            if path.is_dir() and not path.is_symlink() and _exchange(tmp, path):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
                return
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Fail fast (``InputError``) when folder ``path`` cannot be created or written.

    ``what`` names the flag in the message (``--out``). Checks, without writing anything:
    ``path`` is a folder or absent, its nearest existing ancestor is a writable folder.
    """
    from deepinsert.errors import InputError

    p = Path(path)
    if "\x00" in str(p):
        raise InputError(f"{what} {str(p)!r} is not a usable path: it contains a NUL byte")
    try:
        if p.exists() and not p.is_dir():
            raise InputError(f"{what} {str(p)!r} is an existing file, not a folder")
        anc = p if p.exists() else p.parent
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
        if not anc.is_dir():
            raise InputError(f"{what} {str(p)!r}: {str(anc)!r} is a file, so the folder cannot be created")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise InputError(f"{what} {str(p)!r}: no permission to write in {str(anc)!r}")
    except InputError:
        raise
    except (OSError, ValueError) as e:  # NUL bytes, names too long
        raise InputError(f"{what} {str(p)!r} is not a usable path: {e}") from None
    return p
