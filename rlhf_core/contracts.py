"""The contracts of every component kind, written once, and the host's runtime checks of them.

A plugin provides: stages (subclasses of :class:`Stage`), losses (:class:`TokenLoss`,
:class:`ScoreLoss`, :class:`PairwiseLoss`, :class:`PolicyLoss`, the preference families in
:mod:`rlhf_plugins.preference.losses`), rewards (:class:`Reward`), advantage estimators
(:class:`AdvantageEstimator`), rollout engines (:class:`Generator`), experiment trackers
(:class:`TrackerBackend`) and datasets. Each hook's docstring (:mod:`rlhf_core.plugin_system.hookspecs`)
and the README point here. The host calls every component through a guard that checks what it
returns (:class:`CheckedReward`, :class:`CheckedEstimator`, :class:`CheckedGenerator`) and turns a
broken contract into a :class:`~rlhf_core.errors.ComponentError` naming the component and its plugin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch

from .data import Record, data_inputs, dataset_components, load_split
from .errors import ComponentError
from .types import AdvantageInputs, Observation, PolicyLossInputs, Rollout, StageInput, StageResult, Uses

__all__ = ["Stage", "TokenLoss", "ScoreLoss", "PairwiseLoss", "PolicyLoss", "FusedPolicyLoss", "FusedTokenLoss", "Reward",
           "AdvantageEstimator", "Generator", "TrackerBackend", "CheckedReward", "RewardSum", "CheckedEstimator",
           "CheckedGenerator", "build_rewards", "reward_specs", "reward_fields", "fields_read_by", "checked_rewards",
           "checked_advantages", "checked_rollout", "describe", "Environment", "CheckedEnvironment",
           "checked_observation"]


class Stage:
    """A pipeline step, registered with ``register(name, StageSubclass)``. ``run`` reads top to
    bottom: setup -> loop -> save. Every other method has a default, so a stage overrides only
    what it needs; the host calls them all before the first stage trains.

    - ``config_class`` (required): a dataclass whose fields are the stage's options, validated
      before any model loads (an optional ``problems() -> list[str]`` method on it checks values).
    - ``produces``: ``"policy"`` or ``"reward"``, the :attr:`StageResult.kind` it returns, so that
      a later stage reading a trained reward model (``path: auto``) is checked up front.
    - ``records``: the kind of records the config's ``data`` field holds (``sft``, ``reward``,
      ``pairwise``, ``unpaired``, ``prompts``), or None for a stage without ``data``; override
      :meth:`record_kind` when the config decides (a pairwise loss reads pairs). From it the host
      checks every record (and the data fields every reward the stage uses reads) and the stage
      loads them with :meth:`load_data`: the kind is written once.
    - :meth:`uses`: the components it will look up, each a named :class:`~rlhf_core.types.Uses`.
    - :meth:`validate`: cross-field problems (``key: message`` each), seeing the whole run's config.
    - :meth:`inputs`: the models (and other sources) it reads besides ``data``.
    - :meth:`plan`: what ``rlhf run --dry-run`` prints for it.
    """

    config_class: ClassVar[type]
    produces: ClassVar[str | None] = None
    records: ClassVar[str | None] = None

    def uses(self, config: Any) -> list[Uses]:
        """The components this stage looks up (losses, rewards, estimators, generators)."""
        return []

    def record_kind(self, config: Any, registry: Any) -> str | None:
        """The kind of records ``config.data`` holds (default: :attr:`records`)."""
        return self.records

    def validate(self, config: Any, registry: Any, run: Any) -> list[str]:
        """Cross-field problems of a fully parsed ``config`` (``run``: the :class:`RunConfig`, for
        ``model.lora`` and the like); ``key: message`` each, keys relative to the stage."""
        return []

    def inputs(self, config: Any, registry: Any) -> list[StageInput]:
        """Models (``kind="model"``: ``auto``, ``base``, ``@STAGE``, a path) and trained reward models
        (``kind="reward_model"``) the stage reads, checked before anything trains."""
        return []

    def plan(self, config: Any, registry: Any, sizes: dict[str, int]) -> dict[str, Any]:
        """``{label: value}`` for ``rlhf run --dry-run`` (``sizes``: valid records per data input)."""
        return {}

    def run(self, ctx: Any, config: Any) -> StageResult:
        """Do the work with ``ctx`` (:class:`rlhf_core.StageContext`) and return what it left."""
        raise NotImplementedError(f"stage class {type(self).__name__} defines no run(ctx, config)")

    # -- derived from the declarations above: the host and the stage read the same answer

    def components(self, config: Any) -> list[Uses]:
        """:meth:`uses` plus the ``builtin:`` datasets its ``data`` names."""
        data = getattr(config, "data", None)
        return [*self.uses(config), *(dataset_components(data, "data") if data else [])]

    def record_fields(self, config: Any, registry: Any) -> dict[str, str]:
        """The data fields the stage's rewards read, each with who reads it first."""
        return fields_read_by(registry, [(u.path, u.spec) for u in self.uses(config)
                                         if u.kind == "reward" and u.spec is not None])

    def data_inputs(self, config: Any, registry: Any) -> list[StageInput]:
        """``config.data``'s train (and eval) sources as the host checks them."""
        kind = self.record_kind(config, registry)
        if kind is None:
            return []
        return data_inputs(config.data, kind, extra=self.record_fields(config, registry))

    def load_data(self, ctx: Any, config: Any) -> tuple[list[Record], list[Record]]:
        """``(train, held out)`` records of ``config.data``, as checked before the run."""
        return load_split(config.data, self.record_kind(config, ctx.registry), ctx.registry, ctx.seed,
                          self.record_fields(config, ctx.registry))


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


@dataclass(frozen=True)
class FusedPolicyLoss:
    """A policy loss's faster form, registered with it (``register(name, fn, family="policy",
    fused=FusedPolicyLoss(...))``) so that nothing outside the loss names it.

    ``options(loss_options, loss_agg) -> dict | None`` (every option of the loss, the unset ones at
    their defaults): the keyword arguments of the two kernels
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


@dataclass(frozen=True)
class FusedTokenLoss:
    """A token loss's fused-linear form, registered with it (``register(name, fn, family="token",
    fused=FusedTokenLoss(...))``) so that a stage never names a loss to choose the fast path.

    ``options(loss_options) -> dict | None``: the keyword arguments of ``on_linear`` when it
    computes exactly what ``fn`` would with these options, else None (the stage then computes the
    logits). ``on_linear(hidden [N, H], weight [V, H], labels [N], *, backend, **kwargs) -> (loss,
    metrics)``: the loss from the last hidden states and the LM head, never building ``[N, V]``
    logits (labels -100 are ignored), with the same value and metrics as ``fn``."""

    options: Callable[[dict], dict | None]
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
    :class:`~rlhf_core.types.Rollout` with one row per prompt, ``labels``/``mask`` (and
    ``logprobs`` when given) of shape ``[B, R]``, ``sequences``/``attention_mask`` of shape
    ``[B, prompt_len + R]``, at most ``max_new_tokens`` response columns, finite log-probs.
    Anything else is a :class:`ComponentError` naming the generator and its plugin."""
    who, n = describe(entry), len(prompt_ids)
    try:
        roll = generate(prompt_ids, **settings)
    except Exception as exc:
        raise ComponentError(f"{who} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(roll, Rollout):
        raise ComponentError(f"{who} returned {type(roll).__name__}; expected an rlhf_core.Rollout "
                             "(see rlhf_core.make_rollout)")
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
    """A rollout engine: built once per PPO stage as ``cls(ctx, policy, tokenizer, **options)``
    (``policy``: the trained model as the stage holds it, possibly sharded or with LoRA adapters).

    ``generate(prompt_ids, *, max_new_tokens, temperature, top_p) -> Rollout``: one sampled response
    per row of ``prompt_ids`` (token ids, BOS included; the stage repeats a prompt K times for K
    samples), stopped at EOS, as a :class:`~rlhf_core.types.Rollout` (left-padded prompts, response
    mask and labels; ``logprobs [B, R]``: the engine's own log-probs of the sampled tokens, or None;
    build it with :func:`rlhf_core.sampling.make_rollout`). ``update_weights(policy)`` after every
    optimizer phase, when the policy's weights have changed (an engine holding its own copy reloads
    them); optional ``sleep()`` (before the update) and ``wake()`` (before the next ``generate``)
    let an engine give its memory back while the trainer needs it. Every call runs on every
    process. A class attribute ``reports_logprobs = False`` says it reports none (losses and
    corrections that need them are refused up front). A static ``check_options(**options)`` raising
    ``ValueError`` checks option values before anything trains; the rollout's shapes are checked
    at run time (:func:`checked_rollout`)."""

    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                 top_p: float) -> Any: ...

    def update_weights(self, policy: torch.nn.Module) -> None: ...


@runtime_checkable
class Environment(Protocol):
    """A multi-turn environment (``ppo.environment``): built once per PPO stage as
    ``cls(ctx, **options)``; every episode is a row of the prompt data and a seed.

    ``reset(row, seed) -> Observation``: the opening of the episode (its ``messages``: what the
    policy sees first, e.g. the row's question as a user message) and its ``state``;
    ``step(state, reply) -> Observation``: after each assistant turn (``reply``: its text, decoded
    from the tokens the policy sampled, special tokens dropped), the next messages (a user turn, a
    game's feedback), the turn's ``reward``, and ``done``. A reply that calls a tool never reaches
    ``step``: the host runs the tools (``environment.tools``) and shows their results.

    Both may be called from several threads at once for different episodes (each episode's state
    is its own); each call has ``environment.step_timeout`` seconds. The episode must be a function
    of ``(row, seed)`` and the replies, so that a resumed run repeats it: draw randomness from
    ``random.Random(seed)``, never from a global generator. A static ``check_options(**options)``
    raising ``ValueError`` checks option values before anything trains."""

    def reset(self, row: dict[str, Any], seed: int) -> Observation: ...

    def step(self, state: Any, reply: str) -> Observation: ...


class CheckedEnvironment:
    """An environment as the host calls it: every observation checked (:func:`checked_observation`),
    whatever it raises named with the environment and its plugin."""

    def __init__(self, entry: Any, environment: Any):
        self.entry, self.environment = entry, environment

    def reset(self, row: dict[str, Any], seed: int) -> Observation:
        """The checked opening of an episode (``done`` is refused: an episode has a first turn)."""
        out = self._call("reset", row, seed)
        if out.done:
            raise ComponentError(f"{describe(self.entry)} returned done=True from reset; an episode starts with the "
                                 "policy's first turn")
        if not out.messages:
            raise ComponentError(f"{describe(self.entry)} returned no messages from reset; the opening needs at least "
                                 "one message (e.g. the row's question as a user message)")
        return out

    def step(self, state: Any, reply: str) -> Observation:
        """The checked observation after an assistant turn."""
        return self._call("step", state, reply)

    def _call(self, method: str, *args: Any) -> Observation:
        try:
            out = getattr(self.environment, method)(*args)
        except Exception as exc:
            raise ComponentError(f"{describe(self.entry)} raised {type(exc).__name__} in {method}: {exc}") from exc
        return checked_observation(self.entry, method, out)


def checked_observation(entry: Any, method: str, out: Any) -> Observation:
    """``out`` if it keeps the :class:`~rlhf_core.types.Observation` contract (messages with string
    ``role`` and ``content``, a finite ``reward``, a bool ``done``, numeric ``info``), else a
    :class:`ComponentError` naming the environment, its plugin and the method."""
    who = f"{describe(entry)} {method}"
    if not isinstance(out, Observation):
        raise ComponentError(f"{who} returned {type(out).__name__}; expected rlhf_core.Observation(messages=[...], "
                             "reward=0.0, done=False, state=...)")
    if not isinstance(out.messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in out.messages):
        raise ComponentError(f"{who} returned messages {out.messages!r:.120}; expected a list of "
                             "{'role': str, 'content': str} dicts")
    if isinstance(out.reward, bool) or not isinstance(out.reward, (int, float)) or not math.isfinite(out.reward):
        raise ComponentError(f"{who} returned reward {out.reward!r}; expected a finite number")
    if not isinstance(out.done, bool):
        raise ComponentError(f"{who} returned done {out.done!r}; expected True or False")
    bad = [k for k, v in out.info.items() if isinstance(v, bool) or not isinstance(v, (int, float))
           or not math.isfinite(v)] if isinstance(out.info, dict) else ["(not a dict)"]
    if bad:
        raise ComponentError(f"{who} returned info with non-numeric or non-finite values for {bad}; info holds "
                             "numbers to log")
    return out


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


class CheckedEstimator:
    """An advantage estimator as the host calls it: every output checked (:func:`checked_advantages`)."""

    def __init__(self, entry: Any, estimator: Any):
        self.entry, self.estimator = entry, estimator
        self.needs_values = entry.obj.needs_values

    def __call__(self, inputs: AdvantageInputs) -> torch.Tensor:
        """Advantages ``[B, T]``, float32."""
        return checked_advantages(self.entry, self.estimator(inputs), inputs.mask)


class CheckedGenerator:
    """A rollout engine as the host calls it: every rollout checked (:func:`checked_rollout`), the
    optional ``sleep``/``wake`` called only when it has them, whatever it raises named."""

    def __init__(self, entry: Any, generator: Any):
        self.entry, self.generator = entry, generator

    def generate(self, prompt_ids: list[list[int]], **settings: Any) -> Rollout:
        """One checked :class:`~rlhf_core.types.Rollout` for ``prompt_ids``."""
        return checked_rollout(self.entry, self.generator.generate, prompt_ids, **settings)

    def update_weights(self, policy: torch.nn.Module) -> None:
        """The policy's weights changed (after an optimizer phase)."""
        self._call("update_weights", policy)

    def sleep(self) -> None:
        """The trainer needs the memory now."""
        self._call("sleep")

    def wake(self) -> None:
        """Sampling comes next."""
        self._call("wake")

    def _call(self, method: str, *args: Any) -> None:
        fn = getattr(self.generator, method, None)
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as exc:
            raise ComponentError(f"{describe(self.entry)} raised {type(exc).__name__} in {method}: {exc}") from exc
