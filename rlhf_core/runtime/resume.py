"""``--resume``: what a run directory must hold to continue, and the config changes a resumed run
may not make (it must compute what the original would have)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from .. import config as cfgmod
from .. import distributed as dist_utils
from ..errors import ConfigError, RunDirError
from .run_dir import read_summary

#: Config keys a resumed run may change: they affect logging and checkpointing, not results.
RESUME_HARMLESS = ("checkpoint.every", "checkpoint.keep", "checkpoint.on_signal", "stages[*].train.log_every")


def check_resumable(run_dir: Path) -> str | None:
    """Raise :class:`RunDirError` when ``run_dir`` holds nothing to resume; return a message (and
    nothing to do) when its run already finished; None when it can be resumed."""
    if not run_dir.is_dir():
        raise RunDirError(f"--resume {run_dir}: no such directory")
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"--resume {run_dir}: nothing to resume (no config.yaml: not an rlhf run directory, or the "
                          "run stopped before it started)")
    if read_summary(run_dir).get("status") == "finished":
        return f"run {run_dir} already finished; nothing to resume (summary.json status: finished)"
    for meta in sorted((run_dir / "checkpoints").glob("*/step-*/meta.json")):
        try:
            written = json.loads(meta.read_text()).get("world_size")
        except (OSError, ValueError):
            continue  # a damaged checkpoint: the checkpointer passes over it with a notice
        if written is not None and written != dist_utils.planned_world_size():
            raise RunDirError(f"--resume {run_dir}: its checkpoints were written by {written} processes; resume with "
                              f"--nproc {written} (the same world size gives the same weights)")
    return None


def refuse_changes(run_dir: Path, prepared: Any) -> None:
    """A resumed run must compute what the original would have: any difference between the run's
    own ``config.yaml`` and the resolved config of ``prepared`` (:class:`~rlhf_core.runtime.pipeline.Prepared`), except :data:`RESUME_HARMLESS`, is an error that
    lists each change."""
    saved = cfgmod.flatten(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {})
    now = cfgmod.flatten(cfgmod.to_plain(prepared.config))
    harmless = [re.compile("^" + re.escape(k).replace(r"\*", r"\d+") + "$") for k in RESUME_HARMLESS]
    changes = [f"{key}: {saved.get(key, '(unset)')!r} -> {now.get(key, '(unset)')!r}"
               for key in sorted(set(saved) | set(now))
               if saved.get(key) != now.get(key) and not any(h.match(key) for h in harmless)]
    if changes:
        raise ConfigError(
            [f"{c} (a resumed run must compute what the original would have; only "
             f"{', '.join(RESUME_HARMLESS)} may change)" for c in changes], f"--resume {run_dir}")
