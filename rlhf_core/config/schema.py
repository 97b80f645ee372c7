"""The run schema: config dataclasses (model, data, train, distributed, checkpoint, kernels, stages,
the run) and the value rules they check with ``problems()``."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from ..errors import UserError


class ConfigError(UserError, ValueError):
    """One or more config problems; ``problems`` lists them as ``path: message``."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class ComponentSpec:
    """A component choice: ``name`` plus keyword ``options``. In YAML either ``mse`` or
    ``{name: huber, delta: 2.0}``; ``plugin`` picks which plugin's component a name means when two
    plugins register it (``{name: length, plugin: my-plugin}``)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    plugin: str | None = None


# Value rules. A config dataclass may define ``problems() -> list[str]`` ("field: message", relative
# paths) for value checks; it is called only when every field parsed, so it never sees half-parsed values.
Rule = tuple[Callable[[Any], bool], str]
POSITIVE: Rule = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE: Rule = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
AT_LEAST_1: Rule = (lambda v: v >= 1, "at least 1")
AT_LEAST_0: Rule = (lambda v: v >= 0, "at least 0")
FRACTION: Rule = (lambda v: 0 <= v < 1, "in [0, 1)")
UNIT: Rule = (lambda v: 0 <= v <= 1, "in [0, 1]")


def rule_problems(obj: Any, rules: dict[str, Rule]) -> list[str]:
    """``field: must be ..., got ...`` for each non-None field of ``obj`` that breaks its rule."""
    out = []
    for name, (ok, accepted) in rules.items():
        value = getattr(obj, name)
        if value is not None and not ok(value):
            out.append(f"{name}: must be {accepted}, got {value!r}")
    return out


@dataclass
class LoraConfig:
    """LoRA adapters (through the ``peft`` library) on every trainable model: rank ``r``, scale
    ``alpha / r``, ``dropout`` on the adapter input, ``target_modules`` (``all-linear``: every linear
    layer but the output head; or a list of module names such as ``[q_proj, v_proj]``). With
    ``merge``, a stage's output also holds the merged model in ``<output>/merged``."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    merge: bool = False

    def problems(self) -> list[str]:
        """Value checks; ``peft`` must be installed."""
        import importlib.util

        out = rule_problems(self, {"r": AT_LEAST_1, "alpha": POSITIVE, "dropout": FRACTION})
        if isinstance(self.target_modules, list) and not self.target_modules:
            out.append("target_modules: must name at least one module, or be 'all-linear'")
        if importlib.util.find_spec("peft") is None:
            out.append("needs the peft package: pip install -e \".[lora]\"")
        return out


@dataclass
class ModelConfig:
    """The base model. ``name_or_path``: ``builtin:tiny`` (offline tiny Llama + byte tokenizer),
    a local directory (a saved model, or a LoRA adapter directory a stage wrote), or a hub id
    (loaded with ``from_pretrained``). ``gradient_checkpointing`` recomputes each block's
    activations in the backward pass of every trainable model (less memory, about a third more
    compute). ``lora``: train LoRA adapters instead of every weight (see :class:`LoraConfig`)."""

    name_or_path: str = "builtin:tiny"
    tokenizer: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None

    def problems(self) -> list[str]:
        """Value checks (see :func:`rule_problems`)."""
        return [] if self.name_or_path else ["name_or_path: must not be empty"]


@dataclass
class DataConfig:
    """Where a stage's examples come from and how they are cut to length.

    ``train``/``eval``: a JSONL/JSON/CSV/Parquet path or ``builtin:NAME``; without ``eval``,
    ``eval_fraction`` of train is held out. ``max_length`` caps prompt + response tokens:
    the prompt keeps its last ``max_prompt_length`` tokens (default half of ``max_length``), then the
    response is cut on the right; an example left with no response token is skipped and counted.
    ``builtin_size``: number of examples a builtin dataset generates. ``limit``: use at most this
    many training examples. ``train``/``eval`` may also be a 🤗 ``save_to_disk`` directory or
    ``hf:NAME``; ``split``/``eval_split`` choose their split; ``fields`` maps our field names to
    the source's columns, e.g. ``{prompt: question, response: answer, score: rating}``.
    """

    train: str = "builtin:letters"
    eval: str | None = None
    eval_fraction: float = 0.1
    max_length: int = 256
    max_prompt_length: int | None = None
    builtin_size: int = 2000
    limit: int | None = None
    fields: dict[str, str] = field(default_factory=dict)
    split: str = "train"
    eval_split: str = "test"

    def problems(self) -> list[str]:
        """Value checks: lengths that leave room for a response, a held-out share below 1."""
        out = rule_problems(self, {"eval_fraction": FRACTION, "max_length": (lambda v: v >= 2, "at least 2"),
                                   "builtin_size": AT_LEAST_1, "limit": AT_LEAST_1})
        if not self.train:
            out.append("train: must name a data file or builtin:NAME")
        known = ("prompt", "response", "score", "chosen", "rejected", "messages")
        for ours, theirs in self.fields.items():
            if ours not in known or not isinstance(theirs, str) or not theirs:
                out.append(f"fields.{ours}: maps one of {', '.join(known)} to a column name, got {ours}: {theirs!r}")
        mpl = self.max_prompt_length
        if mpl is not None and self.max_length >= 2 and not 1 <= mpl < self.max_length:
            out.append(f"max_prompt_length: must be at least 1 and below max_length ({self.max_length}) so that a "
                       f"response token fits, got {mpl}")
        return out


@dataclass
class TrainConfig:
    """The optimisation loop shared by the stages.

    ``steps``: optimizer steps (overrides ``epochs``); ``batch_size`` examples per micro-batch;
    ``grad_accum`` micro-batches per step; AdamW with ``lr``/``weight_decay``/``betas``; ``warmup_steps``
    of linear warm-up then ``schedule`` (cosine to 10% of lr, linear to 0, or constant);
    ``max_grad_norm`` clipping (0 = off); ``eval_every`` steps (0 = only at the end);
    ``mixed_precision``: ``auto`` = bf16 autocast on CUDA devices that support it, none on CPU.
    """

    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    eval_every: int = 0
    log_every: int = 10
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    save: bool = True

    def problems(self) -> list[str]:
        """Value checks: counts at least 1, a positive finite lr, betas in [0, 1)."""
        out = rule_problems(self, {
            "steps": AT_LEAST_1, "epochs": POSITIVE, "batch_size": AT_LEAST_1, "grad_accum": AT_LEAST_1,
            "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "warmup_steps": AT_LEAST_0, "max_grad_norm": NON_NEGATIVE,
            "eval_every": AT_LEAST_0, "log_every": AT_LEAST_1,
        })
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append(f"betas: must be two numbers in [0, 1), got {self.betas!r}")
        return out


@dataclass
class DistributedConfig:
    """How several processes share the work (ignored in a single process).

    ``strategy``: ``auto`` (FSDP2 when launched with several processes), ``fsdp`` (``fully_shard``
    per transformer block plus the root), ``ddp`` (whole replicas, gradients all-reduced) or
    ``none``. ``reshard_after_forward``: free gathered parameters after each block's forward (less
    memory, one more all-gather in backward). ``param_dtype``: ``auto`` = bf16 compute with fp32
    gradient reduction on CUDA devices that support it, fp32 elsewhere; or ``float32`` /
    ``bfloat16``. ``cpu_offload``: keep sharded parameters, gradients and optimizer state in CPU
    memory (FSDP only).
    """

    strategy: Literal["auto", "fsdp", "ddp", "none"] = "auto"
    reshard_after_forward: bool = True
    param_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    cpu_offload: bool = False

    def problems(self) -> list[str]:
        """Several processes need a strategy that keeps their replicas in step."""
        import os

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and self.strategy == "none":
            return [f"strategy: 'none' would train {world} unsynchronised copies; use auto, fsdp or ddp"]
        if self.cpu_offload and self.strategy == "ddp":
            return ["cpu_offload: needs strategy fsdp (or auto)"]
        return []


@dataclass
class CheckpointConfig:
    """Mid-stage checkpoints for ``rlhf run --resume``. ``every``: optimizer steps (sft, reward) or
    iterations (ppo) between checkpoints, 0 = none mid-stage (a finished stage is always kept);
    ``keep``: how many of a stage's newest checkpoints to keep; ``on_signal``: on SIGTERM/SIGINT,
    write a checkpoint at the next step boundary before stopping."""

    every: int = 0
    keep: int = 2
    on_signal: bool = True

    def problems(self) -> list[str]:
        """Value checks."""
        return rule_problems(self, {"every": AT_LEAST_0, "keep": AT_LEAST_1})


@dataclass
class KernelConfig:
    """``backend``: auto | reference | triton | cpp (see ``rlhf_kernels``)."""

    backend: Literal["auto", "reference", "triton", "cpp"] = "auto"


@dataclass
class StageSpec:
    """One pipeline entry: the stage plugin (``stage``), its unique ``name`` (default: the stage),
    its validated options (``config``, an instance of the stage's ``config_class``) and, when two
    plugins register the stage name, the ``plugin`` that provides it."""

    stage: str
    name: str
    config: Any
    plugin: str | None = None


@dataclass
class RunConfig:
    """A whole run: seed, base model, kernel backend, distribution, local plugin modules and the
    stage list."""

    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: list[ComponentSpec] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)
    stages: list[StageSpec] = field(default_factory=list)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Plain config data as ``path -> leaf`` with the paths problems use (``stages[0].train.lr``)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}[{i}]"))
        return out
    return {prefix: data}


def to_plain(obj: Any) -> Any:
    """A resolved config as plain YAML-able data (what ``config.yaml`` in a run dir holds)."""
    if isinstance(obj, StageSpec):
        head = {"stage": obj.stage, "name": obj.name, **({"plugin": obj.plugin} if obj.plugin else {})}
        return {**head, **to_plain(obj.config)}
    if isinstance(obj, ComponentSpec):
        if not obj.options and obj.plugin is None:
            return obj.name
        return {"name": obj.name, **({"plugin": obj.plugin} if obj.plugin else {}), **obj.options}
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
