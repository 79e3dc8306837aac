"""Files written whole or not at all: into a temporary file beside the target, renamed over it in one step.

A reader (or a crash, Ctrl-C, SIGTERM) sees the old file or the new one, never half of one, and no temporary
file survives an interruption that Python can see (a SIGKILL leaves a hidden ``.NAME.tmp-*``, never the target
half-written).
"""

from __future__ import annotations

import os
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
