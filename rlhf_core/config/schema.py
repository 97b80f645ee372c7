"""The run schema: config dataclasses (model, data, train, distributed, checkpoint, kernels, stages,
the run) and the value rules they check with ``problems()``."""
from __future__ import annotations

import dataclasses
import keyword
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from ..distributed import planned_world_size



@dataclass
class ComponentSpec:
    """A component choice: ``name`` plus keyword ``options``. In YAML either ``mse`` or
    ``{name: huber, delta: 2.0}``."""

    name: str
    """The registered name of the component (``rlhf plugins`` lists them)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Its keyword options, written beside ``name`` in YAML; checked against its signature."""
    plugin: str | None = None
    """Which plugin's component ``name`` means when two plugins register it (``{name: length, plugin: my-plugin}``)."""


@dataclass
class WeightedComponent(ComponentSpec):
    """One term of a weighted sum of components (several rewards): ``{name: math, weight: 1.0,
    ...options}``; a bare name has weight 1."""

    weight: float = 1.0
    """The term's weight in the sum (a finite number)."""


def component_keys(cls: type) -> tuple[str, ...]:
    """The keys of a component mapping that are the host's, not the component's options: ``name``,
    ``plugin`` and any field a subclass of :class:`ComponentSpec` adds (``weight``)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != "options")


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
    """LoRA adapters (through the ``peft`` library) on every trainable model."""

    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Adapter scale numerator: the update is scaled by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter input, in [0, 1)."""
    target_modules: list[str] | str = "all-linear"
    """``all-linear`` (every linear layer but the output head) or a list of module names such as ``[q_proj, v_proj]``."""
    merge: bool = False
    """Also save the merged model in ``<stage output>/merged`` (an ordinary Hugging Face directory)."""

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
    """The base model every stage starts from."""

    name_or_path: str = "builtin:tiny"
    """``builtin:tiny`` (offline 2-layer Llama with a byte tokenizer), a local directory (a saved model, or a LoRA
    adapter directory a stage wrote) or a hub id (loaded with ``from_pretrained``)."""
    tokenizer: str | None = None
    """Where to load the tokenizer from, when not from ``name_or_path``."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Dtype of the weights; ``auto`` keeps the checkpoint's."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda:N``."""
    trust_remote_code: bool = False
    """Passed to ``from_pretrained``: run the model repository's own Python code."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"] | None = None
    """The attention kernels of every model loaded (null: transformers' default, ``sdpa``); ``flash_attention_2`` (the
    ``flash-attn`` package, CUDA, bf16/fp16) gives ``data.packing`` variable-length kernels."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass of every trained model (less memory, about a third more
    compute)."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of every weight (null: full fine-tuning)."""

    def problems(self) -> list[str]:
        """Value checks (see :func:`rule_problems`)."""
        return [] if self.name_or_path else ["name_or_path: must not be empty"]


@dataclass
class GenerationConfig:
    """Sampling: ``temperature``, nucleus ``top_p``, ``max_new_tokens`` per response (EOS ends one)."""

    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``, in (0, 1]."""
    max_new_tokens: int = 32
    """Most tokens per response; EOS ends one earlier."""

    def problems(self) -> list[str]:
        """Value checks."""
        return rule_problems(self, {"temperature": POSITIVE, "max_new_tokens": AT_LEAST_1,
                                    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]")})


@dataclass
class DataConfig:
    """Where a stage's examples come from and how they are cut to length."""

    train: str = "builtin:letters"
    """Training records: a JSONL/JSON/CSV/Parquet file, ``builtin:NAME``, a 🤗 ``save_to_disk`` directory or
    ``hf:NAME``."""
    eval: str | None = None
    """Held-out records (same forms as ``train``); without it, ``eval_fraction`` of ``train`` is held out."""
    eval_fraction: float = 0.1
    """Share of ``train`` held out (seeded shuffle) when ``eval`` is not given, in [0, 1)."""
    max_length: int = 256
    """Most prompt + response tokens of an example; the response is cut on the right."""
    max_prompt_length: int | None = None
    """Most prompt tokens (the prompt keeps its last ones); null = half of ``max_length`` (ppo: ``max_length -
    generation.max_new_tokens``). An example left with no response token is skipped and counted."""
    builtin_size: int = 2000
    """How many examples a ``builtin:NAME`` dataset generates."""
    limit: int | None = None
    """Use at most this many training examples (null: all)."""
    fields: dict[str, str] = field(default_factory=dict)
    """Our field names mapped to the source's columns, e.g. ``{prompt: question, response: answer, score: rating}``
    (also the fields a reward reads, ``{answer: solution}``); applied before the record's format is read."""
    chat_template: Literal["auto", "always", "never"] = "auto"
    """The tokenizer's chat template: ``auto`` = for conversational records (message lists), plain strings as written
    (one notice when the tokenizer has a template); ``always`` = plain strings too, each prompt as one user message
    (an error for a tokenizer without a template); ``never`` = no template (messages become ``role: content``
    lines)."""
    split: str = "train"
    """Split of a 🤗 ``DatasetDict`` directory or ``hf:NAME`` dataset used for ``train``."""
    eval_split: str = "test"
    """Split used for ``eval`` when it names a 🤗 ``DatasetDict`` directory or ``hf:NAME``."""
    packing: bool = False
    """Padding-free training: the sequences of each micro-batch share rows (best-fit decreasing, rows as long as its
    longest sequence, none ever split) with attention that never crosses a sequence boundary, instead of each being
    padded to the longest; the same loss per token, in a fraction of the time on data of mixed lengths (``sft``,
    ``reward``, ``dpo``, ``kto``, and ``ppo``'s scoring and update forwards)."""

    def problems(self) -> list[str]:
        """Value checks: lengths that leave room for a response, a held-out share below 1."""
        out = rule_problems(self, {"eval_fraction": FRACTION, "max_length": (lambda v: v >= 2, "at least 2"),
                                   "builtin_size": AT_LEAST_1, "limit": AT_LEAST_1})
        if not self.train:
            out.append("train: must name a data file or builtin:NAME")
        for ours, theirs in self.fields.items():
            if not ours or not isinstance(theirs, str) or not theirs:
                out.append(f"fields.{ours}: maps a field (prompt, response, completion, score, label, chosen, rejected, "
                           f"messages, or one a reward reads) to a column name, got {ours}: {theirs!r}")
        mpl = self.max_prompt_length
        if mpl is not None and self.max_length >= 2 and not 1 <= mpl < self.max_length:
            out.append(f"max_prompt_length: must be at least 1 and below max_length ({self.max_length}) so that a "
                       f"response token fits, got {mpl}")
        return out


@dataclass
class OptimConfig:
    """One optimizer step as every stage takes it (:class:`rlhf_core.training.OptimizerStep`): AdamW,
    warm-up and a learning-rate schedule, gradient clipping, mixed precision."""

    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas: two numbers in [0, 1)."""
    warmup_steps: int = 0
    """Steps of linear warm-up before ``schedule``."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """After warm-up: cosine to 10% of ``lr``, linear to 0, or constant."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping; 0 = off."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast: ``auto`` = bf16 on CUDA devices that support it, none on CPU."""

    def problems(self) -> list[str]:
        """Value checks: a positive finite lr, betas in [0, 1)."""
        out = rule_problems(self, {"lr": POSITIVE, "weight_decay": NON_NEGATIVE, "warmup_steps": AT_LEAST_0,
                                   "max_grad_norm": NON_NEGATIVE})
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append(f"betas: must be two numbers in [0, 1), got {self.betas!r}")
        return out


@dataclass
class TrainConfig(OptimConfig):
    """The optimisation loop shared by the stages: the optimizer step (:class:`OptimConfig`: AdamW,
    warm-up, schedule, clipping, precision) and the loop around it (steps, batches, logging)."""

    steps: int | None = None
    """Optimizer steps; overrides ``epochs`` when set."""
    epochs: float = 1.0
    """Passes over the training data, when ``steps`` is null."""
    batch_size: int = 16
    """Examples per micro-batch, global over all processes (with ``max_tokens_per_batch``: per held-out batch only)."""
    max_tokens_per_batch: int | None = None
    """Token-budget micro-batches: consecutive examples of the shuffled stream while their tokens (every sequence of
    an example) fit this budget, global over all processes, instead of ``batch_size`` examples; at least the most
    tokens one example can have (``data.max_length``; twice that for pairs). Null = off."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    eval_every: int = 0
    """Steps between held-out evaluations; 0 = only at the end."""
    log_every: int = 10
    """Steps between lines in ``metrics.jsonl``."""
    save: bool = True
    """Save the trained model in the stage's output directory."""

    def problems(self) -> list[str]:
        """Value checks: counts at least 1, and the optimizer's (:meth:`OptimConfig.problems`)."""
        return rule_problems(self, {
            "steps": AT_LEAST_1, "epochs": POSITIVE, "batch_size": AT_LEAST_1, "grad_accum": AT_LEAST_1,
            "max_tokens_per_batch": AT_LEAST_1, "eval_every": AT_LEAST_0, "log_every": AT_LEAST_1,
        }) + super().problems()


@dataclass
class DistributedConfig:
    """How several processes share the work (ignored in a single process)."""

    strategy: Literal["auto", "fsdp", "ddp", "none"] = "auto"
    """``auto`` (FSDP2 with several processes), ``fsdp`` (``fully_shard`` per transformer block plus the root), ``ddp``
    (whole replicas, gradients all-reduced) or ``none`` (refused with several processes)."""
    reshard_after_forward: bool = True
    """Free gathered parameters after each block's forward (less memory, one more all-gather in the backward)."""
    param_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """FSDP compute dtype: ``auto`` = bf16 with fp32 gradient reduction on CUDA devices that support it, fp32
    elsewhere."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state in CPU memory (FSDP on CUDA only)."""

    def problems(self) -> list[str]:
        """Several processes need a strategy that keeps their replicas in step."""
        world = planned_world_size()
        if world > 1 and self.strategy == "none":
            return [f"strategy: 'none' would train {world} unsynchronised copies; use auto, fsdp or ddp"]
        if self.cpu_offload and self.strategy == "ddp":
            return ["cpu_offload: needs strategy fsdp (or auto)"]
        return []


@dataclass
class CheckpointConfig:
    """Mid-stage checkpoints for ``rlhf run --resume``."""

    every: int = 0
    """Optimizer steps (sft, reward) or iterations (ppo) between checkpoints; 0 = none mid-stage (a finished stage is
    always kept)."""
    keep: int = 2
    """How many of a stage's newest checkpoints are kept."""
    on_signal: bool = True
    """On SIGTERM/SIGINT, write a checkpoint at the next step boundary before stopping."""

    def problems(self) -> list[str]:
        """Value checks."""
        return rule_problems(self, {"every": AT_LEAST_0, "keep": AT_LEAST_1})


@dataclass
class KernelConfig:
    """Which implementation of the fused kernels (``rlhf_kernels``) the stages use."""

    backend: Literal["auto", "reference", "triton", "cpp"] = "auto"
    """``auto`` (Triton on CUDA, C++ on CPU when built, else the reference), ``reference`` (plain PyTorch), ``triton``
    or ``cpp``."""


@dataclass
class StageSpec:
    """One pipeline entry; in YAML its options sit beside ``stage`` and ``name``."""

    stage: str
    """The registered stage to run (``sft``, ``reward``, ``ppo`` or a plugin's)."""
    name: str
    """Unique name of this entry, used by ``@NAME``, ``--set stages.NAME...`` and the output directory; default: the
    stage."""
    config: Any
    """The stage's validated options, an instance of its ``config_class``."""
    plugin: str | None = None
    """Which plugin's stage ``stage`` means when two plugins register it."""


@dataclass
class RunConfig:
    """A whole run: seed, base model, kernel backend, distribution, local plugin modules and the
    stage list."""

    seed: int = 0
    """Seeds Python and torch at the start of every stage."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    kernels: KernelConfig = field(default_factory=KernelConfig)
    """The fused kernels' backend."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """How several processes share the work."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Mid-stage checkpoints for ``--resume``."""
    tracking: list[ComponentSpec] = field(default_factory=list)
    """Experiment trackers besides ``metrics.jsonl`` and the plots, e.g. ``[tensorboard, {name: wandb, project: p}]``."""
    plugins: list[str] = field(default_factory=list)
    """Local plugin modules, no packaging needed: an import path, a module next to the config file, or a ``.py`` file
    path."""
    stages: list[StageSpec] = field(default_factory=list)
    """The pipeline: stages run in order, each ``{stage: NAME, name: ..., <its options>}``."""


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


def yaml_key(name: str) -> str:
    """The config key of a dataclass field: its name, less the trailing underscore of a field named
    after a Python keyword (``async_`` is written ``async``)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def to_plain(obj: Any) -> Any:
    """A resolved config as plain YAML-able data (what ``config.yaml`` in a run dir holds)."""
    if isinstance(obj, StageSpec):
        head = {"stage": obj.stage, "name": obj.name, **({"plugin": obj.plugin} if obj.plugin else {})}
        return {**head, **to_plain(obj.config)}
    if isinstance(obj, WeightedComponent):
        return {"name": obj.name, "weight": obj.weight, **({"plugin": obj.plugin} if obj.plugin else {}), **obj.options}
    if isinstance(obj, ComponentSpec):
        if not obj.options and obj.plugin is None:
            return obj.name
        return {"name": obj.name, **({"plugin": obj.plugin} if obj.plugin else {}), **obj.options}
    if dataclasses.is_dataclass(obj):
        return {yaml_key(f.name): to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
