"""Run-directory bookkeeping: metrics.jsonl, summary.json, PNG plots, the final table.

Only the main process (``RANK`` unset or 0) writes, so a torchrun launch logs once.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm.auto import tqdm

from ..atomic import atomic_write_text, disk_full_reported, dumps_strict
from ..distributed import is_main_process


#: Seconds between two progress lines when stderr is not a terminal (a log file, a pipe, CI).
PROGRESS_EVERY_S = 10.0


class LineProgress:
    """Progress for a log that is not a terminal: one line every :data:`PROGRESS_EVERY_S` seconds
    and one at the end (``sft: step 50/150 (33%), 12.5 steps/s, loss=1.4231``), instead of a bar's
    carriage-return updates. Iterates like the ``tqdm`` it stands in for."""

    def __init__(self, steps: range, desc: str, total: int, unit: str):
        self.steps, self.desc, self.total, self.unit = steps, desc, total, unit
        self.postfix: dict[str, str] = {}
        self.done = steps.start - 1
        self.started = self.printed = time.perf_counter()
        self.first = self.done

    def __iter__(self) -> Iterator[int]:
        for step in self.steps:
            yield step
            self.done = step
            if time.perf_counter() - self.printed >= PROGRESS_EVERY_S:
                self._line()

    def set_postfix(self, **values: str) -> None:
        """The numbers shown after the count (the latest loss, reward ...)."""
        self.postfix = values

    def close(self) -> None:
        """The last line: where the loop stopped."""
        if self.done > self.first:
            self._line()

    def _line(self) -> None:
        self.printed = now = time.perf_counter()
        rate = (self.done - self.first) / max(now - self.started, 1e-9)
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.unit} {self.done}/{self.total} ({100 * self.done // max(self.total, 1)}%), "
              f"{rate:.3g} {self.unit}s/s{extra}", file=sys.stderr, flush=True)


def progress(start: int, total: int, desc: str, unit: str = "step") -> Any:
    """The loop over steps ``start + 1 .. total`` with its progress display: a ``tqdm`` bar on a
    terminal, :class:`LineProgress` otherwise, nothing on ranks other than 0."""
    steps = range(start + 1, total + 1)
    if not is_main_process() or sys.stderr.isatty():
        return tqdm(steps, desc=desc, disable=not is_main_process(), dynamic_ncols=True, initial=start, total=total)
    return LineProgress(steps, desc, total, unit)


class Tracker:
    """Appends stage-tagged metric rows to ``metrics.jsonl`` (always: resume and the plots read it),
    keeps them for plotting, and hands each row to the run's tracker plugins (``tracking:``, e.g.
    TensorBoard), which exist on the main process only.

    A tracker plugin that raises (W&B or MLflow unreachable, a full disk under TensorBoard) never
    stops the run: one warning names it, it gets nothing more, and :attr:`failed` says where and
    why (the host records it in ``summary.json`` as ``trackers_failed``)."""

    def __init__(self, run_dir: Path, backends: dict[str, Callable[[], Any]] | None = None):
        """``backends``: tracker name -> a function that builds it, called here."""
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.stage = ""
        self.rows: list[dict[str, Any]] = []
        self.backends: dict[str, Any] = {}
        #: tracker name -> "stage sft step 3: OSError: ..." for each tracker that stopped
        self.failed: dict[str, str] = {}
        self._start = time.time()
        for name, build in (backends or {}).items():
            with self._guard(name, "start"):
                self.backends[name] = build()

    @contextlib.contextmanager
    def _guard(self, name: str, where: str) -> Iterator[None]:
        """Run one call into tracker ``name``; if it raises, warn once and drop the tracker."""
        try:
            yield
        except Exception as exc:
            self.backends.pop(name, None)
            detail = (str(exc).strip().splitlines() or [""])[0][:300]
            self.failed[name] = f"{where}: {type(exc).__name__}: {detail}"
            # tqdm.write: a line of its own, not glued to a progress bar's
            tqdm.write(f"rlhf: warning: tracker {name!r} stopped, the run goes on without it (metrics.jsonl keeps "
                       f"every row): {self.failed[name]}", file=sys.stderr)

    def resume(self, stage: str, step: int) -> None:
        """Resume: ``stage`` continues from ``step`` (0 when it starts over), so whatever the trackers
        received for it at ``step`` or later before the interruption is void. Each tracker with a
        ``resume(stage, step)`` method is told (TensorBoard drops those events); the others keep them."""
        for name, backend in list(self.backends.items()):
            if hasattr(backend, "resume"):
                with self._guard(name, f"stage {stage} resume at step {step}"):
                    backend.resume(stage, step)

    def finish(self, summary: dict[str, Any]) -> None:
        """Tell every tracker plugin the run ended (``summary['status']`` says how)."""
        for name, backend in list(self.backends.items()):
            with self._guard(name, "finish"):
                backend.finish(summary)

    def keep_only(self, keep) -> None:
        """Resume: cut ``metrics.jsonl`` back to the rows ``keep(row)`` accepts (those up to the
        checkpoint a run continues from), atomically, and hold them for the plots."""
        import json

        rows = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a line torn by the kill
        self.rows = [r for r in rows if keep(r)]
        if is_main_process():
            atomic_write_text(self.path, "".join(dumps_strict(r) + "\n" for r in self.rows))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` (numbers; tensors are converted) at ``step`` of the current stage."""
        row = {"stage": self.stage, "step": int(step), "time": round(time.time() - self._start, 3)}
        for key, value in metrics.items():
            value = float(value.item()) if hasattr(value, "item") else value
            row[key] = value
        self.rows.append(row)
        if is_main_process():
            line = dumps_strict(row) + "\n"
            with disk_full_reported(self.path, len(line)), self.path.open("a", encoding="utf-8") as fh:
                fh.write(line)
            numbers = {k: v for k, v in row.items() if k not in ("stage", "step") and isinstance(v, (int, float))}
            for name, backend in list(self.backends.items()):
                with self._guard(name, f"stage {self.stage} step {int(step)}"):
                    backend.log(self.stage, int(step), numbers)

    def series(self, stage: str) -> dict[str, tuple[list[int], list[float]]]:
        """``metric -> (steps, values)`` for one stage (numeric, finite values only)."""
        out: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
        for row in self.rows:
            if row["stage"] != stage:
                continue
            for key, value in row.items():
                if key in ("stage", "step", "time") or not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue
                out[key][0].append(row["step"])
                out[key][1].append(float(value))
        return dict(out)

    def plot(self, stage: str) -> Path | None:
        """One PNG per stage with a panel per metric: ``plots/<stage>.png``."""
        series = self.series(stage)
        if not series or not is_main_process():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = sorted(series)
        cols = min(4, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            steps, values = series[name]
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, linewidth=1.2)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle(f"stage: {stage}")
        fig.tight_layout()
        out = self.run_dir / "plots" / f"{stage}.png"
        out.parent.mkdir(exist_ok=True)
        fig.savefig(out, dpi=90)
        plt.close(fig)
        return out


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """``summary.json``, atomically and as strict JSON (non-finite numbers become null; main
    process only)."""
    path = run_dir / "summary.json"
    if is_main_process():
        atomic_write_text(path, dumps_strict(summary, indent=2, sort_keys=False) + "\n")
    return path


def format_table(summary: dict[str, Any]) -> str:
    """The end-of-run table: one block per stage, then top-level headline numbers."""
    lines = []
    for stage, metrics in summary.get("stages", {}).items():
        lines.append(f"[{stage}]")
        for key, value in metrics.items():
            lines.append(f"  {key:<28} {value:.4g}" if isinstance(value, float) else f"  {key:<28} {value}")
    headline = {k: v for k, v in summary.items()
                if k not in ("stages", "run_dir", "stages_completed", "pid", "outputs", "resumed_from")}
    if headline:
        lines.append("[run]")
        for key, value in headline.items():
            lines.append(f"  {key:<28} {value:.4g}" if isinstance(value, float) else f"  {key:<28} {value}")
    return "\n".join(lines)
