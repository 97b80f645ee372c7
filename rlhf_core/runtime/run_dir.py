"""The run directory: created, locked by the run that owns it, emptied with ``--overwrite``, and
cleaned of what a killed run left half-written.

Layout: ``config.yaml`` (resolved), ``metrics.jsonl`` (one stage-tagged line per logged step),
``<stage>/`` (the stage's output: ``save_pretrained``), ``checkpoints/<stage>/step-N/``,
``plots/<stage>.png``, ``summary.json`` (``status``, ``stages_completed``, final metrics per stage
plus headline numbers) and ``.lock`` (held by the run that owns the directory). Every file in it
is written atomically, so a reader sees the previous or the complete new version of each file.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .. import distributed as dist_utils
from ..atomic import remove_orphans
from ..errors import RunDirError

#: Files whose presence marks a directory as an rlhf run directory (and so safe to --overwrite).
RUN_MARKERS = ("config.yaml", "summary.json", "metrics.jsonl", ".lock")


class RunDir:
    """An output directory owned by this process: created, locked (``.lock`` holds our pid) and,
    with ``overwrite``, emptied of the previous run. :meth:`close` releases the lock."""

    def __init__(self, out: str | None, overwrite: bool, resume: bool = False):
        self._lock = None
        if dist_utils.is_main_process():
            try:
                self.path = Path(out) if resume else self._create(out, overwrite)
                self._lock = self._acquire()
                if overwrite:
                    self._clear()
            except RunDirError as exc:
                dist_utils.broadcast_object(("error", str(exc)))
                raise
            dist_utils.broadcast_object(("ok", str(self.path)))  # every rank uses rank 0's directory
        else:
            status, value = dist_utils.broadcast_object(None)
            if status == "error":
                raise RunDirError(value)
            self.path = Path(value)

    @staticmethod
    def _create(out: str | None, overwrite: bool) -> Path:
        if out is None:
            # Seconds plus a random suffix: two runs started in the same second never share a directory.
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for _ in range(100):
                path = Path("runs") / f"{stamp}-{os.urandom(2).hex()}"
                try:
                    path.mkdir(parents=True)
                    return path
                except FileExistsError:
                    continue
                except OSError as exc:
                    raise RunDirError(f"cannot create run directory {path}: {exc.strerror}") from None
            raise RunDirError("could not find a free run directory name under runs/")
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"--out {path}: is a file, not a directory")
        if path.is_dir() and any(path.iterdir()):
            if not overwrite:
                raise RunDirError(f"output directory {path} exists and is not empty; choose another --out or pass --overwrite")
            if not any((path / m).exists() for m in RUN_MARKERS):
                raise RunDirError(f"--overwrite: {path} does not look like an rlhf run directory (none of "
                                  f"{', '.join(RUN_MARKERS)}); refusing to delete its contents")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create run directory {path}: {exc.strerror}") from None
        return path

    def _acquire(self):
        try:
            handle = (self.path / ".lock").open("a+", encoding="utf-8")
        except OSError as exc:
            raise RunDirError(f"run directory {self.path} is not writable: {exc.strerror}") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunDirError(f"run directory {self.path} is in use by another rlhf run (pid {holder}); "
                              "wait for it, stop it, or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return handle

    def _clear(self) -> None:
        """Remove everything of the previous run (after validation passed and the lock is ours)."""
        for child in self.path.iterdir():
            if child.name == ".lock":
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def close(self) -> None:
        """Release the lock (the file stays; a later run takes it over)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_run_dir(out: str | None, overwrite: bool) -> Path:
    """Create (and with ``overwrite`` empty) a run directory without holding its lock."""
    with RunDir(out, overwrite) as run_dir:
        return run_dir.path


def remove_leftovers(run_dir: Path, checkpointers: Any, echo=print) -> list[Path]:
    """Remove what a killed run left half-written: hidden temp files and directories of atomic
    writes whose writer is gone (``.<name>.tmp-<pid>``) and unfinished checkpoints
    (``step-<N>.tmp``; the run's lock says no other run is writing them). Says what it removed."""
    removed = remove_orphans(run_dir)
    for checkpointer in checkpointers:
        removed += checkpointer.remove_unfinished()
    if removed:
        names = ", ".join(str(p.relative_to(run_dir)) for p in removed)
        echo(f"rlhf: removed {len(removed)} half-written file(s) left by a killed run: {names}")
    return removed


def read_summary(run_dir: Path) -> dict[str, Any]:
    """``summary.json`` of a run directory ({} when there is none or it is unreadable)."""
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
