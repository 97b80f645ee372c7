"""Runs a pipeline of stages and owns the run directory.

Run directory layout: ``config.yaml`` (resolved), ``metrics.jsonl`` (one stage-tagged line per
logged step), ``<stage>/`` (the stage's checkpoint: ``save_pretrained`` output), ``plots/<stage>.png``,
``summary.json`` (``status``, ``stages_completed``, final metrics per stage plus headline numbers)
and ``.lock`` (held by the run that owns the directory).

Before anything trains, :func:`preflight` checks every stage's data and model sources; the run
directory is then locked, cleared when ``--overwrite`` was given, and every file in it is written
atomically, so a reader sees the previous or the complete new version of each file.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from . import config as cfgmod
from . import distributed as dist_utils
from .atomic import atomic_write_text
from .data import DataError, DataNotes, load_records
from .interfaces import StageContext, StageResult
from .models import check_model_source, resolve_device
from .plugins import add_modules, build_registry, get_plugin_manager
from .registry import Registry
from .tracking import Tracker, format_table, is_main_process, write_summary
from .training import seed_everything

#: Files whose presence marks a directory as an rlhf run directory (and so safe to --overwrite).
RUN_MARKERS = ("config.yaml", "summary.json", "metrics.jsonl", ".lock")


class RunDirError(RuntimeError):
    """The output directory cannot be used."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM (what schedulers send before preemption)."""

    def __init__(self, signame: str = "SIGINT"):
        super().__init__(signame)
        self.signame = signame


@dataclass
class Prepared:
    """A validated run: plugin manager, registry and typed config."""

    pm: Any
    registry: Registry
    config: cfgmod.RunConfig
    source: str


def prepare(config_path: str | None, overrides: list[str] = (), disabled: set[str] = frozenset(),
            pm: Any = None) -> Prepared:
    """Load YAML + overrides, load plugins (including the config's ``plugins:`` modules, added to
    ``pm`` when given), validate everything. Raises :class:`~rlhf_core.config.ConfigError` listing
    all problems."""
    raw = cfgmod.load_raw(config_path, list(overrides))
    source = config_path or "embedded default config"
    modules = raw.get("plugins") or []
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise cfgmod.ConfigError([f"plugins: expected a list of module names, got {modules!r}"], source)
    pm = add_modules(pm, modules) if pm is not None else get_plugin_manager(disabled=set(disabled), modules=modules)
    registry = build_registry(pm)
    return Prepared(pm, registry, cfgmod.resolve(raw, registry, source), source)


def preflight(prepared: Prepared, echo=print) -> None:
    """Check what every stage will read before the first one trains: the base model and tokenizer,
    each stage's model sources (``@STAGE`` must name an earlier stage) and data (every record is
    read and validated). All problems are raised together as a ConfigError; suspicious but legal
    data is reported through ``echo``."""
    config, registry = prepared.config, prepared.registry
    problems: list[str] = []
    for key, what in (("name_or_path", "model"), ("tokenizer", "tokenizer")):
        value = getattr(config.model, key)
        problem = check_model_source(value, what=what) if value else None
        if problem:
            problems.append(f"model.{key}: {problem}")
    earlier: list[str] = []
    for i, spec in enumerate(config.stages):
        stage = registry.get("stage", spec.stage, plugin=spec.plugin).obj()
        for item in stage.inputs(spec.config, registry) if hasattr(stage, "inputs") else []:
            path = f"stages[{i}].{item.path}"
            if item.kind == "model":
                problem = _check_init(item.value, earlier)
                if problem:
                    problems.append(f"{path}: {problem}")
                continue
            notes = DataNotes()
            try:
                load_records(item.value, item.data_kind, registry, seed=config.seed, builtin_size=item.builtin_size,
                             notes=notes)
            except DataError as exc:
                problems.append(f"{path}: {exc}")
            for line in notes.lines(f"stage {spec.name!r} {item.path}"):
                echo(f"rlhf: warning: {line}")
        earlier.append(spec.name)
    if config.distributed.cpu_offload and resolve_device(config.model.device).type != "cuda":
        problems.append("distributed.cpu_offload: moves sharded parameters from GPU to CPU memory; this run is on "
                        "the CPU already, so leave it off")
    if problems:
        raise cfgmod.ConfigError(problems, prepared.source)


def _check_init(value: str, earlier: list[str]) -> str | None:
    if value in ("auto", "base"):
        return None
    if value.startswith("@"):
        if value[1:] in earlier:
            return None
        return f"{value!r} names no earlier stage; earlier stages: {', '.join(earlier) or '(none)'}"
    return check_model_source(value)


class RunDir:
    """An output directory owned by this process: created, locked (``.lock`` holds our pid) and,
    with ``overwrite``, emptied of the previous run. :meth:`close` releases the lock."""

    def __init__(self, out: str | None, overwrite: bool):
        self._lock = None
        if dist_utils.rank() == 0:
            try:
                self.path = self._create(out, overwrite)
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


#: Called by the watchdog before it ends a process that cannot handle a signal itself.
_on_abort: list[Any] = []
#: Seconds a signalled process may take to stop by itself before the watchdog ends it.
ABORT_GRACE_S = 3.0


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (and SIGINT) raise :class:`Interrupted` in the main thread, so a
    scheduler's preemption is handled exactly like Ctrl-C.

    With several processes, a rank can be blocked inside a collective when the launcher stops the
    job (because another rank failed): Python runs signal handlers only between bytecodes, so the
    handler would wait forever. A watchdog thread hears the signal through the wakeup fd and, if the
    process has not stopped within ``ABORT_GRACE_S``, records the stop (``_on_abort``) and exits."""
    import threading

    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    watchdog = None
    if dist_utils.world_size() > 1:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

        def watch() -> None:
            data = os.read(read_fd, 1)
            if not data:
                return
            time.sleep(ABORT_GRACE_S)
            signame = signal.Signals(data[0]).name
            for callback in list(_on_abort):
                with contextlib.suppress(Exception):
                    callback(signame)
            os.write(2, f"[rank {dist_utils.rank()}] stopped by {signame} while waiting on other ranks\n".encode())
            os._exit(1)

        watchdog = threading.Thread(target=watch, daemon=True, name="rlhf-signal-watchdog")
        watchdog.start()
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if watchdog is not None:
            signal.set_wakeup_fd(old_fd)
            os.close(write_fd)  # ends the watchdog's read


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line[:300]


def run_pipeline(prepared: Prepared, run_dir: Path, echo=print) -> dict[str, Any]:
    """Run every stage in order; returns the summary (also written to ``summary.json``, whose
    ``status`` is ``running`` until the run ends as ``finished``, ``interrupted`` or
    ``failed: <reason>``; ``stages_completed`` lists the stages whose outputs are complete)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = prepared.config
    if is_main_process():
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfgmod.to_plain(config), sort_keys=False))
    device = resolve_device(config.model.device)
    tracker = Tracker(run_dir)
    results: dict[str, StageResult] = {}
    summary: dict[str, Any] = {"status": "running", "stages_completed": [], "run_dir": str(run_dir),
                               "pid": os.getpid(), "stages": {}}
    write_summary(run_dir, summary)
    current = None

    def on_abort(signame: str) -> None:  # the watchdog's last word, for a rank stuck in a collective
        reason = dist_utils.failure_elsewhere()
        summary.update(status=f"failed: {reason}" if reason else "interrupted", stage_in_progress=current)
        if not reason:
            summary["interrupted_by"] = signame
        write_summary(run_dir, summary)

    _on_abort.append(on_abort)
    try:
        for spec in config.stages:
            current = spec.name
            stage = prepared.registry.get("stage", spec.stage, plugin=spec.plugin).obj()
            tracker.stage = spec.name
            echo(f"== stage {spec.name} ({spec.stage}) ==")
            seed_everything(config.seed)
            ctx = StageContext(
                name=spec.name, stage_dir=run_dir / spec.name, run_config=config, registry=prepared.registry,
                tracker=tracker, device=device, seed=config.seed, results=dict(results),
            )
            started = time.perf_counter()
            dist_utils.reset_peak_memory(device)
            result = stage.run(ctx, spec.config)
            result.summary["seconds"] = round(time.perf_counter() - started, 2)
            result.summary["peak_memory_mb"] = round(dist_utils.peak_memory_mb(device), 1)
            results[spec.name] = result
            summary["stages"][spec.name] = result.summary
            summary.update(result.headline)
            tracker.plot(spec.name)
            summary["stages_completed"].append(spec.name)
            write_summary(run_dir, summary)
        current = None
    except KeyboardInterrupt as exc:
        elsewhere = dist_utils.failure_elsewhere()  # stopped because another rank failed?
        if elsewhere:
            summary.update(status=f"failed: {elsewhere}", stage_in_progress=current)
        else:
            summary.update(status="interrupted", interrupted_by=getattr(exc, "signame", "SIGINT"),
                           stage_in_progress=current)
        write_summary(run_dir, summary)
        raise
    except BaseException as exc:
        # A collective that broke because another rank died: record that rank's reason, the root cause.
        reason = dist_utils.failure_elsewhere() or _reason(exc)
        summary.update(status=f"failed: {reason}", stage_in_progress=current)
        write_summary(run_dir, summary)
        raise
    finally:
        _on_abort.remove(on_abort)
    summary["status"] = "finished"
    del summary["pid"]
    write_summary(run_dir, summary)
    echo(format_table(summary))
    echo(f"run directory: {run_dir}  (summary.json, metrics.jsonl, plots/)")
    return summary
