"""Runs a pipeline of stages: prepare (config, plugins, validation), preflight (every stage's data
and model sources read and checked before the first one trains), plan (``--dry-run``) and the
run itself, which records in ``summary.json`` how it ended (see :mod:`.run_dir` for the layout)."""
from __future__ import annotations

import functools
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .. import checkpoint as ckptmod
from .. import config as cfgmod
from .. import distributed as dist_utils
from ..atomic import atomic_write_text
from ..data import DataNotes, load_records
from ..errors import ConfigError, DataError
from ..models import check_model_source, load_tokenizer
from ..plugin_system.manager import add_modules, build_registry, get_plugin_manager, locate_modules
from ..plugin_system.registry import Registry
from ..training import seed_everything
from ..types import StageResult
from . import signals
from .context import StageContext
from .run_dir import read_summary, remove_leftovers
from .tracking import Tracker, format_table, write_summary

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
        raise ConfigError([f"plugins: expected a list of module names or .py file paths, got {modules!r}"],
                                 source)
    if modules:  # files are recorded by absolute path, so that --resume finds them from the run's config.yaml
        raw["plugins"] = modules = locate_modules(modules, Path(config_path).resolve().parent if config_path else None)
    pm = add_modules(pm, modules) if pm is not None else get_plugin_manager(disabled=set(disabled), modules=modules)
    registry = build_registry(pm)
    return Prepared(pm, registry, cfgmod.resolve(raw, registry, source), source)


def preflight(prepared: Prepared, echo=print) -> list[dict[str, int]]:
    """Check what every stage will read before the first one trains: the base model and tokenizer,
    each stage's model sources (``@STAGE`` must name an earlier stage) and data (every record is
    read and validated). All problems are raised together as a ConfigError; suspicious but legal
    data is reported through ``echo``. Returns, per stage, the number of valid records of each data
    input by its config path (``{"data.train": 1800}``), for :func:`plan`."""
    config, registry = prepared.config, prepared.registry
    problems: list[str] = []
    sizes: list[dict[str, int]] = []
    has_template: dict[str, bool] = {}  # tokenizer source -> whether it has a chat template
    for key, what in (("name_or_path", "model"), ("tokenizer", "tokenizer")):
        value = getattr(config.model, key)
        problem = check_model_source(value, what=what) if value else None
        if problem:
            problems.append(f"model.{key}: {problem}")
    earlier: dict[str, str | None] = {}  # earlier stage name -> what it produces (None: not declared)
    for i, spec in enumerate(config.stages):
        stage = registry.get("stage", spec.stage, plugin=spec.plugin).obj()
        sizes.append({})
        for item in stage.data_inputs(spec.config, registry) + stage.inputs(spec.config, registry):
            path = f"stages[{i}].{item.path}"
            if item.kind in ("model", "reward_model"):
                problem = (_check_init(item.value, list(earlier)) if item.kind == "model"
                           else _check_reward_model(item.value, earlier))
                if problem:
                    problems.append(f"{path}: {problem}")
                continue
            notes = DataNotes()
            try:
                sizes[-1][item.path] = len(load_records(item.value, item.data_kind, registry, seed=config.seed,
                                                        builtin_size=item.builtin_size, notes=notes,
                                                        fields=item.fields, split=item.split, extra=item.extra))
            except DataError as exc:
                problems.append(f"{path}: {exc}")
            for line in notes.lines(f"stage {spec.name!r} {item.path}"):
                echo(f"rlhf: warning: {line}")
        problem = _chat_template_problem(config.model, spec.config, has_template)
        if problem:
            problems.append(f"stages[{i}].data.chat_template: {problem}")
        earlier[spec.name] = stage.produces
    if config.distributed.cpu_offload and dist_utils.resolve_device(config.model.device).type != "cuda":
        problems.append("distributed.cpu_offload: moves sharded parameters from GPU to CPU memory; this run is on "
                        "the CPU already, so leave it off")
    if problems:
        raise ConfigError(problems, prepared.source)
    return sizes


def _chat_template_problem(model_cfg: cfgmod.ModelConfig, stage_cfg: Any, has_template: dict[str, bool]) -> str | None:
    """Why a stage's ``data.chat_template: always`` cannot work (the tokenizer it starts from has no
    chat template), or None; ``has_template`` caches the answer per tokenizer source. Earlier stages
    save the base model's tokenizer, so every init but a path is the base model's tokenizer."""
    data, init = getattr(stage_cfg, "data", None), getattr(stage_cfg, "init", "base")
    if not isinstance(data, cfgmod.DataConfig) or data.chat_template != "always":
        return None
    base = init in ("auto", "base") or not isinstance(init, str) or init.startswith("@")
    source = (model_cfg.tokenizer or model_cfg.name_or_path) if base else init
    if source not in has_template:
        try:
            tokenizer = load_tokenizer(model_cfg, None if base else source)
        except Exception:  # an unreadable model source is the model checks' problem, reported on its own
            return None
        has_template[source] = bool(getattr(tokenizer, "chat_template", None))
    if has_template[source]:
        return None
    return f"always needs a chat template, and the tokenizer of {source} has none; use auto or never"


def plan(prepared: Prepared, sizes: list[dict[str, int]]) -> str:
    """What ``rlhf run`` would do, as text (``rlhf run --dry-run``): the base model, then per stage
    its plugin, model sources, data inputs with their record counts and, from the stage's optional
    ``plan(config, registry, sizes) -> {label: value}``, its steps and estimated tokens."""
    config, registry = prepared.config, prepared.registry
    lines = [f"plan for {prepared.source} (nothing was trained, no run directory was touched)",
             f"model: {config.model.name_or_path}" + (" with LoRA" if config.model.lora else "")
             + f", dtype {config.model.dtype}, device {dist_utils.resolve_device(config.model.device)}"]
    for i, (spec, stage_sizes) in enumerate(zip(config.stages, sizes)):
        entry = registry.get("stage", spec.stage, plugin=spec.plugin)
        stage = entry.obj()
        lines.append(f"stage {i} {spec.name!r} ({spec.stage}, plugin {entry.plugin})")
        for item in stage.data_inputs(spec.config, registry) + stage.inputs(spec.config, registry):
            count = f" ({stage_sizes[item.path]} records)" if item.path in stage_sizes else ""
            lines.append(f"  {item.path}: {item.value}{count}")
        for label, value in stage.plan(spec.config, registry, stage_sizes).items():
            lines.append(f"  {label}: {value:,}" if isinstance(value, int) else f"  {label}: {value}")
    return "\n".join(lines)


def _check_init(value: str, earlier: list[str]) -> str | None:
    if value in ("auto", "base"):
        return None
    if value.startswith("@"):
        if value[1:] in earlier:
            return None
        return f"{value!r} names no earlier stage; earlier stages: {', '.join(earlier) or '(none)'}"
    return check_model_source(value)


def _check_reward_model(value: str, earlier: dict[str, str | None]) -> str | None:
    """Why a trained reward model cannot come from ``value`` (``auto``, ``@STAGE`` or a directory
    the reward's own option check has already looked at), or None. Scoring with a fresh head on
    the base model would train against noise and still exit 0, so it is refused up front."""
    if value == "auto":
        if any(kind in ("reward", None) for kind in earlier.values()):
            return None
        return (f"'auto' means the latest earlier stage that trains a reward model, and there is none (earlier "
                f"stages: {', '.join(earlier) or '(none)'}); an untrained reward head would score noise. Add a "
                "reward stage before this one, set path to a trained reward model directory, or use another reward "
                "(math, exact_match, format, code, remote, judge, ...)")
    if value.startswith("@"):
        if value[1:] not in earlier:
            return f"{value!r} names no earlier stage; earlier stages: {', '.join(earlier) or '(none)'}"
        if earlier[value[1:]] not in ("reward", None):
            return f"{value!r} names stage {value[1:]!r}, which trains a {earlier[value[1:]]}, not a reward model"
    return None


def _tracker_backends(prepared: Prepared, run_dir: Path) -> dict[str, Any]:
    """The config's ``tracking:`` plugins by name (``NAME (tracking[i])`` for a name used twice), each
    as a function that builds it with the resolved config, for :class:`Tracker` (main process only)."""
    plain = cfgmod.to_plain(prepared.config)
    names = [spec.name for spec in prepared.config.tracking]
    return {spec.name if names.count(spec.name) == 1 else f"{spec.name} (tracking[{i}])":
            functools.partial(prepared.registry.lookup("tracker", spec).obj, run_dir, plain, **spec.options)
            for i, spec in enumerate(prepared.config.tracking)}


def _finish_trackers(tracker: Tracker, summary: dict[str, Any], run_dir: Path) -> None:
    """Tell the trackers the run ended. A tracker that failed on the way never decides the run's
    outcome (the Tracker warned once and dropped it); ``summary.json`` records it in
    ``trackers_failed``: name -> where and why."""
    tracker.finish(summary)
    if tracker.failed:
        summary["trackers_failed"] = {**summary.get("trackers_failed", {}), **tracker.failed}
        write_summary(run_dir, summary)


def _record_outcome(tracker: Tracker, summary: dict[str, Any], run_dir: Path) -> None:
    """Write how the run ended and tell the trackers, without hiding the error that ended it: a
    summary that cannot be written (a full disk) is one warning, and the error still surfaces."""
    try:
        write_summary(run_dir, summary)
        _finish_trackers(tracker, summary, run_dir)
    except OSError as exc:
        print(f"rlhf: warning: could not record the run's end in {run_dir / 'summary.json'} ({exc}); it still "
              f"says 'running' with pid {summary.get('pid')}, which is no longer alive", file=sys.stderr)


def _record(summary: dict[str, Any], name: str, result: StageResult, results: dict[str, StageResult]) -> None:
    """A completed stage: its numbers, its output (for a later resume), its headline."""
    results[name] = result
    summary["stages"][name] = result.summary
    summary["outputs"][name] = {"kind": result.kind, "model_dir": str(result.model_dir) if result.model_dir else None,
                                "headline": result.headline}
    summary.update(result.headline)
    summary["stages_completed"].append(name)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line[:300]


def checkpointer_for(config: cfgmod.RunConfig, run_dir: Path, stage: str) -> ckptmod.Checkpointer:
    """The stage's checkpoints: ``run_dir/checkpoints/<stage>/``."""
    c = config.checkpoint
    return ckptmod.Checkpointer(run_dir / "checkpoints" / stage, c.every, c.keep, c.on_signal)


def run_pipeline(prepared: Prepared, run_dir: Path, echo=print, resume: bool = False) -> dict[str, Any]:
    """Run every stage in order; returns the summary (also written to ``summary.json``, whose
    ``status`` is ``running`` until the run ends as ``finished``, ``interrupted`` or
    ``failed: <reason>``; ``stages_completed`` lists the stages whose outputs are complete).

    With ``resume``, stages the directory's summary lists as completed are skipped (their outputs
    reused), the first unfinished stage continues from its newest complete checkpoint,
    ``metrics.jsonl`` is cut back to that checkpoint, and ``resumed_from`` records the step."""
    from transformers.utils import logging as hf_logging  # transformers loads in ~1 s: not for `rlhf --help`

    hf_logging.disable_progress_bar()
    config = prepared.config
    previous = read_summary(run_dir) if resume else {}
    done = [n for n in previous.get("stages_completed", []) if n in previous.get("outputs", {})]
    checkpointers = {spec.name: checkpointer_for(config, run_dir, spec.name) for spec in config.stages}
    if dist_utils.is_main_process():
        remove_leftovers(run_dir, checkpointers.values(), echo)
    dist_utils.barrier()  # no rank looks for checkpoints while rank 0 removes half-written ones
    latest = {name: c.latest() for name, c in checkpointers.items() if name not in done}
    resumed_from = {name: found[0] for name, found in latest.items() if found}
    if dist_utils.is_main_process():
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfgmod.to_plain(config), sort_keys=False))
    device = dist_utils.resolve_device(config.model.device)
    tracker = Tracker(run_dir, _tracker_backends(prepared, run_dir) if dist_utils.is_main_process() else {})
    if resume:
        tracker.keep_only(lambda row: row.get("stage") in done or row.get("step", 0) <= resumed_from.get(row.get("stage"), -1))
    results: dict[str, StageResult] = {}
    summary: dict[str, Any] = {"status": "running", "stages_completed": [], "run_dir": str(run_dir),
                               "pid": os.getpid(), "stages": {}, "outputs": {}}
    if resume:
        summary["resumed_from"] = {**previous.get("resumed_from", {}), **resumed_from}
        if "trackers_failed" in previous:  # an earlier attempt's tracker failure: its history has a gap
            summary["trackers_failed"] = previous["trackers_failed"]
    write_summary(run_dir, summary)
    current = None

    def on_abort(signame: str) -> None:  # the watchdog's last word, for a rank stuck in a collective
        reason = dist_utils.failure_elsewhere()
        summary.update(status=f"failed: {reason}" if reason else "interrupted", stage_in_progress=current)
        if not reason:
            summary["interrupted_by"] = signame
        write_summary(run_dir, summary)

    signals.abort_callbacks.append(on_abort)
    try:
        for spec in config.stages:
            if spec.name in done:  # finished before the interruption: reuse its output and numbers
                out = previous["outputs"][spec.name]
                result = StageResult(Path(out["model_dir"]) if out["model_dir"] else None, out["kind"],
                                     previous["stages"].get(spec.name, {}), out.get("headline", {}))
                echo(f"== stage {spec.name} ({spec.stage}): completed earlier, output reused ==")
                _record(summary, spec.name, result, results)
                tracker.plot(spec.name)
                continue
            current = spec.name
            stage = prepared.registry.get("stage", spec.stage, plugin=spec.plugin).obj()
            tracker.stage = spec.name
            if resume:  # what the trackers got after the checkpoint (all of it, without one) is logged again
                tracker.resume(spec.name, resumed_from.get(spec.name, -1) + 1)
            where = f", resuming from step {resumed_from[spec.name]}" if spec.name in resumed_from else ""
            echo(f"== stage {spec.name} ({spec.stage}){where} ==")
            seed_everything(config.seed)
            ctx = StageContext(
                name=spec.name, stage_dir=run_dir / spec.name, run_config=config, registry=prepared.registry,
                tracker=tracker, device=device, seed=config.seed, results=dict(results),
                checkpointer=checkpointers[spec.name],
            )
            started = time.perf_counter()
            dist_utils.reset_peak_memory(device)
            result = stage.run(ctx, spec.config)
            result.summary["seconds"] = round(time.perf_counter() - started, 2)
            result.summary["peak_memory_mb"] = round(dist_utils.peak_memory_mb(device), 1)
            _record(summary, spec.name, result, results)
            tracker.plot(spec.name)
            write_summary(run_dir, summary)
            if dist_utils.is_main_process():  # the stage's output is its final state; its checkpoints are spent
                shutil.rmtree(checkpointers[spec.name].directory, ignore_errors=True)
        current = None
    except KeyboardInterrupt as exc:
        signals.recording_end.append(True)
        elsewhere = dist_utils.failure_elsewhere()  # stopped because another rank failed?
        if elsewhere:
            summary.update(status=f"failed: {elsewhere}", stage_in_progress=current)
        else:
            summary.update(status="interrupted", interrupted_by=getattr(exc, "signame", "SIGINT"),
                           stage_in_progress=current)
        _record_outcome(tracker, summary, run_dir)
        raise
    except BaseException as exc:
        signals.recording_end.append(True)
        # A collective that broke because another rank died: record that rank's reason, the root cause.
        reason = dist_utils.failure_elsewhere() or _reason(exc)
        summary.update(status=f"failed: {reason}", stage_in_progress=current)
        _record_outcome(tracker, summary, run_dir)
        raise
    finally:
        signals.abort_callbacks.remove(on_abort)
        signals.recording_end.clear()
    summary["status"] = "finished"
    del summary["pid"]
    write_summary(run_dir, summary)
    _finish_trackers(tracker, summary, run_dir)
    echo(format_table(summary))
    echo(f"run directory: {run_dir}  (summary.json, metrics.jsonl, plots/)")
    return summary
