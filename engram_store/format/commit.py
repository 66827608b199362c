"""The atomic directory commit: how a store (or a sharded store) appears at its path.

Everything is written into a sibling ``.<name>.partial-<random>`` directory. :meth:`PartialDir.commit`
fsyncs every file and directory in it, then puts it at the target path in one step: over an
existing target with ``renameat2(RENAME_EXCHANGE)`` (the path always names a whole store, old or
new, even across a kill -9 or a power cut), then fsyncs the parent and removes the old copy.
Only where the kernel or filesystem lacks RENAME_EXCHANGE is the old copy renamed aside to
``.<name>.old-<random>`` first (a crash between the two renames leaves the old store there).

Errors are not swallowed: a failed fsync or rename raises :class:`StoreWriteError`, the partial
directory is removed and the old store stays at the path, whole.

A writer holds an ``flock`` on its partial directory while it exists, so a later writer to the same
target can tell the partial directories of writers that died (unlocked: removed) from those of
writers still running (locked: left alone). A writer's scratch directories beside the target (an
import's ``.<name>.<table>.import-<random>`` bucket files) live only while its partial directory
does, so they are a dead writer's when no partial directory of the target is locked, and are swept
then.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import uuid
from pathlib import Path

from engram_store.errors import StoreWriteError

# renameat2 failing with these means "not supported here", not "failed": use the fallback.
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames and new names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, children before their directory."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``).

    False where the kernel, libc or filesystem lacks it; any other failure raises OSError.
    """
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(err)}")


def _try_lock(path: Path) -> int | None:
    """An fd holding ``flock(LOCK_EX)`` on directory ``path``, or None if another process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


SCRATCH_MARK = ".import-"  # in a scratch directory's name: .<name>.<tag>.import-<random>


def leftover_kind(target: Path, d: Path) -> str | None:
    """"partial", "old" or "scratch" when ``d``'s name is one of ``target``'s writer siblings, else None."""
    name, pre = d.name, f".{Path(target).name}."
    if not name.startswith(pre):
        return None
    rest = name[len(pre):]
    if rest.startswith("partial-"):
        return "partial"
    if rest.startswith("old-"):
        return "old"
    return "scratch" if SCRATCH_MARK in rest else None


def is_locked(d: Path) -> bool:
    """True while a running writer holds ``d``'s flock (False for a dead writer's directory, or none)."""
    fd = _try_lock(d)
    if fd is None:
        return Path(d).exists()
    os.close(fd)
    return False


def sweep_stale(target: Path) -> list[Path]:
    """Remove the leftovers of dead writers to ``target``: unlocked ``.<name>.partial-*`` siblings,
    ``.<name>.old-*`` ones when ``target`` itself exists (else an old copy may be the only store), and
    scratch ones (``.<name>.<tag>.import-*``) when no writer of ``target`` is running."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    removed = []
    siblings = [(d, leftover_kind(target, d)) for d in parent.iterdir()]
    writing = any(k == "partial" and is_locked(d) for d, k in siblings)
    for d, kind in siblings:
        if (kind is None or (kind == "old" and not target.exists()) or (kind == "scratch" and writing)
                or not d.is_dir()):
            continue
        fd = _try_lock(d)
        if fd is None:
            continue  # a running writer's, or gone already
        try:
            shutil.rmtree(d, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(d)
    return removed


class PartialDir:
    """A new directory for ``target``, written in place and committed atomically.

    ``path`` is the partial directory to write into. :meth:`commit` puts it at ``target``;
    :meth:`abort` (or leaving a ``with`` block without committing) removes it. One thread.
    """

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(self.target)
        self.path = self.target.parent / f".{self.target.name}.partial-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()
        self._lock_fd = _try_lock(self.path)  # never contended: the name is fresh
        self.done = False

    def commit(self) -> Path:
        """fsync the partial directory's tree, swap it in, fsync the parent, remove the old copy."""
        if self.done:
            raise StoreWriteError(f"{self.path} was already committed or aborted")
        try:
            fsync_tree(self.path)
            self._swap_in()
        except OSError as e:
            self.abort()
            raise StoreWriteError(
                f"committing {str(self.target)!r} failed: {e}; nothing was committed and any earlier store "
                "there is unchanged: check the disk (space, permissions, I/O errors) and write again"
            ) from e
        self.done = True
        self._unlock()
        return self.target

    def _swap_in(self) -> None:
        parent = self.target.parent
        if self.target.exists() and exchange(self.path, self.target):
            # The new tree is at target, the old one at self.path.
            try:
                fsync_path(parent)
            except OSError:
                exchange(self.path, self.target)  # put the old store back before reporting
                raise
            shutil.rmtree(self.path, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = parent / f".{self.target.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(self.target, old)
        try:
            os.rename(self.path, self.target)
            fsync_path(parent)
        except OSError:
            if old is not None:
                if self.target.exists():
                    os.rename(self.target, self.path)
                os.rename(old, self.target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove the partial directory (whatever it holds); idempotent."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.done = True
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "PartialDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.done:
            self.abort()
