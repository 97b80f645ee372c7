"""The ``ppo`` stage's options: the loop's sizes, the policy loss and its aggregation, the KL to the
reference, the optimizers, and the DAPO-era extras (rollout corrections, overlong shaping,
dynamic sampling, distillation). Every value is checked before any model loads."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from rlhf_core import (
    AT_LEAST_0, AT_LEAST_1, NON_NEGATIVE, POSITIVE, ComponentSpec, DataConfig, GenerationConfig, OptimConfig,
    WeightedComponent, rule_problems,
)


@dataclass
class KLConfig:
    """KL to the frozen reference. ``estimator``: k1, k2 or k3; ``placement``: ``reward`` (beta * KL
    subtracted from the reward per token) or ``loss`` (beta * KL per token added to the policy loss's
    terms, aggregated like them); ``coef`` beta, where 0 means no reference at all (none is loaded
    and no reference forward runs; the logged ``kl`` is then 0); ``adaptive`` adjusts beta toward
    ``target`` sequence KL over ``horizon`` samples (it needs ``coef > 0``)."""

    coef: float = 0.05
    """The KL coefficient beta; 0 = no reference at all (none is loaded, no reference forward runs, the logged ``kl``
    is 0)."""
    estimator: Literal["k1", "k2", "k3"] = "k1"
    """``k1`` = logp - logp_ref, ``k2`` = (logp - logp_ref)^2 / 2, ``k3`` = exp(ref - logp) - (ref - logp) - 1."""
    placement: Literal["reward", "loss"] = "reward"
    """``reward``: beta * KL subtracted from the per-token reward; ``loss``: beta * KL added to the policy loss's
    per-token terms."""
    adaptive: bool = False
    """Adjust beta toward ``target`` (needs ``coef > 0``)."""
    target: float = 6.0
    """Sequence KL the adaptive controller aims for."""
    horizon: int = 10000
    """Samples over which the adaptive controller moves beta."""

    def problems(self) -> list[str]:
        """Value checks."""
        out = rule_problems(self, {"coef": NON_NEGATIVE, "target": POSITIVE, "horizon": AT_LEAST_1})
        if self.adaptive and self.coef == 0:
            out.append("adaptive: an adaptive KL coefficient starts from coef and scales it; coef: 0 (no reference) "
                       "would stay 0; set coef > 0 or adaptive: false")
        return out


@dataclass
class RolloutCorrection:
    """Corrections for engines whose sampling probabilities differ from the trainer's (``rho_t =
    pi_old / pi_engine``, ``pi_old`` the trainer's probability of the sampled token before the
    update, ``pi_engine`` the generator's), see :func:`rlhf_plugins.ppo.loss.rollout_correction`:
    ``type: tis`` weighs each token's advantage by ``min(rho_t, cap)``; ``seq_tis`` by the
    sequence's ``min(prod_t rho_t, cap)``; ``mask`` drops tokens with ``rho_t`` outside
    ``[low, high]`` from the loss; ``seq_mask`` drops whole sequences whose geometric-mean ratio is
    outside ``[low, high]``. Needs a generator that reports its log-probs (``hf`` does not: it
    samples from the trainer's own weights)."""

    type: Literal["tis", "seq_tis", "mask", "seq_mask"] = "tis"
    """``tis`` (per token), ``seq_tis`` (per sequence), ``mask`` (masked IS per token), ``seq_mask`` (per
    sequence)."""
    cap: float = 2.0
    """Upper bound of the importance weight of ``tis`` / ``seq_tis`` (>= 1)."""
    low: float = 0.5
    """``mask`` / ``seq_mask``: the smallest ratio kept in the loss (in [0, 1])."""
    high: float = 2.0
    """``mask`` / ``seq_mask``: the largest ratio kept in the loss (>= 1)."""

    def problems(self) -> list[str]:
        """Value checks."""
        out = rule_problems(self, {"cap": (lambda v: math.isfinite(v) and v >= 1, "a finite number >= 1")})
        if not (0 <= self.low <= 1 <= self.high and math.isfinite(self.high)):
            out.append(f"low: the kept range needs 0 <= low <= 1 <= high (finite), got low={self.low}, high={self.high}")
        return out


@dataclass
class OverlongConfig:
    """DAPO's overlong reward shaping (Yu et al. 2025). ``cache``: the soft penalty's window, the
    last ``cache`` tokens before ``generation.max_new_tokens``, over which the reward falls
    linearly by up to ``penalty`` (0: no soft penalty); ``mask_truncated``: responses the sampling
    budget cut off (no EOS) leave the policy loss (overlong filtering)."""

    cache: int = 0
    """Tokens before ``generation.max_new_tokens`` over which the soft penalty grows; 0 = no soft penalty."""
    penalty: float = 1.0
    """The penalty at the full budget (subtracted from the reward)."""
    mask_truncated: bool = False
    """Responses without EOS within the budget leave the policy loss."""

    def problems(self) -> list[str]:
        """Value checks."""
        return rule_problems(self, {"cache": AT_LEAST_0, "penalty": NON_NEGATIVE})


@dataclass
class DynamicSamplingConfig:
    """DAPO's dynamic sampling (Yu et al. 2025): groups whose rewards are all equal carry no signal
    under a group baseline; they are dropped and more prompts are sampled until the batch has
    ``prompts_per_batch`` informative groups, for at most ``max_rounds`` rounds of generation
    (after which dropped groups fill the batch, counted as ``ds_filled_groups``)."""

    max_rounds: int = 4
    """Most rounds of generation per iteration; then tied groups fill the batch."""

    def problems(self) -> list[str]:
        """Value checks."""
        return rule_problems(self, {"max_rounds": AT_LEAST_1})


@dataclass
class DistillConfig:
    """On-policy distillation: a frozen ``teacher`` (a path, ``@STAGE`` or ``base``; it must share
    the policy's tokenizer) scores the policy's own samples, and each token gets the reward
    ``-coef * (log pi - log pi_teacher)`` (the reverse KL to the teacher), alone (``reward: null``)
    or beside the sequence reward. The teacher is loaded like the reference: frozen, sharded, and
    with LoRA the policy's own base with its adapters off when the teacher is that base."""

    teacher: str
    """The teacher model: a path, ``@STAGE`` or ``base``; same tokenizer as the policy."""
    coef: float = 1.0
    """Weight of the per-token reward ``-(log pi - log pi_teacher)``."""

    def problems(self) -> list[str]:
        """Value checks."""
        return rule_problems(self, {"coef": POSITIVE})


@dataclass
class AsyncConfig:
    """Rollouts that overlap training: a rollout worker process samples the next batches with
    weights at most ``max_staleness`` updates old while the trainer updates (batch ``i`` is always
    sampled with the policy after ``max(0, i - 1 - max_staleness)`` updates, so runs are
    deterministic and resume exactly); every sample carries the version it came from and its
    behaviour log-probs, which ``rollout_correction`` corrects for; ``staleness`` is logged.
    ``max_staleness: 0`` is synchronous PPO (no worker)."""

    max_staleness: int = 1
    """How many updates older than the trainer's the sampling weights may be; 0 = synchronous PPO."""
    threads: int = 1
    """The worker's torch threads; on CPU the trainer keeps the machine's other cores."""
    timeout: float = 600.0
    """Seconds the trainer waits for a batch before it calls the worker stuck (a dead worker is noticed within
    half a second)."""

    def problems(self) -> list[str]:
        """Value checks."""
        return rule_problems(self, {"max_staleness": AT_LEAST_0, "threads": AT_LEAST_1, "timeout": POSITIVE})


@dataclass
class EnvironmentSpec(ComponentSpec):
    """A multi-turn environment (component) and how its episodes run: ``{name: guess, max_turns: 6,
    ...options}``. The environment opens each episode from a prompt row, and after each assistant
    turn answers with the next messages, a reward and whether the episode is over (see
    :class:`rlhf_core.Environment`); a reply calling one of ``tools`` gets the tools' results
    instead. The episode is one token sequence: the policy's tokens exactly as sampled, with the
    environment's and the tools' turns rendered through the chat template between them (context
    only, outside the loss). ``generation.max_new_tokens`` caps each turn."""

    max_turns: int = 4
    """Most assistant turns per episode (a tool call is a turn); an episode still running then ends, counted as
    ``episode_cut_turns``."""
    max_tokens: int | None = None
    """Most tokens after the opening (the policy's and the environment's); null = ``data.max_length`` minus the
    opening. An episode whose next turn would not fit ends, counted as ``episode_cut_tokens`` (``episode_cut_context``
    when the model's context is what it would overflow)."""
    tools: list[str] = field(default_factory=list)
    """Registered tools the policy may call (``calculator``, ``python`` or a plugin's); their JSON schemas go to the
    chat template's ``tools``."""
    tool_tags: list[str] = field(default_factory=lambda: ["<tool_call>", "</tool_call>"])
    """The opening and closing tags around a call's JSON ``{"name": ..., "arguments": {...}}`` in a reply."""
    tool_timeout: float = 10.0
    """Seconds a tool call may take; a slower one gives the policy an error message as the tool's result."""
    step_timeout: float = 60.0
    """Seconds an environment's ``reset`` or ``step`` may take; a slower one ends the run with an error naming it."""
    workers: int = 8
    """Threads that run environment steps and tool calls of different episodes at once."""

    def problems(self, prefix: str = "environment.") -> list[str]:
        """Value checks."""
        out = [f"{prefix}{p}" for p in rule_problems(self, {
            "max_turns": AT_LEAST_1, "max_tokens": AT_LEAST_1, "tool_timeout": POSITIVE, "step_timeout": POSITIVE,
            "workers": AT_LEAST_1})]
        if len(self.tool_tags) != 2 or not all(isinstance(t, str) and t for t in self.tool_tags):
            out.append(f"{prefix}tool_tags: expected two non-empty strings [open, close], got {self.tool_tags!r}")
        if len(set(self.tools)) != len(self.tools):
            out.append(f"{prefix}tools: a tool is named twice: {self.tools!r}")
        return out


@dataclass
class PolicyOptimConfig(OptimConfig):
    """The policy's optimizer step in PPO: :class:`~rlhf_core.OptimConfig` with a constant learning
    rate unless a schedule is chosen."""

    schedule: Literal["cosine", "linear", "constant"] = "constant"
    """After warm-up: constant (PPO's default), cosine to 10% of ``lr``, or linear to 0, over the stage's optimizer
    steps."""


@dataclass
class CriticOptimConfig(PolicyOptimConfig):
    """The critic's optimizer step in PPO: like the policy's, with AdamW's own weight decay (0.01)."""

    weight_decay: float = 0.01
    """AdamW weight decay."""


@dataclass
class PPOConfig:
    """Options of the ``ppo`` stage. Prompts longer than
    ``data.max_prompt_length`` tokens (default ``data.max_length - generation.max_new_tokens``) keep
    their last tokens, counted and printed like the other stages' truncation."""

    data: DataConfig = field(default_factory=DataConfig)
    """Prompt records: ``{prompt}`` (a string or messages) or ``{messages}``."""
    init: str = "auto"
    """Policy and frozen reference: ``auto`` (the latest policy stage, else the base model), ``base``, ``@STAGE`` or a
    path. With ``model.lora`` the reference is the policy with its adapters disabled."""
    reward: ComponentSpec | list[WeightedComponent] | None = field(default_factory=lambda: ComponentSpec("reward_model"))
    """A registered reward (component): ``reward_model`` (``path: auto`` = the latest reward stage), ``math``,
    ``exact_match``, ``format``, ``code``, ``remote``, ``judge``, ``length``, ``letters_gold`` or a plugin's; a list
    ``[{name: math, weight: 1.0}, {name: format, weight: 0.2}]`` sums weighted rewards (each logged as
    ``reward_<name>``); null = none (with ``distill``, learning from the teacher alone)."""
    advantage: ComponentSpec = field(default_factory=lambda: ComponentSpec("batch_mean"))
    """Advantage estimator (component): ``batch_mean``, ``ema``, ``group_mean``, ``rloo``, ``reinforce_pp``, ``gae``
    or a plugin's."""
    loss: ComponentSpec = field(default_factory=lambda: ComponentSpec("ppo_clip"))
    """Policy loss (component, family ``policy``) on per-token log-probs: ``ppo_clip``, ``gspo``, ``cispo``,
    ``reinforce`` or a plugin's."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"] = "token_mean"
    """How per-token terms become the loss: ``token_mean``, ``seq_mean_token_mean`` (GRPO), ``seq_mean_token_sum``,
    ``token_sum_norm`` (Dr. GRPO); normalisers are global."""
    micro_batch_size: int | None = None
    """Rows per forward/backward inside a minibatch (gradient accumulation); null = ``minibatch_size``."""
    max_tokens_per_micro_batch: int | None = None
    """Token-budget micro-batches in the update: each process cuts its minibatch rows into consecutive runs whose real
    tokens (prompt + response) fit this budget (a row over it alone), instead of ``micro_batch_size`` rows; the
    gradient does not depend on the split. With ``data.packing``, a micro-batch then costs about its budget."""
    gold: ComponentSpec | None = None
    """A reward used only to evaluate (component); gives ``gold_score_sft`` / ``gold_score_ppo``."""
    iterations: int = 100
    """Rollout batches (generate -> score -> train)."""
    prompts_per_batch: int = 16
    """Prompts sampled per iteration, global over all processes."""
    samples_per_prompt: int = 1
    """Responses per prompt; group estimators (``group_mean``, ``rloo``) need at least 2."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    minibatch_size: int = 16
    """Rows per optimizer step inside an epoch."""
    optim: PolicyOptimConfig = field(default_factory=PolicyOptimConfig)
    """The policy's optimizer step: AdamW (``lr``, ``betas``, ``weight_decay``), ``warmup_steps`` and ``schedule``
    over the stage's optimizer steps (``iterations x ppo_epochs x minibatches``), ``max_grad_norm``, and
    ``mixed_precision`` (autocast of the scoring and update forwards)."""
    whiten_advantages: bool = False
    """Normalise advantages over the batch (zero mean, unit variance)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling options."""
    kl: KLConfig = field(default_factory=KLConfig)
    """KL penalty to the frozen reference."""
    critic_init: str = "auto"
    """Critic for ``gae``: ``auto`` (the latest reward model, else the policy's backbone), ``@STAGE`` or a path."""
    critic_optim: CriticOptimConfig = field(default_factory=CriticOptimConfig)
    """The critic's optimizer step (for ``gae``), like ``optim`` (weight decay 0.01 by default, AdamW's own); its
    ``mixed_precision`` applies to the critic's forwards in the update."""
    vf_clip: float = 0.2
    """Clip range of the clipped value loss."""
    eval_every: int = 10
    """Iterations between held-out evaluations (same random stream at start and end); 0 = start and end only."""
    eval_prompts: int = 64
    """Held-out prompts per evaluation; 0 = no evaluation."""
    fused_linear: bool | Literal["auto"] = "auto"
    """Log-probs, entropy and losses from the last hidden state and the LM head without ``[B, R, V]`` logits; ``auto``
    = where the head is a plain bias-free linear layer, else off with a notice; ``true`` makes that an error."""
    shared_backbone: bool | Literal["auto"] = "auto"
    """With ``model.lora``: reward model and critic as adapters + heads on the policy's frozen base; ``auto`` = where
    they fit; ``true`` = an error where they do not; ``false`` = their own copies."""
    generator: ComponentSpec = field(default_factory=lambda: ComponentSpec("hf"))
    """The rollout engine (component): ``hf`` (options ``loop``: ``auto`` = rlhf's own decode loop for Llama-family
    models, ``rlhf``, ``generate`` = Hugging Face ``generate``; ``compile``: the decode step compiled, ``auto`` = on
    CUDA) or ``vllm``."""
    rollout_correction: RolloutCorrection | None = None
    """Corrections for engines whose probabilities differ from the trainer's: TIS, sequence TIS, masked IS (null:
    off)."""
    overlong: OverlongConfig | None = None
    """DAPO's overlong shaping: a soft length penalty and/or truncated responses out of the loss (null: off)."""
    dynamic_sampling: DynamicSamplingConfig | None = None
    """DAPO's dynamic sampling: replace groups whose rewards are all equal (null: off)."""
    distill: DistillConfig | None = None
    """On-policy distillation from a frozen teacher's per-token log-probs (null: off)."""
    async_: AsyncConfig | None = None
    """Rollouts that overlap training (``async: {max_staleness: 1}``): a worker process (one per rank) samples ahead
    with weights up to ``max_staleness`` updates old; needs ``rollout_correction`` (null or ``max_staleness: 0``:
    synchronous)."""
    environment: EnvironmentSpec | None = None
    """Multi-turn episodes (component): ``{name: answer, tools: [calculator], max_turns: 3}``, ``{name: guess}`` or a
    plugin's environment, with ``max_turns``, ``max_tokens``, ``tools``, ``tool_tags``, ``tool_timeout``,
    ``step_timeout`` and ``workers``; the episode's reward is the environment's (summed over turns) plus ``reward``'s
    on the final reply. null = one prompt, one response."""
    save: bool = True
    """Save the trained policy in the stage's output directory."""

    #: Keys of earlier releases and where they went (a config that still has one is told).
    renamed: ClassVar[dict[str, str]] = {
        "lr": "optim.lr", "weight_decay": "optim.weight_decay", "max_grad_norm": "optim.max_grad_norm",
        "mixed_precision": "optim.mixed_precision", "critic_lr": "critic_optim.lr"}

    def problems(self) -> list[str]:
        """Value checks: counts at least 1, room for a prompt (the optimizers check their own)."""
        out = []
        if self.data.max_prompt_length is None and self.data.max_length <= self.generation.max_new_tokens:
            out.append(f"data.max_length: must exceed generation.max_new_tokens ({self.generation.max_new_tokens}) "
                       f"to leave room for the prompt, got {self.data.max_length}")
        if self.environment is not None:
            out += self.environment.problems()
        if self.overlong is not None and self.overlong.cache >= self.generation.max_new_tokens:
            out.append(f"overlong.cache: the penalty window must be shorter than generation.max_new_tokens "
                       f"({self.generation.max_new_tokens}), got {self.overlong.cache}")
        return out + rule_problems(self, {
            "iterations": AT_LEAST_1, "prompts_per_batch": AT_LEAST_1, "samples_per_prompt": AT_LEAST_1,
            "ppo_epochs": AT_LEAST_1, "minibatch_size": AT_LEAST_1, "micro_batch_size": AT_LEAST_1,
            "max_tokens_per_micro_batch": AT_LEAST_1, "entropy_coef": NON_NEGATIVE,
            "vf_clip": POSITIVE, "eval_every": AT_LEAST_0, "eval_prompts": AT_LEAST_0,
        })

    def optimizer_steps(self) -> int:
        """The optimizer steps of the stage (each model's): ``iterations x ppo_epochs x`` minibatches per batch."""
        return self.iterations * self.ppo_epochs * math.ceil(self.prompts_per_batch * self.samples_per_prompt
                                                             / self.minibatch_size)

    def prompt_budget(self) -> int:
        """The most prompt tokens a rollout keeps (the last ones)."""
        if self.data.max_prompt_length is not None:
            return self.data.max_prompt_length
        return self.data.max_length - self.generation.max_new_tokens
