"""Every error a user can fix: :class:`UserError` and its kinds.

The ``rlhf`` command shows a :class:`UserError` as one message without a traceback
(``RLHF_DEBUG=1`` shows the traceback). A plugin raises one of these for a problem its user should
fix rather than report: :class:`StageError` for a stage's options or inputs,
:class:`ComponentError` for a component that broke its contract. Each message says what, where
(file, line, config key, plugin) and what is accepted.
"""
from __future__ import annotations

__all__ = ["UserError", "ConfigError", "StageError", "ComponentError", "RegistryError", "PluginLoadError", "DataError",
           "ModelLoadError", "TrainingError", "CheckpointError", "RunDirError", "DiskFullError", "Interrupted"]


class UserError(Exception):
    """A problem the user can fix; its message says what, where, and what is accepted."""


class ConfigError(UserError, ValueError):
    """One or more config problems; ``problems`` lists them as ``path: message``."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


class StageError(UserError, ValueError):
    """A stage cannot run with the given options or inputs; shown to the user without a traceback."""


class ComponentError(UserError, RuntimeError):
    """A plugin component (reward, advantage estimator, ...) misbehaved at run time: it raised or
    returned something other than its contract says. The message names it, its plugin and what was
    expected."""


class RegistryError(UserError, ValueError):
    """A contested, unknown or malformed component."""


class PluginLoadError(UserError, RuntimeError):
    """A plugin failed to import or register (raised in strict mode or for config modules)."""


class DataError(UserError, ValueError):
    """Malformed input data; the message names the file, line and field."""


class ModelLoadError(UserError, RuntimeError):
    """A model or tokenizer could not be loaded; the message names the path."""


class TrainingError(UserError, RuntimeError):
    """Training cannot continue (e.g. the loss became NaN); the message says what to change."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used as asked (e.g. written by another number of processes)."""


class RunDirError(UserError, RuntimeError):
    """The output directory cannot be used."""


class DiskFullError(UserError, OSError):
    """The filesystem ran out of space (or quota) while rlhf wrote a file; the message names the
    path, the space it needed and what is free. The previous version of what was being written is
    kept (every write here is atomic)."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM (what schedulers send before preemption)."""

    def __init__(self, signame: str = "SIGINT"):
        super().__init__(signame)
        self.signame = signame
