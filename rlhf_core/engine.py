"""Runs a pipeline of stages and owns the run directory.

Run directory layout: ``config.yaml`` (resolved), ``metrics.jsonl`` (one stage-tagged line per
logged step), ``<stage>/`` (the stage's checkpoint: ``save_pretrained`` output), ``plots/<stage>.png``,
``summary.json`` (final metrics per stage plus headline numbers).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import config as cfgmod
from .interfaces import StageContext, StageResult
from .models import resolve_device
from .plugins import build_registry, get_plugin_manager
from .registry import Registry
from .tracking import Tracker, format_table, is_main_process, write_summary
from .training import seed_everything


class RunDirError(RuntimeError):
    """The output directory cannot be used."""


@dataclass
class Prepared:
    """A validated run: plugin manager, registry and typed config."""

    pm: Any
    registry: Registry
    config: cfgmod.RunConfig
    source: str


def prepare(config_path: str | None, overrides: list[str] = (), disabled: set[str] = frozenset()) -> Prepared:
    """Load YAML + overrides, load plugins (including the config's ``plugins:`` modules), validate
    everything. Raises :class:`~rlhf_core.config.ConfigError` listing all problems."""
    raw = cfgmod.load_raw(config_path, list(overrides))
    source = config_path or "embedded default config"
    modules = raw.get("plugins") or []
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise cfgmod.ConfigError([f"plugins: expected a list of module names, got {modules!r}"], source)
    pm = get_plugin_manager(disabled=set(disabled), modules=modules)
    registry = build_registry(pm)
    return Prepared(pm, registry, cfgmod.resolve(raw, registry, source), source)


def make_run_dir(out: str | None, overwrite: bool) -> Path:
    """``out`` (default ``runs/<timestamp>``); an existing non-empty directory needs ``overwrite``."""
    path = Path(out) if out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise RunDirError(f"output directory {path} exists and is not empty; choose another --out or pass --overwrite")
        (path / "metrics.jsonl").unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_pipeline(prepared: Prepared, run_dir: Path, echo=print) -> dict[str, Any]:
    """Run every stage in order; returns the summary (also written to ``summary.json``)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = prepared.config
    if is_main_process():
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfgmod.to_plain(config), sort_keys=False), encoding="utf-8")
    device = resolve_device(config.model.device)
    tracker = Tracker(run_dir)
    results: dict[str, StageResult] = {}
    summary: dict[str, Any] = {"run_dir": str(run_dir), "stages": {}}
    for spec in config.stages:
        stage = prepared.registry.get("stage", spec.stage).obj()
        tracker.stage = spec.name
        echo(f"== stage {spec.name} ({spec.stage}) ==")
        seed_everything(config.seed)
        ctx = StageContext(
            name=spec.name, stage_dir=run_dir / spec.name, run_config=config, registry=prepared.registry,
            tracker=tracker, device=device, seed=config.seed, results=dict(results),
        )
        started = time.perf_counter()
        result = stage.run(ctx, spec.config)
        result.summary["seconds"] = round(time.perf_counter() - started, 2)
        results[spec.name] = result
        summary["stages"][spec.name] = result.summary
        summary.update(result.headline)
        tracker.plot(spec.name)
        write_summary(run_dir, summary)
    echo(format_table(summary))
    echo(f"run directory: {run_dir}  (summary.json, metrics.jsonl, plots/)")
    return summary
