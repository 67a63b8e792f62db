"""Crash-safe writes: a file or a folder appears complete or not at all.

Every artifact rslora_fast writes (adapter folders, merged and 4-bit checkpoints, GGUF files) goes
through one of the two context managers here:

- :func:`atomic_file` writes to a temporary sibling file, fsyncs it and renames it over ``path``.
- :func:`atomic_dir` builds the new folder as a temporary sibling, fsyncs every file in it, then
  swaps it with ``target`` (one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two
  renames, with the old folder kept complete under a hidden name in between) and fsyncs the parent.

Until the swap, ``target`` is exactly what it was before; if the body raises (or the disk fills),
the temporary sibling is removed and ``target`` is untouched. A process killed mid-write leaves at
most a hidden ``.NAME.tmp-PID-*`` sibling, which the next write to the same target removes (and, with
the two-rename fallback, a complete ``.NAME.old-PID-*``, which that write puts back if ``target`` is
missing).

Files already in ``target`` that the new artifact does not own (a tokenizer saved beside an adapter,
a trainer's ``trainer_state.json``) are carried over into the new folder by hard link, so replacing
an artifact never deletes its neighbours; files matching ``owned`` are the artifact's own and are
dropped when the new version does not write them (a stale shard never survives a re-save).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fnmatch
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file", "fsync_tree"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms cannot open folders; the data files were synced anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under ``root``, then every folder (deepest first), so all of it is on disk."""
    root = Path(root)
    dirs = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        dirs.extend(Path(dirpath) / d for d in dirnames)
    for d in reversed(dirs):
        _fsync_path(d, directory=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours
        return True
    return True


def _owner_pid(path: Path, target: Path, kind: str) -> int | None:
    try:
        return int(path.name[len(f".{target.name}.{kind}-") :].split("-", 1)[0])
    except ValueError:
        return None


def _remove_stale(target: Path) -> None:
    """Clean up after processes that died mid-save: drop their temporaries, restore an old version.

    A ``.NAME.tmp-PID-*`` sibling is an unfinished new version: removed. A ``.NAME.old-PID-*``
    sibling is a complete previous version caught between the two renames of the fallback swap:
    put back when ``target`` is missing, else removed.
    """
    for kind in ("old", "tmp"):
        for p in sorted(target.parent.glob(f".{target.name}.{kind}-*")):
            pid = _owner_pid(p, target, kind)
            if pid is None or pid == os.getpid() or _pid_alive(pid):
                continue
            if kind == "old" and not target.exists():
                os.replace(p, target)
            elif p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _tmp_sibling(target: Path) -> Path:
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2``); False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0  # EINVAL/ENOSYS (filesystem or kernel without it): fall back


def _carry_over(old: Path, new: Path, owned: Iterable[str]) -> None:
    """Hard-link (else copy) the files of ``old`` that ``new`` lacks and the artifact does not own."""
    owned = tuple(owned)
    for src in old.rglob("*"):
        rel = src.relative_to(old)
        dst = new / rel
        if src.is_dir() or dst.exists() or any(fnmatch.fnmatch(rel.as_posix(), pat) for pat in owned):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _replace_dir(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp)  # tmp now holds the previous version
    else:
        old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)  # a crash right here leaves the old version complete under `old`
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_path(target.parent, directory=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, owned: Iterable[str] = ("*",)) -> Iterator[Path]:
    """Build a folder in a temporary sibling; on success it replaces ``target`` in one step.

    Args:
        target: the folder to create or replace.
        owned: glob patterns (relative to ``target``) of the files this artifact writes; existing
            files of ``target`` matching none of them are kept (carried into the new folder).
            The default ``("*",)`` replaces the whole folder.

    Yields:
        The temporary folder to write into (empty).

    Raises:
        Whatever the body raises; ``target`` is then unchanged and the temporary folder removed.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{str(target)!r} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = _tmp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        if target.is_dir():
            _carry_over(target, tmp, owned)
        fsync_tree(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Write one file through a temporary sibling; on success it replaces ``path`` in one step.

    Yields:
        The temporary path to write to (it does not exist yet).

    Raises:
        Whatever the body raises; ``path`` is then unchanged and the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent, directory=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
