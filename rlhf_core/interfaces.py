"""The four component kinds a plugin can provide, and the objects the engine hands them.

Shapes use ``B`` = batch (sequences), ``T`` = tokens per sequence (shifted: position ``t`` holds
the prediction of token ``t + 1``), ``V`` = vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, runtime_checkable

import torch

from .errors import UserError

if TYPE_CHECKING:  # annotations only: these modules import this one
    from .checkpoint import Checkpointer
    from .config import RunConfig
    from .registry import Registry
    from .tracking import Tracker


#: The supported plugin API of this module (see docs/reference/api.md).
__all__ = ["Stage", "StageContext", "StageResult", "StageInput", "StageError", "ComponentError", "TokenLoss",
           "ScoreLoss", "PairwiseLoss", "PolicyLoss", "PolicyLossInputs", "FusedPolicyLoss", "Reward", "CheckedReward", "RewardSum", "reward_fields", "reward_specs", "fields_read_by", "build_rewards", "AdvantageInputs", "AdvantageEstimator",
           "TrackerBackend", "Generator", "checked_rewards", "checked_advantages", "checked_rollout"]

class StageError(UserError, ValueError):
    """A stage cannot run with the given options or inputs; shown to the user without a traceback."""


class ComponentError(UserError, RuntimeError):
    """A plugin component (reward, advantage estimator, ...) misbehaved at run time: it raised or
    returned something other than its contract says. The message names it, its plugin and what was
    expected."""


@dataclass
class StageInput:
    """Something a stage will read, checked by the host before the first stage trains.

    ``path``: where it is set in the stage's config (``data.train``, ``init``); ``kind``:
    ``"data"`` (``value`` is a data file or ``builtin:NAME``, read and validated as ``data_kind``
    records, ``builtin_size`` of them for a builtin, columns renamed by ``fields``, 🤗 ``split``;
    ``extra``: the fields a component reads beside the kind's own, ``{field: who reads it}``, e.g.
    ``{"answer": "reward 'math'"}``), ``"model"`` (``value`` is an init source: ``auto``,
    ``base``, ``@STAGE`` naming an earlier stage, or a directory / hub id) or ``"reward_model"``
    (``value`` is where a trained reward model comes from: ``auto`` needs an earlier stage that
    trains one, ``@STAGE`` must name one, a directory must hold one).
    """

    path: str
    kind: str
    value: str
    data_kind: str | None = None
    builtin_size: int = 0
    fields: dict[str, str] | None = None
    split: str = "train"
    extra: dict[str, str] | None = None


@dataclass
class StageResult:
    """What a stage leaves behind for later stages and the run summary.

    ``model_dir``: a ``save_pretrained`` directory (policy or reward model) or None;
    ``kind``: ``"policy"`` or ``"reward"``; ``summary``: final metrics (floats) for summary.json
    under ``stages.<name>``; ``headline``: numbers promoted to the top level of summary.json
    (e.g. ``gold_score_ppo``).
    """

    model_dir: Path | None
    kind: str
    summary: dict[str, float] = field(default_factory=dict)
    headline: dict[str, float] = field(default_factory=dict)


@dataclass
class StageContext:
    """Everything the engine gives a stage: where to write, what came before, how to log.

    ``results`` maps earlier stage names to their :class:`StageResult` in pipeline order.
    ``tracker`` logs metrics (``tracker.log(step, {...})``) tagged with this stage's name.
    ``checkpointer`` (:class:`rlhf_core.checkpoint.Checkpointer`) saves and restores mid-stage
    checkpoints; a stage that uses it resumes exactly after a kill (the built-in ones do).
    """

    name: str
    stage_dir: Path
    run_config: RunConfig
    registry: Registry
    tracker: Tracker | None
    device: torch.device
    seed: int
    results: dict[str, StageResult]
    checkpointer: Checkpointer | None = None
    shared: Any = None  # a SharedBackbone while a stage builds models that may share its policy's base

    def wrap(self, model: torch.nn.Module, *, trainable: bool = True) -> torch.nn.Module:
        """Prepare a model for this run's processes: gradient checkpointing for trainable models
        when ``model.gradient_checkpointing`` is on, then sharding as ``distributed:`` says (a no-op
        in a single process). Create optimizers after this, from the returned module's parameters."""
        from .distributed import wrap

        if trainable and self.run_config.model.gradient_checkpointing:
            target = getattr(model, "backbone", model)
            if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.2x
                target.activation_checkpointing_enable({"use_reentrant": False})
            else:
                target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return wrap(model, self.run_config.distributed, self.device, trainable=trainable)

    @property
    def kernel_backend(self) -> str | None:
        """The ``backend=`` argument for ``rlhf_kernels`` ops (None = auto) from ``kernels.backend``."""
        backend = self.run_config.kernels.backend
        return None if backend == "auto" else backend

    def init_source(self, init: str, kind: str) -> str:
        """Where a stage's starting weights come from, as a ``from_pretrained`` source.

        ``auto``: the latest earlier result of ``kind`` (``"policy"``/``"reward"``), else the base
        model; ``base``: the run's ``model.name_or_path``; ``@NAME``: the output of stage NAME;
        anything else: a path or hub id as given.
        """
        if init == "auto":
            found = self.find_result(kind)
            return str(found[1].model_dir) if found else self.run_config.model.name_or_path
        if init == "base":
            return self.run_config.model.name_or_path
        if init.startswith("@"):
            result = self.results.get(init[1:])
            if result is None or result.model_dir is None:
                raise StageError(f"stage {self.name!r}: init {init!r} names no earlier stage with a saved model; "
                                 f"earlier stages: {', '.join(self.results) or '(none)'}")
            return str(result.model_dir)
        return init

    def load_policy(self, init: str) -> tuple[Any, torch.nn.Module]:
        """``(tokenizer, trainable causal LM)`` for an ``init`` source (see :meth:`init_source`)."""
        return self.tokenizer_for(self.init_source(init, "policy")), self.load_model(init)

    def load_model(self, init: str, *, trainable: bool = True) -> torch.nn.Module:
        """The causal LM of an ``init`` source on this run's device, with LoRA adapters when
        ``model.lora`` is set (see :meth:`adapt`), prepared with :meth:`wrap`; ``trainable=False``
        gives a frozen copy in eval mode (a reference model; with LoRA prefer the trainable model
        with its adapters disabled, see :func:`rlhf_core.models.is_lora`)."""
        from .models import load_causal_lm

        source = self.init_source(init, "policy")
        model = load_causal_lm(self.run_config.model, source, seed=self.seed).to(self.device)
        if not trainable:
            model = model.eval().requires_grad_(False)
        else:
            model = self.adapt(model, source)
        return self.wrap(model, trainable=trainable)

    def adapt(self, model: torch.nn.Module, source: str) -> torch.nn.Module:
        """A trainable model with LoRA adapters (``peft``) when ``model.lora`` is set, else as is.
        ``source`` is where its base weights came from (an adapter records it). A
        :class:`rlhf_core.models.ScalarHeadModel` gets adapters on its backbone and keeps its head
        fully trainable. Call it before :meth:`wrap`."""
        lora = self.run_config.model.lora
        if lora is None:
            return model
        from .models import ScalarHeadModel, apply_lora

        if isinstance(model, ScalarHeadModel):
            model.backbone = apply_lora(model.backbone, lora, source, causal_lm=False)
            return model
        return apply_lora(model, lora, source)

    def load_scalar_model(self, source: str, *, name: str, trainable: bool) -> Any:
        """A scalar-head model (reward model, critic) from ``source`` (a saved reward model, or a
        causal LM whose decoder gets a fresh head) on this run's device, prepared with :meth:`wrap`
        (trainable ones with LoRA when ``model.lora`` is set). While the stage shares its LoRA
        policy's frozen base (:attr:`shared`, a :class:`rlhf_core.models.SharedBackbone`) and the
        source fits it, the model is instead adapter ``name`` and a head on that base
        (:class:`rlhf_core.models.AdapterScalarModel`): no copy of the weights. Either is called as
        ``model(ids, mask, position_ids=None, score=False)``."""
        from .models import ScalarHeadModel, is_reward_model_dir, load_causal_lm
        from .tracking import is_main_process

        if self.shared is not None:
            why = self.shared.why_not(source)
            if why and self.shared.required:
                raise StageError(f"stage {self.name!r}: shared_backbone is true, but the {name} cannot share the "
                                 f"policy's base weights: {why}; set shared_backbone: auto to give it its own copy")
            if not why:
                view = self.shared.add(name, source, trainable=trainable)
                if is_main_process():
                    print(f"{self.name}: {view.name} = LoRA adapter + head on the policy's frozen base weights (no copy)")
                return view
            if is_main_process():
                print(f"{self.name}: {name} keeps its own copy of the weights ({why})")
        model_cfg = self.run_config.model
        if is_reward_model_dir(source):
            model = ScalarHeadModel.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code,
                                                    attn_implementation=model_cfg.attn_implementation)
        else:
            model = ScalarHeadModel.from_causal_lm(load_causal_lm(model_cfg, source, seed=self.seed))
        if not trainable:
            return self.wrap(model.to(self.device).eval().requires_grad_(False), trainable=False)
        return self.wrap(self.adapt(model, source).to(self.device))

    def tokenizer_for(self, source: str):
        """The tokenizer of a model source: the config's ``model.tokenizer`` for the base model,
        else the one saved with the model."""
        from .models import load_tokenizer

        model_cfg = self.run_config.model
        return load_tokenizer(model_cfg, None if source == model_cfg.name_or_path else source)

    def find_result(self, kind: str) -> tuple[str, StageResult] | None:
        """The most recent earlier stage result of ``kind`` (``"policy"``/``"reward"``), if any."""
        for name, result in reversed(list(self.results.items())):
            if result.kind == kind:
                return name, result
        return None


@runtime_checkable
class Stage(Protocol):
    """A pipeline step. Reads top to bottom: setup -> loop -> save.

    ``config_class`` is a dataclass whose fields are the stage's options (validated before any model
    loads; an optional ``problems() -> list[str]`` method on it checks values); ``components(config)``
    lists the ``(kind, spec, config_path, loss_families)`` it will look up, so that unknown names and
    bad options are reported up front; an optional ``validate(config, registry) -> list[str]``
    reports cross-field problems (it only ever sees a fully parsed config; declare a third parameter
    ``run`` to also see the run's :class:`RunConfig` without its stages, e.g. ``model.lora``); an optional
    ``inputs(config, registry) -> list[StageInput]`` lists the data and models it reads, which the
    host checks before the first stage trains; an optional ``plan(config, registry, sizes) -> {label:
    value}`` says what the stage would do for ``rlhf run --dry-run`` (``sizes``: the record count of
    each data input by its config path, e.g. ``{"data.train": 1800}``); an optional class attribute
    ``produces`` (``"policy"`` or ``"reward"``, the :attr:`StageResult.kind` it returns) lets the
    host check before anything trains that a later stage reading a trained reward model
    (``path: auto``) has one to read; ``run`` does the work.
    """

    config_class: ClassVar[type]

    def components(self, config: Any) -> list[tuple[str, Any, str, tuple[str, ...] | None]]: ...

    def run(self, ctx: StageContext, config: Any) -> StageResult: ...


class TokenLoss(Protocol):
    """``(logits [B,T,V], labels [B,T] with -100 = ignore, *, backend) -> (loss [], metrics)``."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, *, backend: str | None = None,
                 **options: Any) -> tuple[torch.Tensor, dict[str, float]]: ...


class ScoreLoss(Protocol):
    """``(pred [B], target [B]) -> (loss [], metrics)``: regression of R_phi(x, y) on s."""

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, **options: Any) -> tuple[torch.Tensor, dict[str, float]]: ...


class PairwiseLoss(Protocol):
    """``(chosen [B], rejected [B]) -> (loss [], metrics)``: preference loss on reward scores."""

    def __call__(self, chosen: torch.Tensor, rejected: torch.Tensor, **options: Any) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class PolicyLossInputs:
    """What a policy loss (family ``"policy"``) sees for one micro-batch, all ``[B, T]`` over the
    response positions (0 off ``mask``):

    ``logprobs``: log pi_theta of the sampled tokens, **differentiable** (the stage computes them
    with the fused-linear kernels from the last hidden states and the LM head when
    ``fused_linear`` is on, else from the logits: a loss never sees ``[B, T, V]``);
    ``old_logprobs``: under the policy that sampled them, before this update (detached);
    ``advantages``; ``mask``: 1.0 on response tokens; ``ref_logprobs``: under the frozen reference
    (None when ``kl.coef`` is 0 and no reference exists); ``engine_logprobs``: the generator's own
    sampling log-probs (None for an engine that reports none, e.g. ``hf``); ``entropy``: the
    policy's per-token entropy, differentiable, computed only for a loss registered with
    ``needs=("entropy",)`` (else None); ``max_new_tokens``: the sampling budget per response.
    """

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    engine_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    max_new_tokens: int = 0


@dataclass(frozen=True)
class FusedPolicyLoss:
    """A policy loss's faster form, registered with it (``register(name, fn, family="policy",
    fused=FusedPolicyLoss(...))``) so that nothing outside the loss names it.

    ``options(loss_options, loss_agg) -> dict | None``: the keyword arguments of the two kernels
    below when they compute exactly what ``fn`` aggregated with ``loss_agg`` would, else None (the
    stage then runs ``fn`` on log-probs). ``on_logits(logits [B, T, V], labels, old_logprobs,
    advantages, ref_logprobs, mask, **kwargs)`` and ``on_linear(hidden [N, H], weight [V, H],
    labels [N], ...)`` (the same, from the last hidden states and the LM head) return the
    micro-batch's token mean (the host scales it to its share of the minibatch) and float metrics;
    both also take ``kl_estimator``, ``kl_in_loss``, ``beta``, ``entropy_coef`` and ``backend``.
    """

    options: Callable[[dict, str], dict | None]
    on_logits: Callable[..., tuple[torch.Tensor, dict[str, float]]]
    on_linear: Callable[..., tuple[torch.Tensor, dict[str, float]]]


class PolicyLoss(Protocol):
    """``loss(inputs: PolicyLossInputs, **options) -> (terms [B, T], metrics)``.

    ``terms`` are per-token loss terms (a sequence-level loss repeats its value over the
    sequence's tokens); the host multiplies them by ``mask`` and aggregates them with the stage's
    ``loss_agg`` mode over the global batch (every rank, every micro-batch), so the gradient does
    not depend on how the batch is split. ``metrics``: name -> a ``[B, T]`` tensor (its masked
    mean is logged, e.g. a clipped-token indicator) or a float. Keyword-only parameters with
    defaults are the options (``fn.check_options(**options)`` validates values). Registered with
    ``register(name, fn, family="policy", needs=(...), fused=...)``: ``needs`` lists the optional
    inputs it reads (``"ref_logprobs"``, ``"engine_logprobs"``, ``"entropy"``), checked before
    anything trains; ``fused`` an optional faster form of the same loss (:class:`FusedPolicyLoss`).
    """

    def __call__(self, inputs: PolicyLossInputs, **options: Any) -> tuple[torch.Tensor, dict[str, Any]]: ...


@runtime_checkable
class Reward(Protocol):
    """Scores responses: built as ``cls(ctx: StageContext, **options)`` once per stage.

    ``__call__(prompts: list[str], responses: list[str], **fields) -> Tensor [B]`` (finite floats,
    on any device), one score per response.

    ``fields`` (optional, class attribute) names the prompt records' data fields the reward reads
    (``("answer",)``, ``("tests",)``), or is a function of the reward's options returning them
    (``fields = staticmethod(lambda *, template, **_: ...)``). The host checks that every record
    of the stage's data has them before anything trains (a missing one is a ``FILE:LINE`` error;
    ``data.fields`` maps other column names onto them) and passes each as a keyword argument: a
    list aligned with ``responses`` (a prompt's value repeated for each of its samples). A reward
    without ``fields`` is called with prompts and responses alone.

    ``inputs(**options) -> list[StageInput]`` (optional, static) lists the models it reads, checked
    with the stage's own inputs before anything trains (``reward_model``: a trained reward model
    that ``path: auto`` must find in an earlier stage).
    """

    def __call__(self, prompts: list[str], responses: list[str], **fields: list[Any]) -> torch.Tensor: ...


def reward_fields(entry: Any, options: dict[str, Any]) -> tuple[str, ...]:
    """The data fields a registered reward reads with these ``options`` (see :class:`Reward`):
    its ``fields`` attribute, called with the options when it is a function. A value that is not a
    list of field names is a :class:`ComponentError` naming the reward."""
    declared = getattr(entry.obj, "fields", ())
    try:
        names = declared(**options) if callable(declared) else declared
    except (TypeError, ValueError) as exc:
        raise ComponentError(f"{describe(entry)}: its fields could not be computed from its options: {exc}") from exc
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise ComponentError(f"{describe(entry)} declares fields {names!r}; expected a tuple of field names such as "
                             "('answer',)")
    return tuple(names)


class CheckedReward:
    """A reward component as the host calls it: built from its registry ``entry`` and ``options``
    with ``ctx``; each call passes the declared :func:`reward_fields` of ``rows`` (the data records'
    fields, aligned with the responses) and checks the output (:func:`checked_rewards`)."""

    def __init__(self, entry: Any, ctx: Any, options: dict[str, Any]):
        self.entry, self.fields = entry, reward_fields(entry, options)
        self.reward = entry.obj(ctx, **options)

    def __call__(self, prompts: list[str], responses: list[str], rows: list[dict[str, Any]] | None = None) -> torch.Tensor:
        """``[B]`` float32 scores of ``responses``."""
        if self.fields and (rows is None or len(rows) != len(responses)):
            raise ComponentError(f"{describe(self.entry)} reads the data fields {', '.join(self.fields)}, and "
                                 "this caller gives no data records with the responses")
        values = {name: [row[name] for row in rows] for name in self.fields} if self.fields else {}
        return checked_rewards(self.entry, self.reward, prompts, responses, values)


class RewardSum:
    """A weighted sum of rewards, ``total = sum_i w_i * r_i``: ``terms`` are ``(name, weight,
    reward)`` with ``reward(prompts, responses, rows) -> [B]`` (a :class:`CheckedReward`). One
    term of weight 1 is that reward unchanged."""

    def __init__(self, terms: list[tuple[str, float, Callable[..., torch.Tensor]]]):
        self.terms = terms

    def score(self, prompts: list[str], responses: list[str],
              rows: list[dict[str, Any]] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total [B], parts)``: ``parts`` maps each term's name to its unweighted scores ``[B]``
        (empty for a single term of weight 1, whose scores are the total)."""
        parts = {name: reward(prompts, responses, rows) for name, _, reward in self.terms}
        if len(self.terms) == 1 and self.terms[0][1] == 1.0:
            return parts[self.terms[0][0]], {}
        total = sum(weight * parts[name] for name, weight, _ in self.terms)
        return total, parts


@dataclass
class AdvantageInputs:
    """What an advantage estimator sees for one rollout batch.

    ``rewards [B]``: sequence reward (reward minus the KL penalty when it is in the reward);
    ``token_rewards [B, T]``: the same reward spread per token (KL penalty per token, the
    sequence reward on the last response token); ``mask [B, T]``: 1 on response tokens;
    ``group_ids [B]``: which prompt each sample came from; ``values [B, T]`` or None: critic values.

    With several processes each rank holds its share of the rollout batch (a prompt's samples stay
    on one rank, so per-group statistics are local). A statistic over the *batch* must use
    ``all_reduce(tensor)``, the sum over ranks (the identity in a single process): e.g. the batch
    mean is ``all_reduce(rewards.sum()) / all_reduce(count)``.
    """

    rewards: torch.Tensor
    token_rewards: torch.Tensor
    mask: torch.Tensor
    group_ids: torch.Tensor
    values: torch.Tensor | None = None
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t, repr=False)

    def batch_mean(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """Mean of a ``[B]`` tensor over the whole (global) rollout batch."""
        both = self.all_reduce(torch.stack([per_sequence.double().sum(),
                                            torch.tensor(float(per_sequence.numel()), dtype=torch.float64,
                                                         device=per_sequence.device)]))
        return (both[0] / both[1].clamp(min=1)).to(per_sequence.dtype)


@runtime_checkable
class AdvantageEstimator(Protocol):
    """Turns rewards into per-token advantages: ``cls(**options)(inputs) -> Tensor [B, T]``.

    Advantages are 0 outside ``inputs.mask``. ``needs_values`` asks the stage for a critic (whose
    value targets are then ``advantages + values``); ``min_group_size`` (default 1) is the smallest
    ``samples_per_prompt`` the estimator makes sense with, checked before any model loads (on the
    instance built from the options, so an option may raise it). An
    estimator with state across batches (a running baseline) also defines ``state_dict()`` and
    ``load_state_dict(state)``, so checkpoints carry it. ``__init__(**options)`` raising
    ``ValueError`` rejects a bad option before anything trains.
    """

    needs_values: ClassVar[bool]
    min_group_size: ClassVar[int]

    def __call__(self, inputs: AdvantageInputs) -> torch.Tensor: ...


def describe(entry: Any) -> str:
    """``reward 'length' (plugin 'ppo-rewards')`` for a registry entry, for error messages."""
    human = {"advantage": "advantage estimator"}.get(entry.kind, entry.kind)
    return f"{human} {entry.name!r} (plugin {entry.plugin!r})"


def reward_specs(reward: Any, path: str = "reward") -> list[tuple[str, Any]]:
    """``(config path, spec)`` of each configured reward of a stage option: none for ``null``,
    ``path`` for one component, ``path[i]`` for each of a weighted list."""
    if reward is None:
        return []
    if isinstance(reward, list):
        return [(f"{path}[{i}]", spec) for i, spec in enumerate(reward)]
    return [(path, reward)]


def fields_read_by(registry: Any, specs: list[tuple[str, Any]]) -> dict[str, str]:
    """The data fields the rewards ``specs`` (``(config path, spec)``, see :func:`reward_specs`)
    read, each with who reads it first (``{"answer": "reward 'math' (plugin 'rewards-verifiable')"}``):
    the ``extra`` of a stage's data inputs and :func:`~rlhf_core.data.load_split`."""
    out: dict[str, str] = {}
    for path, spec in specs:
        entry = registry.lookup("reward", spec)
        for name in reward_fields(entry, spec.options):
            out.setdefault(name, f"{path} {spec.name!r} (plugin {entry.plugin!r})")
    return out


def build_rewards(ctx: Any, reward: Any) -> RewardSum | None:
    """A stage's reward option (one component, a weighted list, or ``None``) as one
    :class:`RewardSum` (None for ``None``): each term built once with its options and checked on
    every call, named for logging by its component name (``_2``, ``_3`` ... for repeats)."""
    terms: list[tuple[str, float, Any]] = []
    for _, spec in reward_specs(reward):
        name, n = spec.name, 1
        while name in {t[0] for t in terms}:
            n += 1
            name = f"{spec.name}_{n}"
        terms.append((name, getattr(spec, "weight", 1.0),
                      CheckedReward(ctx.registry.lookup("reward", spec), ctx, spec.options)))
    return RewardSum(terms) if terms else None


def checked_rewards(entry: Any, reward: Any, prompts: list[str], responses: list[str],
                    fields: dict[str, list[Any]] | None = None) -> torch.Tensor:
    """Call ``reward(prompts, responses, **fields)`` and check the :class:`Reward` contract: a float
    tensor of shape ``[B]`` with finite values. Anything else is a :class:`ComponentError` naming
    the reward."""
    who, n = describe(entry), len(responses)
    try:
        out = reward(prompts, responses, **(fields or {}))
    except Exception as exc:
        raise ComponentError(f"{who} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(out, torch.Tensor):
        raise ComponentError(f"{who} returned {type(out).__name__}; expected a float tensor of shape [{n}] "
                             "(one score per response)")
    if tuple(out.shape) != (n,):
        raise ComponentError(f"{who} returned shape {list(out.shape)}; expected [{n}] (one score per response)")
    out = out.float()
    bad = ~torch.isfinite(out)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ComponentError(f"{who} returned a non-finite score ({float(out[i])}) for {int(bad.sum())} of {n} "
                             f"responses, first for response {i}: {responses[i][:80]!r}; rewards must be finite")
    return out


def checked_advantages(entry: Any, advantages: Any, mask: torch.Tensor) -> torch.Tensor:
    """Check an advantage estimator's output: a tensor of exactly ``mask``'s shape ``[B, T]`` (a
    ``[B]`` or ``[B, 1]`` result is an error even where it would broadcast), finite on the mask."""
    who, shape = describe(entry), list(mask.shape)
    if not isinstance(advantages, torch.Tensor):
        raise ComponentError(f"{who} returned {type(advantages).__name__}; expected a tensor of shape {shape} [B, T]")
    if list(advantages.shape) != shape:
        raise ComponentError(f"{who} returned shape {list(advantages.shape)}; expected {shape} [B, T], one "
                             "advantage per response token (broadcast per-sequence values over the mask)")
    if not torch.isfinite(advantages[mask.bool()]).all():
        raise ComponentError(f"{who} returned non-finite advantages on response tokens")
    return advantages.float()


def checked_rollout(entry: Any, generate: Any, prompt_ids: list[list[int]], **settings: Any):
    """Run a generator's ``generate`` and check what it returns: a
    :class:`rlhf_core.sampling.Rollout` with one row per prompt, ``labels``/``mask`` (and
    ``logprobs`` when given) of shape ``[B, R]``, ``sequences``/``attention_mask`` of shape
    ``[B, prompt_len + R]``, at most ``max_new_tokens`` response columns, finite log-probs.
    Anything else is a :class:`ComponentError` naming the generator and its plugin."""
    from .sampling import Rollout

    who, n = describe(entry), len(prompt_ids)
    try:
        roll = generate(prompt_ids, **settings)
    except Exception as exc:
        raise ComponentError(f"{who} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(roll, Rollout):
        raise ComponentError(f"{who} returned {type(roll).__name__}; expected an rlhf_core.sampling.Rollout "
                             "(see rlhf_core.sampling.make_rollout)")
    r = roll.sequences.shape[1] - roll.prompt_len if roll.sequences.dim() == 2 else -1
    expected = {"sequences": (n, roll.prompt_len + r), "attention_mask": (n, roll.prompt_len + r),
                "labels": (n, r), "mask": (n, r)}
    if roll.logprobs is not None:
        expected["logprobs"] = (n, r)
    for name, shape in expected.items():
        if tuple(getattr(roll, name).shape) != shape:
            raise ComponentError(f"{who} returned {name} of shape {list(getattr(roll, name).shape)}; expected "
                                 f"{list(shape)} ({n} prompts, prompt_len {roll.prompt_len}, {r} response columns)")
    if r < 1 or r > settings.get("max_new_tokens", r):
        raise ComponentError(f"{who} returned {r} response columns; expected 1 to max_new_tokens "
                             f"({settings.get('max_new_tokens')})")
    if len(roll.responses) != n:
        raise ComponentError(f"{who} returned {len(roll.responses)} response texts for {n} prompts")
    if roll.logprobs is not None and not torch.isfinite(roll.logprobs).all():
        raise ComponentError(f"{who} returned non-finite sampling log-probs")
    return roll


@runtime_checkable
class Generator(Protocol):
    """A rollout engine (hook ``rlhf_register_generators``): built once per PPO stage as
    ``cls(ctx, policy, tokenizer, **options)``; ``generate`` samples one response per prompt row;
    ``update_weights(policy)`` after every optimizer phase; optional ``sleep()``/``wake()``."""

    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                 top_p: float) -> Any: ...

    def update_weights(self, policy: torch.nn.Module) -> None: ...


@runtime_checkable
class TrackerBackend(Protocol):
    """An experiment tracker (TensorBoard, W&B, MLflow ...): built as
    ``cls(run_dir: Path, config: dict, **options)`` on the main process; every logged row goes to
    ``log(stage, step, metrics)`` (numbers only; ``step`` counts within ``stage``), and
    ``finish(summary)`` is called once at the end of the run, whatever its status. Optional
    ``resume(stage, step)``: on ``--resume``, before the stage logs again, ``stage`` continues from
    ``step`` (0 when it starts over), so what the tracker received for it at ``step`` or later is void
    and should be dropped (a tracker without the method keeps it). A method that raises stops that
    tracker only: the host warns once, sends it nothing more, and records it in ``summary.json``."""

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...
