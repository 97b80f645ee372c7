"""Mid-stage checkpoints for exact resume: ``run_dir/checkpoints/<stage>/step-<N>/``.

A checkpoint holds everything the rest of the stage depends on: model and optimizer state through
``torch.distributed.checkpoint`` (DCP, with ``get_state_dict``/``set_state_dict``, so sharded
FSDP2 state is saved and loaded without gathering and one process uses the same path), and, per
rank, a ``torch.save`` of the rest: LR scheduler, grad scaler, every RNG (Python, torch CPU, CUDA),
the position in the data order, controller and estimator state, logging accumulators, progress.

Written atomically: every rank writes into ``step-<N>.tmp``; rank 0 then writes ``meta.json``,
fsyncs and renames the directory. A directory without ``meta.json`` (a kill half-way) is never
chosen: :meth:`Checkpointer.latest` returns the newest complete one. The newest ``keep`` are kept.

Stateful plugins (an advantage estimator with a running baseline, say) join in by defining
``state_dict() -> dict`` and ``load_state_dict(dict)``; the PPO stage saves every component
that has them.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist_utils
from .atomic import _fsync_dir, atomic_write_text
from .errors import UserError

#: The supported plugin API of this module (see README "Plugin API").
__all__ = ["Checkpointer", "CheckpointError", "Interrupted"]

_STEP_DIR = re.compile(r"^step-(\d+)$")

class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used as asked (e.g. written by another number of processes)."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM (what schedulers send before preemption)."""

    def __init__(self, signame: str = "SIGINT"):
        super().__init__(signame)
        self.signame = signame


# Set by the signal handler when a checkpoint is due before stopping (checkpoint.on_signal).
_stop = {"signal": None, "honoured": 0}
_stop_lock = threading.Lock()


class honour_stop_requests:
    """Within the block a training loop checks :meth:`Checkpointer.due` at every step, so a signal
    may be deferred to the next step boundary (see :func:`is_honoured`)."""

    def __init__(self, checkpointer: "Checkpointer | None"):
        self.active = checkpointer is not None and checkpointer.on_signal

    def __enter__(self):
        if self.active:
            _stop["honoured"] += 1
        return self

    def __exit__(self, *exc):
        if self.active:
            _stop["honoured"] -= 1


def is_honoured() -> bool:
    """True while a loop that checkpoints on a stop request is running."""
    return _stop["honoured"] > 0


def request_stop(signame: str) -> bool:
    """Ask the training loop to checkpoint and stop at its next step boundary; False when a stop
    was already requested (a second signal stops at once)."""
    with _stop_lock:
        if _stop["signal"] is not None:
            return False
        _stop["signal"] = signame
        return True


def stop_requested() -> str | None:
    """The signal that asked for a checkpoint-and-stop, if any (this rank only)."""
    return _stop["signal"]


class Checkpointer:
    """Saves and restores one stage's checkpoints. ``every``: steps (optimizer steps, or PPO
    iterations) between checkpoints, 0 = none mid-stage; ``keep``: how many to keep;
    ``on_signal``: whether a stop request is honoured with a checkpoint. Inactive (``every=0``,
    ``on_signal=False``) it does nothing."""

    def __init__(self, directory: Path, every: int, keep: int, on_signal: bool):
        self.directory, self.every, self.keep, self.on_signal = Path(directory), every, keep, on_signal
        self.stopping: str | None = None  # set by due() when some rank was asked to stop

    # ------------------------------------------------------------------ choosing

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for child in self.directory.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / "meta.json").is_file():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint, if any."""
        found = self.complete()
        return found[-1] if found else None

    # ------------------------------------------------------------------ saving

    def due(self, step: int, last: int) -> bool:
        """True when step ``step`` (of ``last``) ends with a checkpoint: every ``every`` steps, or
        because a stop was requested on any rank (a collective: every rank calls it each step)."""
        if self.on_signal:
            flag = torch.tensor(1.0 if stop_requested() else 0.0)
            if float(dist_utils.all_reduce_max(flag)) > 0:
                self.stopping = stop_requested() or "SIGTERM"
        periodic = self.every > 0 and step % self.every == 0 and step != last
        return periodic or self.stopping is not None

    def after_save(self) -> None:
        """Stop the run (as an interruption) when the checkpoint was taken because of a signal."""
        if self.stopping is not None:
            raise Interrupted(self.stopping)

    def save(self, step: int, models: dict[str, torch.nn.Module], optimizers: dict[str, Any],
             extra: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` (a collective: every rank calls it)."""
        import torch.distributed.checkpoint as dcp

        final = self.directory / f"step-{step:08d}"
        tmp = self.directory / f"step-{step:08d}.tmp"
        if dist_utils.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist_utils.barrier()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # DCP's "assuming a single process" notice
            dcp.save(_tensor_state(models, optimizers), checkpoint_id=str(tmp))
        extra = {**extra, "rng": rng_state(), "step": step}
        torch.save(extra, tmp / f"extra-rank{dist_utils.rank()}.pt")
        with open(tmp / f"extra-rank{dist_utils.rank()}.pt", "rb+") as fh:
            os.fsync(fh.fileno())
        dist_utils.barrier()
        if dist_utils.rank() == 0:
            atomic_write_text(tmp / "meta.json", json.dumps({"step": step, "world_size": dist_utils.world_size()}))
            for file in tmp.iterdir():
                with open(file, "rb+") as fh:
                    os.fsync(fh.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            for _, old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist_utils.barrier()
        return final

    # ------------------------------------------------------------------ restoring

    def restore(self, models: dict[str, torch.nn.Module], optimizers: dict[str, Any]) -> dict | None:
        """Load the newest complete checkpoint into ``models``/``optimizers`` and the RNGs; returns
        its ``extra`` dict (with ``step``), or None when there is none."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        found = self.latest()
        if found is None:
            return None
        step, path = found
        meta = json.loads((path / "meta.json").read_text())
        if meta["world_size"] != dist_utils.world_size():
            raise CheckpointError(f"checkpoint {path} was written by {meta['world_size']} processes; resume it with "
                               f"--nproc {meta['world_size']} (this run has {dist_utils.world_size()})")
        state = _tensor_state(models, optimizers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path))
        for name, model in models.items():
            set_state_dict(model, _optimizer_list(optimizers.get(name)),
                           model_state_dict=state[f"model.{name}"],
                           optim_state_dict=state.get(f"optim.{name}", {}))
        extra = torch.load(path / f"extra-rank{dist_utils.rank()}.pt", weights_only=False)
        set_rng_state(extra["rng"])
        return extra


def _tensor_state(models: dict[str, torch.nn.Module], optimizers: dict[str, Any]) -> dict[str, Any]:
    """``model.<name>`` / ``optim.<name>`` state dicts (an optimizer, or a list of optimizers of
    that model's parameters, is keyed like its model)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state: dict[str, Any] = {}
    for name, model in models.items():
        optims = _optimizer_list(optimizers.get(name))
        model_sd, optim_sd = get_state_dict(model, optims)
        state[f"model.{name}"] = model_sd
        if optims:
            state[f"optim.{name}"] = optim_sd
    return state


def _optimizer_list(optim: Any) -> list[torch.optim.Optimizer]:
    if optim is None:
        return []
    return list(optim) if isinstance(optim, (list, tuple)) else [optim]


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
