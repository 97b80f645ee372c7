"""Built-in tracker plugins (``tracking: [tensorboard]``). ``metrics.jsonl`` and the PNG plots are
always written by the host; these send the same rows to the tools researchers already watch."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from rlhf_core import hookimpl
from rlhf_core.config import flatten


class TensorBoardTracker:
    """TensorBoard event files in ``RUN_DIR/<log_dir>``: scalars tagged ``<stage>/<metric>`` at the
    stage's step, the resolved config as text, and at the end the hyper-parameters (every config
    leaf) with the run's headline numbers. View with ``tensorboard --logdir RUN_DIR/tensorboard``."""

    def __init__(self, run_dir: Path, config: dict, *, log_dir: str = "tensorboard", flush_secs: int = 10):
        from torch.utils.tensorboard import SummaryWriter

        self.config = config
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / log_dir), flush_secs=flush_secs)
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```")

    @staticmethod
    def check_options(*, log_dir: str = "tensorboard", flush_secs: int = 10) -> None:
        """The package must be installed; ``log_dir`` stays inside the run directory."""
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("tensorboard tracker needs the tensorboard package: pip install -e \".[tensorboard]\"") from None
        if Path(log_dir).is_absolute() or ".." in Path(log_dir).parts:
            raise ValueError(f"tensorboard: log_dir must be a path inside the run directory, got {log_dir!r}")
        if flush_secs < 1:
            raise ValueError(f"tensorboard: flush_secs must be at least 1, got {flush_secs}")

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"{stage}/{key}", value, step)

    def finish(self, summary: dict[str, Any]) -> None:
        headline = {f"run/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float)) and k != "pid"}
        hparams = {k: v for k, v in flatten(self.config).items() if isinstance(v, (int, float, str, bool))}
        self.writer.add_hparams(hparams, headline or {"run/finished": float(summary.get("status") == "finished")},
                                run_name=".")
        self.writer.add_text("summary", "```json\n" + json.dumps(summary, indent=2, default=str) + "\n```")
        self.writer.close()


@hookimpl
def rlhf_register_trackers(register):
    register("tensorboard", TensorBoardTracker)
