"""Atomic writes: a reader (or a later run) sees the old file or directory, or the complete new one,
never a torn one, even when the process is killed half-way.

Files: write a temp file in the same directory, fsync, ``os.replace``, fsync the directory.
Directories (checkpoints): write into a hidden temp directory beside the target, fsync every file,
then swap it in with one ``renameat2(RENAME_EXCHANGE)`` where Linux offers it (else two renames).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from .errors import DiskFullError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
#: The hidden temp names this module writes: ``.<name>.tmp-<pid>`` and ``.<name>.old-<pid>``.
_ORPHAN = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")


def _mb(size: float) -> str:
    return f"{size / 2**20:.1f} MB"


def disk_full(exc: BaseException, path: Path, needed_bytes: int | None) -> DiskFullError | None:
    """A :class:`DiskFullError` for ``exc`` when it is ENOSPC/EDQUOT while writing ``path``, else None.
    (safetensors reports it as its own error type with the OS error in the text.)"""
    if isinstance(exc, DiskFullError):
        return exc
    text = str(exc)
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    # torch.save's zip writer hides the OS error ("unexpected pos ..."): an empty filesystem tells.
    said = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded"))
    if not said and not (needed_bytes and free < min(needed_bytes, 2**20)):
        return None
    need = f"it needs about {_mb(needed_bytes)}, " if needed_bytes else ""
    return DiskFullError(f"no space left on the device while writing {path}: {need}{_mb(free)} free there; free "
                         f"some space or write the run elsewhere (--out); the previous version of {path.name} is kept")


@contextlib.contextmanager
def disk_full_reported(path: Path, needed_bytes: int | None) -> Iterator[None]:
    """Within the block, a full disk is raised as :class:`DiskFullError` (see :func:`disk_full`);
    any other error passes unchanged. Free space is measured before an enclosing cleanup frees any."""
    try:
        yield
    except Exception as exc:
        full = disk_full(exc, path, needed_bytes)
        if full is None or full is exc:
            raise
        raise full from None


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: what a checkpoint of it needs on disk, about."""
    if hasattr(state, "element_size") and hasattr(state, "numel"):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with disk_full_reported(path, len(text.encode())):
            with tmp.open("w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so that it dumps as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def dumps_strict(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes ``NaN``/``Infinity`` (they become ``null``)."""
    return json.dumps(strict_json(value), allow_nan=False, **kwargs)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def remove_orphans(directory: Path) -> list[Path]:
    """Remove the hidden temp directories and files (``.<name>.tmp-<pid>``, ``.<name>.old-<pid>``)
    in ``directory`` whose writing process is gone (a kill half-way); returns what was removed."""
    removed = []
    if not Path(directory).is_dir():
        return removed
    for child in Path(directory).iterdir():
        match = _ORPHAN.match(child.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        removed.append(child)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


@contextlib.contextmanager
def atomic_dir(path: str | Path, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temp directory to fill; on success it replaces ``path`` in one step. On any error
    (or a kill) ``path`` keeps its previous contents, or stays absent. A full disk is a
    :class:`DiskFullError` naming ``path`` and ``needed_bytes`` (an estimate of what it holds)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with disk_full_reported(path, needed_bytes):
            yield tmp
            for file in tmp.rglob("*"):
                if file.is_file():
                    with file.open("rb+") as fh:
                        os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if path.exists() and _exchange(tmp, path):
                shutil.rmtree(tmp)  # now holds the previous contents
            else:
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                if path.exists():
                    os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
