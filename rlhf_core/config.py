"""YAML + ``--set`` overrides -> typed, validated config. Unknown keys are errors.

Every problem found (unknown key, wrong type, unknown component, bad value) is collected and
reported together, with its dotted path and what is accepted, before any model is loaded.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Union

import yaml

from .errors import UserError


#: The supported plugin API of this module (see README "Plugin API").
__all__ = ["ComponentSpec", "ConfigError", "DataConfig", "TrainConfig", "ModelConfig", "RunConfig",
           "rule_problems", "POSITIVE", "NON_NEGATIVE", "AT_LEAST_0", "AT_LEAST_1", "FRACTION", "UNIT",
           "flatten", "to_plain"]

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


# ----------------------------------------------------------------------------- value rules
# A config dataclass may define ``problems() -> list[str]`` ("field: message", relative paths) for
# value checks; it is called only when every field parsed, so it never sees half-parsed values.

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
class ModelConfig:
    """The base model. ``name_or_path``: ``builtin:tiny`` (offline tiny Llama + byte tokenizer),
    a local directory, or a hub id (loaded with ``from_pretrained``). ``gradient_checkpointing``
    recomputes each block's activations in the backward pass of every trainable model (less memory,
    about a third more compute)."""

    name_or_path: str = "builtin:tiny"
    tokenizer: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False

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


# ----------------------------------------------------------------------------- coercion

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if tp is ComponentSpec:
        return "a name or {name: ..., options...}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Convert YAML ``value`` to type ``tp``; append ``path: message`` to ``problems`` on failure."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = coerce(arg, value, path, trial)
            if not trial:
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {value!r}")
            return []
        (item,) = typing.get_args(tp)
        return [coerce(item, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return {}
        return dict(value)
    if tp is ComponentSpec:
        if isinstance(value, str) and value:
            return ComponentSpec(value)
        if isinstance(value, dict) and isinstance(value.get("name"), str) and value["name"]:
            plugin = value.get("plugin")
            if plugin is not None and not isinstance(plugin, str):
                problems.append(f"{path}.plugin: expected a plugin name, got {plugin!r}")
                return None
            options = {k: v for k, v in value.items() if k not in ("name", "plugin")}
            return ComponentSpec(value["name"], options, plugin)
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    if dataclasses.is_dataclass(tp):
        return coerce_dataclass(tp, value, path, problems)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; accept any spelling Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {value!r}")
        return value
    return value


def coerce_dataclass(cls: type, value: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from a mapping: unknown keys are errors that list the known ones."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(f"{path or 'config'}: expected a mapping, got {value!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    before = len(problems)
    kwargs = {}
    for key, raw in value.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            problems.append(f"{sub}: unknown key; accepted: {', '.join(sorted(fields))}")
            continue
        if isinstance(raw, dict) and "name" not in raw and _default_component(fields[key]) is not None:
            # Options set on a component the config left at its default: ``loss.clip_eps=0.1``.
            raw = {"name": _default_component(fields[key]).name, **raw}
        kwargs[key] = coerce(hints[key], raw, sub, problems)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{path}.{name}: required" if path else f"{name}: required")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(f"{path or 'config'}: {exc}")
        return None
    if len(problems) == before and hasattr(obj, "problems"):
        problems.extend(f"{path}.{p}" if path else p for p in obj.problems())
    return obj


def _default_component(f: dataclasses.Field) -> ComponentSpec | None:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return default if isinstance(default, ComponentSpec) else None


def check_options(entry: Any, spec: ComponentSpec, path: str, problems: list[str]) -> None:
    """Check a component's options against the keyword parameters it accepts (and their types)."""
    accepted = entry.options()
    hints: dict[str, Any] = {}
    try:
        target = entry.obj.__init__ if inspect.isclass(entry.obj) else entry.obj
        hints = typing.get_type_hints(target)
    except Exception:  # plugin annotations that do not resolve: check names only
        pass
    before = len(problems)
    for key, value in spec.options.items():
        if key not in accepted:
            choices = ", ".join(sorted(accepted)) or "(no options)"
            problems.append(f"{path}.{key}: unknown option for {entry.kind} {spec.name!r}; accepted: {choices}")
        elif key in hints:
            spec.options[key] = coerce(hints[key], value, f"{path}.{key}", problems)
    if len(problems) > before:
        return
    # Values: the component's own ``check_options(**options)``; an advantage estimator (built from
    # its options alone) is simply constructed. Either raises ValueError with a readable message.
    check = getattr(entry.obj, "check_options", None)
    if check is None and entry.kind == "advantage":
        check = entry.obj
    if check is None:
        return
    try:
        check(**spec.options)
    except (ValueError, TypeError) as exc:
        problems.append(f"{path}: {exc}")
    except Exception as exc:  # a plugin's validator that crashed: still one line, naming the plugin
        problems.append(f"{path}: {entry.kind} {spec.name!r} of plugin {entry.plugin!r} failed to check its "
                        f"options: {type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------- loading

def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.0.c=value`` -> (["a", "b", "0", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected KEY.PATH=VALUE"], "command line")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError([f"--set {text!r}: empty key"], "command line")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        if not raw.lstrip().startswith(("[", "{", '"', "'")):
            return key.split("."), raw  # a plain word YAML cannot start with, such as @sft: the text itself
        raise ConfigError([f"--set {key}: the value {raw!r} is not valid YAML ({getattr(exc, 'problem', exc)}); "
                           "quote it, e.g. --set 'KEY=[0.9, 0.95]'"], "command line") from None
    return key.split("."), value


def apply_override(data: dict, keys: list[str], value: Any) -> None:
    """Set ``value`` at ``keys`` in ``data``; stages can be addressed by index or by name."""
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            index = _list_index(node, key, keys[: i + 1])
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError([f"--set {'.'.join(keys)}: {'.'.join(keys[:i])} is not a mapping"], "command line")
        if last:
            node[key] = value
        else:
            current = node.get(key)
            if isinstance(current, str):
                # A component written as a bare name: ``loss: mse`` + ``loss.delta=2`` keeps the name.
                node[key] = {"name": current}
            elif current is None:
                node[key] = {}
            elif not isinstance(current, (dict, list)):
                raise ConfigError([f"--set {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is {current!r}, not a mapping"],
                                  "command line")
            node = node[key]


def _list_index(node: list, key: str, where: list[str]) -> int:
    if key.isdigit() and int(key) < len(node):
        return int(key)
    for j, item in enumerate(node):
        if isinstance(item, dict) and (item.get("name") or item.get("stage")) == key:
            return j
    names = [str(it.get("name") or it.get("stage")) for it in node if isinstance(it, dict)]
    raise ConfigError(
        [f"--set {'.'.join(where)}: no list entry {key!r}; use an index below {len(node)} or a name: {', '.join(names)}"],
        "command line",
    )


def load_raw(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """Read YAML (or the embedded default when ``path`` is None) and apply ``--set`` overrides."""
    if path is None:
        text, source = default_config_text(), "embedded default config"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"{p}: no such file"], str(p))
        text, source = p.read_text(encoding="utf-8"), str(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}invalid YAML: {getattr(exc, 'problem', exc)}"], source) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], source)
    data = copy.deepcopy(data)
    for text_override in overrides:
        keys, value = parse_override(text_override)
        apply_override(data, keys, value)
    return data


def default_config_text() -> str:
    """The embedded default pipeline (what ``rlhf run`` with no config runs)."""
    return (Path(__file__).parent / "configs" / "default.yaml").read_text(encoding="utf-8")


def resolve(data: dict, registry: Any, source: str = "config") -> RunConfig:
    """Validate ``data`` against the run schema, each stage's ``config_class`` and the registry."""
    problems: list[str] = []
    stages_raw = data.get("stages", None)
    top = {k: v for k, v in data.items() if k != "stages"}
    config = coerce_dataclass(RunConfig, top, "", problems) or RunConfig()
    for i, spec in enumerate(config.tracking or []):
        if spec is None:
            continue
        try:
            check_options(registry.lookup("tracker", spec), spec, f"tracking[{i}]", problems)
        except ValueError as exc:
            problems.append(f"tracking[{i}]: {exc}")
    if not isinstance(stages_raw, list) or not stages_raw:
        problems.append("stages: expected a non-empty list of stages, e.g. [{stage: sft}, {stage: reward}]")
        stages_raw = []
    seen: set[str] = set()
    for i, raw in enumerate(stages_raw):
        path = f"stages[{i}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("stage"), str):
            problems.append(f"{path}: expected a mapping with a 'stage' key naming a stage plugin; available: "
                            f"{', '.join(registry.names('stage'))}")
            continue
        plugin = raw.get("plugin")
        if plugin is not None and not isinstance(plugin, str):
            problems.append(f"{path}.plugin: expected a plugin name, got {plugin!r}")
            continue
        try:
            entry = registry.get("stage", raw["stage"], plugin=plugin)
        except ValueError as exc:
            problems.append(f"{path}.stage: {exc}")
            continue
        name = raw.get("name") or raw["stage"]
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            problems.append(f"{path}.name: expected a plain name (it becomes a directory), got {name!r}")
            continue
        if name in seen:
            problems.append(f"{path}.name: stage name {name!r} is used twice; give each stage a unique 'name'")
        seen.add(name)
        options = {k: v for k, v in raw.items() if k not in ("stage", "name", "plugin")}
        before = len(problems)
        stage_cfg = coerce_dataclass(entry.obj.config_class, options, path, problems)
        if stage_cfg is None:
            continue
        parsed = len(problems) == before
        stage = entry.obj()
        try:
            components = stage.components(stage_cfg)
        except Exception:
            if parsed:
                raise
            components = []  # a half-parsed config; its problems are already listed
        for kind, spec, sub, families in components:
            if spec is None:
                continue
            try:
                comp = registry.lookup(kind, spec, families)
            except ValueError as exc:
                problems.append(f"{path}.{sub}: {exc}")
                continue
            check_options(comp, spec, f"{path}.{sub}", problems)
        if parsed and len(problems) == before and hasattr(stage, "validate"):  # never sees half-parsed fields
            problems.extend(f"{path}.{p}" for p in stage.validate(stage_cfg, registry))
        config.stages.append(StageSpec(raw["stage"], name, stage_cfg, plugin))
    if problems:
        raise ConfigError(problems, source)
    return config


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
