"""Files written whole or not at all: into a temporary file beside the target, renamed over it in one step.

A reader (or a crash, Ctrl-C, SIGTERM) sees the old file or the new one, never half of one, and no temporary
file survives an interruption that Python can see (a SIGKILL leaves a hidden ``.NAME.tmp-*``, never the target
half-written).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def savefig_atomic(fig, path: str | Path, **kwargs) -> Path:
    """``fig.savefig(path, **kwargs)`` atomically (the temporary file keeps the suffix that picks the format)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, **kwargs)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def output_lock(path: str | Path, what: str = "OUT"):
    """Hold ``path``'s writer lock (an exclusive ``flock`` on ``.NAME.lock`` beside it) for the block: a second
    run writing the same target stops at once with one line, instead of both reporting success with one result
    silently replacing the other. The lock file is removed on the way out; where ``fcntl`` is missing (Windows)
    the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    path = Path(path)
    lock = path.absolute().parent / f".{path.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(f"{what} {path} is being written by another mosa-retrofit run (pid {holder}); wait for "
                             "it or choose another path") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file its holder had just removed: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # (before the lock is released: a waiting run then locks a new file)
    finally:
        os.close(fd)


def replace_folder(tmp: str | Path, target: str | Path) -> None:
    """Publish the finished folder ``tmp`` at ``target`` by renames: an existing ``target`` waits aside
    (``.old-NAME``) until ``tmp`` is in place and is then removed; interrupted in between, it is put back."""
    tmp, target = Path(tmp), Path(target)
    old = target.with_name(f".old-{target.name}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)  # (one a SIGKILL left beside a target that is whole)
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target: str | Path, prefix: str | None = None, publish=replace_folder):
    """A fresh hidden folder beside ``target`` (``prefix``, default ``.tmp-NAME-``) to fill in the block; when the
    block ends, ``publish(tmp, target)`` puts it in place (by default ``replace_folder``); if the block or the
    publishing fails, the temporary folder is removed (a SIGKILL leaves it for the writer's own sweep)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix or f".tmp-{target.name}-"))
    try:
        yield tmp
        publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # (gone after a rename: nothing to remove)
