"""Mid-stage checkpoints for exact resume: ``run_dir/checkpoints/<stage>/step-<N>/``.

A checkpoint holds everything the rest of the stage depends on: model and optimizer state through
``torch.distributed.checkpoint`` (DCP, with ``get_state_dict``/``set_state_dict``, so sharded
FSDP2 state is saved and loaded without gathering and one process uses the same path), and, per
rank, the rest: LR scheduler, grad scaler, every RNG (Python, torch CPU, CUDA), the position in
the data order, controller and estimator state, logging accumulators, progress.

Nothing is unpickled on resume (a run directory is something people copy and share): a rank's
extra state is ``extra-rank<R>.json`` (numbers, strings, lists; tuples and non-string keys tagged)
plus ``extra-rank<R>.safetensors`` for its tensors; DCP's ``.metadata`` (a pickle) is read by an
unpickler that admits only DCP's own metadata types, and DCP's non-tensor entries (optimizer
hyper-parameters) are loaded with ``torch.load(weights_only=True)``.

Written atomically: every rank writes into ``step-<N>.tmp``; rank 0 then writes ``meta.json``
(with the size and SHA-256 of every file), fsyncs and renames the directory. A directory without
``meta.json`` (a kill half-way) is never chosen; :meth:`Checkpointer.latest` returns the newest
complete one whose files still match their recorded sizes and checksums, and says which damaged
ones it passed over. The newest ``keep`` are kept.

Stateful plugins (an advantage estimator with a running baseline, say) join in by defining
``state_dict() -> dict`` and ``load_state_dict(dict)``; the PPO stage saves every component
that has them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException

from . import distributed as dist_utils
from .atomic import _fsync_dir, atomic_write_text, disk_full, state_bytes
from .errors import CheckpointError, Interrupted

#: The supported plugin API of this module (see docs/reference/api.md).
__all__ = ["Checkpointer", "CheckpointError", "Interrupted"]

_STEP_DIR = re.compile(r"^step-(\d+)$")
_UNFINISHED = re.compile(r"^step-\d+\.tmp$")


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
        self._verified: dict[Path, str | None] = {}  # checkpoint -> its damage (None: intact)
        self._noticed: set[Path] = set()

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
        """The newest complete checkpoint whose files match their recorded sizes and checksums, if
        any. Damaged ones are passed over with a notice (once each); when every complete checkpoint
        is damaged that is a :class:`CheckpointError` listing them. A collective: every rank calls it."""
        found = self.complete()
        damaged = []
        for step, path in reversed(found):
            if path not in self._verified:  # hashed once per checkpoint, by rank 0 (one shared directory)
                self._verified[path] = dist_utils.broadcast_object(verify(path) if dist_utils.is_main_process() else None)
            problem = self._verified[path]
            if problem is None:
                if damaged and path not in self._noticed:
                    self._noticed.add(path)
                    if dist_utils.is_main_process():
                        print(f"rlhf: warning: {'; '.join(damaged)}; resuming from the previous complete "
                              f"checkpoint {path}", file=sys.stderr)
                return step, path
            damaged.append(f"checkpoint {path} is damaged ({problem})")
        if damaged:
            raise CheckpointError("; ".join(damaged) + "; no complete checkpoint is left to resume from: remove "
                                  f"{self.directory} to restart the stage from its beginning")
        return None

    def remove_unfinished(self) -> list[Path]:
        """Remove ``step-<N>.tmp`` directories (a save that a kill interrupted); returns them."""
        if not self.directory.is_dir():
            return []
        removed = sorted(p for p in self.directory.iterdir() if p.is_dir() and _UNFINISHED.match(p.name))
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

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
        """Write checkpoint ``step`` (a collective: every rank calls it). A full disk is a
        :class:`~rlhf_core.atomic.DiskFullError` naming the directory and the space needed; the
        half-written directory is removed and the previous checkpoints stay complete."""
        final = self.directory / f"step-{step:08d}"
        tmp = self.directory / f"step-{step:08d}.tmp"
        state = _tensor_state(models, optimizers)
        failure = None
        try:
            if dist_utils.is_main_process():
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            dist_utils.barrier()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # DCP's "assuming a single process" notice
                dcp.save(state, checkpoint_id=str(tmp))
            write_extra(tmp, dist_utils.rank(), {**extra, "rng": rng_state(), "step": step})
        except CheckpointException as exc:  # DCP's wrapper of this rank's error
            failure = _wrapped(exc)[0]
        except Exception as exc:  # noqa: BLE001 - reported to every rank below, re-raised
            failure = exc
        # Every rank learns whether any rank failed, so none waits in a barrier for a dead save.
        if float(dist_utils.all_reduce_max(torch.tensor(1.0 if failure is not None else 0.0))) > 0:
            full = disk_full(failure, tmp, state_bytes(state)) if failure is not None else None  # before freeing
            dist_utils.barrier()
            if dist_utils.is_main_process():
                shutil.rmtree(tmp, ignore_errors=True)
            if full is not None:
                raise full from None
            if failure is not None:
                raise failure
            raise CheckpointError(f"checkpoint {final}: another process failed to write its part; the previous "
                                  "checkpoints are kept")
        if dist_utils.is_main_process():
            files = {}
            for file in sorted(tmp.iterdir()):
                with open(file, "rb+") as fh:
                    os.fsync(fh.fileno())
                files[file.name] = {"size": file.stat().st_size, "sha256": _sha256(file)}
            atomic_write_text(tmp / "meta.json", json.dumps({"step": step, "world_size": dist_utils.world_size(),
                                                             "format": FORMAT, "files": files}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            for _, old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist_utils.barrier()
        return final

    # ------------------------------------------------------------------ restoring

    def restore(self, models: dict[str, torch.nn.Module], optimizers: dict[str, Any]) -> dict | None:
        """Load the newest intact checkpoint into ``models``/``optimizers`` and the RNGs; returns
        its ``extra`` dict (with ``step``), or None when there is none. Nothing in it is unpickled
        beyond DCP's own metadata types and plain values."""
        found = self.latest()
        if found is None:
            return None
        step, path = found
        meta = json.loads((path / "meta.json").read_text())
        if meta["world_size"] != dist_utils.world_size():
            raise CheckpointError(f"checkpoint {path} was written by {meta['world_size']} processes; resume it with "
                               f"--nproc {meta['world_size']} (this run has {dist_utils.world_size()})")
        state = _tensor_state(models, optimizers)
        _MetadataOnlyReader(path).read_metadata()  # refused here, with its own message, before DCP reads it
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(state, storage_reader=_MetadataOnlyReader(path), planner=_PlainValuesPlanner(path))
        except CheckpointException as exc:  # DCP wraps every rank's error
            ours = [e for e in _wrapped(exc) if isinstance(e, CheckpointError)]
            if ours:
                raise ours[0] from None
            inner = _wrapped(exc)[0]
            raise CheckpointError(f"checkpoint {path}: could not be loaded: {type(inner).__name__}: {inner}") from None
        for name, model in models.items():
            set_state_dict(model, _optimizer_list(optimizers.get(name)),
                           model_state_dict=state[f"model.{name}"],
                           optim_state_dict=state.get(f"optim.{name}", {}))
        extra = read_extra(path, dist_utils.rank())
        set_rng_state(extra["rng"])
        return extra


#: The checkpoint layout version written in ``meta.json`` (1: before checksums and pickle-free state).
FORMAT = 2


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path) -> str | None:
    """None when checkpoint ``path`` holds every file its ``meta.json`` lists with the recorded size
    and SHA-256, else what is wrong (a missing file, a changed size or checksum, an old format)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        return f"meta.json unreadable: {exc}"
    if meta.get("format") != FORMAT:
        return ("written by an older rlhf whose checkpoints hold pickles, which this version never loads; "
                "restart the stage or resume with the rlhf that wrote it")
    for name, want in meta["files"].items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, {want['size']} were written"
        if _sha256(file) != want["sha256"]:
            return f"{name} does not match its recorded SHA-256"
    return None


# ---------------------------------------------------------------------- state without pickle


def write_extra(directory: Path, rank: int, extra: dict[str, Any]) -> None:
    """``extra-rank<R>.json`` (+ ``.safetensors`` for its tensors), fsynced: see :func:`read_extra`."""
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(_encode(extra, tensors, "extra"))
    if tensors:
        file = directory / f"extra-rank{rank}.safetensors"
        save_file(tensors, str(file))
        with open(file, "rb+") as fh:
            os.fsync(fh.fileno())
    with open(directory / f"extra-rank{rank}.json", "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def read_extra(directory: Path, rank: int) -> dict[str, Any]:
    """What :func:`write_extra` stored: JSON and safetensors, never a pickle."""
    file = directory / f"extra-rank{rank}.json"
    if not file.is_file():
        raise CheckpointError(f"checkpoint {directory}: {file.name} is missing (this rank's state)")
    tensors_file = directory / f"extra-rank{rank}.safetensors"
    try:
        tensors = load_file(str(tensors_file)) if tensors_file.is_file() else {}
        return _decode(json.loads(file.read_text(encoding="utf-8")), tensors)
    except (ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {directory}: {file.name} is not a state this rlhf wrote "
                              f"({type(exc).__name__}: {exc})") from None


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """JSON for ``value``: tuples as ``{"__tuple__": [...]}``, dicts with non-string (or ``__``)
    keys as ``{"__items__": [[k, v], ...]}``, tensors as ``{"__tensor__": key}`` into ``tensors``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                              for k, v in value.items()]}
    raise CheckpointError(f"checkpoint: cannot store {where} of type {type(value).__name__}; a stage's or "
                          "component's state_dict() may hold tensors, numbers, strings, None and lists, tuples "
                          "and dicts of them")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__items__" in value:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def _wrapped(exc: CheckpointException) -> list[BaseException]:
    """The per-rank exceptions inside DCP's CheckpointException."""
    return [failure[0] if isinstance(failure, tuple) else failure for failure in exc.failures.values()]


def _metadata_types() -> set[tuple[str, str]]:
    """What DCP's ``.metadata`` pickle may name: its own metadata classes, torch sizes, dtypes and
    layouts, paths. Nothing that can run code."""
    allowed = {(dcp_metadata.__name__, name) for name, obj in vars(dcp_metadata).items()
               if isinstance(obj, type) and obj.__module__ == dcp_metadata.__name__}
    allowed |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                ("pathlib._local", "PosixPath"), ("collections", "OrderedDict")}
    allowed |= {("torch", name) for name, obj in vars(torch).items()
                if isinstance(obj, (torch.dtype, torch.memory_format))}
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and refuses every other global, so a crafted ``.metadata`` is an error
    instead of code that runs."""

    allowed = _metadata_types()

    def __init__(self, file: Any, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise CheckpointError(f"checkpoint {self.path.parent}: {self.path.name} refers to {module}.{name}, which "
                                  "checkpoint metadata never holds; refusing to load it (it could run code)")
        return super().find_class(module, name)


class _MetadataOnlyReader(FileSystemReader):
    """DCP's file-system reader with :class:`_MetadataUnpickler` for ``.metadata``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with open(path, "rb") as fh:
                metadata = _MetadataUnpickler(fh, path).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path.parent}: {path.name} is not DCP metadata "
                                  f"({type(exc).__name__}: {exc})") from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise CheckpointError(f"checkpoint {path.parent}: {path.name} holds a {type(metadata).__name__}, "
                                  "not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _PlainValuesPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but non-tensor entries (optimizer hyper-parameters) are loaded
    with ``torch.load(weights_only=True)``: plain values only, never arbitrary objects."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"checkpoint {self.path}: entry {read_item.dest_index.fqn!r} is not a plain value "
                                  f"({str(exc).splitlines()[0]}); refusing to load it (it could run code)") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _tensor_state(models: dict[str, torch.nn.Module], optimizers: dict[str, Any]) -> dict[str, Any]:
    """``model.<name>`` / ``optim.<name>`` state dicts (an optimizer, or a list of optimizers of
    that model's parameters, is keyed like its model)."""
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
