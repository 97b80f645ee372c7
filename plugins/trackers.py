"""Built-in tracker plugins (``tracking: [tensorboard, wandb, mlflow, trackio]``). ``metrics.jsonl`` and the
PNG plots are always written by the host; these send the same rows to the tools researchers already
watch. Each tool is an optional extra, checked before anything trains."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from rlhf_core import hookimpl
from rlhf_core.atomic import atomic_write_text
from rlhf_core.config import flatten


class TensorBoardTracker:
    """TensorBoard event files in ``RUN_DIR/<log_dir>``: the resolved config as text and, at the end,
    the hyper-parameters (every config leaf) with the run's headline numbers; each stage's scalars,
    tagged ``<stage>/<metric>`` at the stage's own step, in ``<log_dir>/<stage>/`` (a TensorBoard run
    per stage). View with ``tensorboard --logdir RUN_DIR/tensorboard``.

    One writer per stage is what lets ``--resume`` drop what a stage logged after its last checkpoint:
    every writer starts with a session-start event at its ``purge_step`` (0 for a fresh one), which
    TensorBoard's readers take as a restart that voids the earlier events of its directory at that step
    or later (all tags; its Python reader ignores a directory's first start), and each stage counts its
    steps from 0. :meth:`resume` opens the stage's writer at the step it continues from; the top-level
    events of an interrupted attempt (config, hparams, summary: all at step 0) are voided too."""

    def __init__(self, run_dir: Path, config: dict, *, log_dir: str = "tensorboard", flush_secs: int = 10):
        self.config = config
        self.root = Path(run_dir) / log_dir
        self.flush_secs = flush_secs
        self.stages: dict[str, Any] = {}  # stage -> its SummaryWriter
        self.writer = self._writer(self.root)
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```")

    def _writer(self, path: Path, purge_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(path), flush_secs=self.flush_secs, purge_step=purge_step)

    @staticmethod
    def check_options(*, log_dir: str, flush_secs: int) -> None:
        """The package must be installed; ``log_dir`` stays inside the run directory."""
        _require("tensorboard", "tensorboard", "tensorboard")
        if Path(log_dir).is_absolute() or ".." in Path(log_dir).parts:
            raise ValueError(f"tensorboard: log_dir must be a path inside the run directory, got {log_dir!r}")
        if flush_secs < 1:
            raise ValueError(f"tensorboard: flush_secs must be at least 1, got {flush_secs}")

    def resume(self, stage: str, step: int) -> None:
        """``stage`` continues from ``step``: its events at ``step`` and later are purged."""
        self.stages[stage] = self._writer(self.root / stage, step)

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        if stage not in self.stages:
            self.stages[stage] = self._writer(self.root / stage)
        for key, value in metrics.items():
            self.stages[stage].add_scalar(f"{stage}/{key}", value, step)

    def finish(self, summary: dict[str, Any]) -> None:
        for writer in self.stages.values():
            writer.close()
        headline = {f"run/{k}": v for k, v in _headline(summary).items()}
        hparams = {k: v for k, v in flatten(self.config).items() if isinstance(v, (int, float, str, bool))}
        self.writer.add_hparams(hparams, headline or {"run/finished": float(summary.get("status") == "finished")},
                                run_name=".")
        self.writer.add_text("summary", "```json\n" + json.dumps(summary, indent=2, default=str) + "\n```")
        self.writer.close()


def _require(package: str, tracker: str, extra: str) -> None:
    try:
        __import__(package)
    except ImportError:
        raise ValueError(f"{tracker} tracker needs the {package} package: pip install -e \".[{extra}]\"") from None


def _stage_names(config: dict) -> list[str]:
    return [str(s.get("name") or s.get("stage")) for s in config.get("stages", []) if isinstance(s, dict)]


def _headline(summary: dict[str, Any]) -> dict[str, float]:
    """The run's top-level numbers (gold scores, peak memory ...), not bookkeeping."""
    return {k: float(v) for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("pid",)}


def _run_key(run_dir: Path) -> str:
    """A stable id for this run directory: a resumed run continues the same tracker run."""
    resolved = str(Path(run_dir).resolve())
    name = re.sub(r"[^A-Za-z0-9_-]", "-", Path(resolved).name)[-40:]
    return f"{name}-{hashlib.sha1(resolved.encode()).hexdigest()[:8]}"


class WandbTracker:
    """Weights & Biases: one W&B run per rlhf run (id derived from the run directory, so ``--resume``
    continues it), named after the run directory, tagged with the stage names, the resolved config
    as the run config. Metrics are ``<stage>/<metric>`` against their own x-axis ``<stage>/step``
    (W&B's ``define_metric``), because every stage counts its steps from the start; the summary gets
    the headline numbers and the status. ``WANDB_MODE=offline`` (or ``mode: offline``) writes
    ``RUN_DIR/wandb/offline-run-*`` for a later ``wandb sync``; files go under the run directory.

    A resumed run cannot drop steps here (no ``resume`` method): W&B history is append-only; its
    rewind (``resume_from``, a server-side preview) and ``fork_from`` need the W&B server, so not
    offline runs, and rewind needs one monotonic step, not the per-stage axes above. The steps a stage
    logged between its last checkpoint and the interruption appear twice on its ``<stage>/step`` axis
    (``metrics.jsonl`` holds them once)."""

    def __init__(self, run_dir: Path, config: dict, *, project: str = "rlhf", entity: str | None = None,
                 mode: str | None = None, tags: list[str] | None = None, group: str | None = None):
        import wandb

        self.stages: set[str] = set()
        self.run = wandb.init(
            project=project, entity=entity, group=group, mode=mode or os.environ.get("WANDB_MODE") or None,
            dir=str(run_dir), name=Path(run_dir).name, id=_run_key(run_dir), resume="allow",
            config=config, tags=[*_stage_names(config), *(tags or [])], reinit="create_new",
        )

    @staticmethod
    def check_options(*, project: str, entity: str | None, mode: str | None,
                      tags: list[str] | None, group: str | None) -> None:
        """The package must be installed; ``mode`` is one W&B accepts."""
        _require("wandb", "wandb", "wandb")
        if mode not in (None, "online", "offline", "disabled", "shared"):
            raise ValueError(f"wandb: mode must be online, offline, disabled or shared, got {mode!r}")
        if not project:
            raise ValueError("wandb: project must be a non-empty name")

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        if stage not in self.stages:
            self.stages.add(stage)
            self.run.define_metric(f"{stage}/step", hidden=True)
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
        self.run.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in metrics.items()}})

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({**_headline(summary), "status": summary.get("status")})
        # W&B shows a non-zero exit as "failed"; an interrupted run continues under the same id on --resume.
        self.run.finish(exit_code=0 if summary.get("status") == "finished" else 1)


class MlflowTracker:
    """MLflow: one MLflow run per rlhf run in ``experiment`` (default ``rlhf``), named after the run
    directory, with every config leaf as a parameter (``stages.sft.train.lr`` ...), tags for the stage
    names and the run directory, metrics ``<stage>/<metric>`` at the stage's step, the headline
    numbers as metrics and ``summary.json`` as an artifact at the end, and the run's status
    (FINISHED, KILLED for an interrupted run, FAILED).

    Store: ``tracking_uri`` if given, else ``MLFLOW_TRACKING_URI``, else a local SQLite database in
    the run directory (``sqlite:///RUN_DIR/mlflow.db``, artifacts in ``RUN_DIR/mlflow-artifacts``):
    MLflow 3 refuses new plain-file stores, and SQLite is its recommended local store. View with
    ``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db``. ``--resume`` continues the same
    MLflow run (its id is kept in ``RUN_DIR/mlflow-run.json``). MLflow has no way to delete logged
    metric values (so no ``resume`` method): the steps a stage logged between its last checkpoint and
    the interruption are in its history twice (``metrics.jsonl`` holds them once; the later value
    has the later timestamp)."""

    def __init__(self, run_dir: Path, config: dict, *, tracking_uri: str | None = None,
                 experiment: str = "rlhf", tags: dict[str, str] | None = None):
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir).resolve()
        local = not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        self.id_file = run_dir / "mlflow-run.json"
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=(run_dir / "mlflow-artifacts").as_uri() if local else None)
        self.run_id = None
        if self.id_file.is_file():  # --resume: continue the run this directory started
            self.run_id = json.loads(self.id_file.read_text())["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        all_tags = {"rlhf.run_dir": str(run_dir), "rlhf.stages": ",".join(_stage_names(config)), **(tags or {})}
        run = self.client.create_run(exp_id, run_name=run_dir.name, tags=all_tags)
        self.run_id = run.info.run_id
        atomic_write_text(self.id_file, json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")
        # MLflow keys allow no brackets: stages[0].train.lr -> stages.0.train.lr
        params = [Param(re.sub(r"\[(\d+)\]", r".\1", k)[:250], v if isinstance(v, str) else json.dumps(v))
                  for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag("mlflow.note.content",
                                                        "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```")])

    @staticmethod
    def check_options(*, tracking_uri: str | None, experiment: str,
                      tags: dict[str, str] | None) -> None:
        """The package (and, for the default local store, SQLAlchemy) must be installed."""
        _require("mlflow", "mlflow", "mlflow")
        if not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
            _require("sqlalchemy", "mlflow (local SQLite store)", "mlflow")
            _require("alembic", "mlflow (local SQLite store)", "mlflow")
        if not experiment:
            raise ValueError("mlflow: experiment must be a non-empty name")

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{stage}/{k}", float(v), now, int(step))
                                                    for k, v in metrics.items()])

    def finish(self, summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        status = str(summary.get("status", "failed"))
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"run/{k}", v, now, 0) for k, v in _headline(summary).items()],
                              tags=[RunTag("rlhf.status", status[:5000])])
        self.client.log_text(self.run_id, json.dumps(summary, indent=2, default=str), "summary.json")
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "finished"
                                   else "KILLED" if status == "interrupted" else "FAILED")


class TrackioTracker:
    """trackio (a local-first tracker with a W&B-like API): one trackio run per rlhf run in
    ``project`` (default ``rlhf``), named after the run directory, the resolved config as the run
    config, metrics ``<stage>/<metric>`` at the stage's own step (``<stage>/step`` is logged beside
    them, since every stage counts from 0), and at the end the headline numbers and ``run/finished``
    (1 for a finished run, else 0).

    Data go to trackio's local database (``TRACKIO_DIR``, by default in the Hugging Face cache), where
    ``trackio show --project PROJECT`` displays them; ``space_id`` also syncs them to a Hugging Face
    Space (online only). ``--resume`` continues the same trackio run (``resume="allow"`` on the run
    name). Like W&B, trackio cannot drop logged values (no ``resume`` method): the steps a stage logged
    between its last checkpoint and the interruption appear twice (``metrics.jsonl`` holds them once)."""

    def __init__(self, run_dir: Path, config: dict, *, project: str = "rlhf", space_id: str | None = None):
        import trackio

        with contextlib.redirect_stdout(io.StringIO()):  # trackio prints a banner; the run log stays ours
            self.run = trackio.init(project=project, name=_run_key(run_dir), space_id=space_id, config=config,
                                    resume="allow", auto_log_cpu=False, auto_log_gpu=False)

    @staticmethod
    def check_options(*, project: str, space_id: str | None) -> None:
        """The package must be installed; ``project`` is a non-empty name."""
        _require("trackio", "trackio", "trackio")
        if not project:
            raise ValueError("trackio: project must be a non-empty name")

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        self.run.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in metrics.items()}})

    def finish(self, summary: dict[str, Any]) -> None:
        finished = float(summary.get("status") == "finished")
        self.run.log({"run/finished": finished, **{f"run/{k}": v for k, v in _headline(summary).items()}})
        import trackio

        with contextlib.redirect_stdout(io.StringIO()):
            trackio.finish()  # the module's finish also clears the current run, which trackio finishes again at exit


@hookimpl
def rlhf_register_trackers(register):
    register("tensorboard", TensorBoardTracker)
    register("wandb", WandbTracker)
    register("mlflow", MlflowTracker)
    register("trackio", TrackioTracker)
