"""Stage ``ppo``: the seed's step 3, RLHF with PPO.

theta* = argmax_theta E_{(x, y) ~ pi_theta}[R_phi(x, y)], optimised with the clipped surrogate
min(r A, clip(r, 1-eps, 1+eps) A), r = pi_theta / pi_theta_old, A from a registered advantage
estimator (default ``batch_mean``: A = R - mean R). Each iteration: generate -> score -> train.
A KL penalty to the frozen reference (the starting policy) keeps the policy from drifting onto
the reward model's blind spots.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

import rlhf_kernels

from rlhf_core import hookimpl
from rlhf_core import distributed as dist_utils
from rlhf_core.checkpoint import honour_stop_requests
from rlhf_core.config import (
    AT_LEAST_0, AT_LEAST_1, NON_NEGATIVE, POSITIVE, ComponentSpec, DataConfig, GenerationConfig, WeightedComponent,
    rule_problems,
)
from rlhf_core.distributed import masked_mean
from rlhf_core.data import (
    Rendering, TokenStats, data_inputs, dataset_components, encode_prompt, load_split, render_prompt,
)
from rlhf_core.interfaces import (
    AdvantageInputs, ComponentError, RewardSum, PolicyLossInputs, StageError, StageInput, StageResult, checked_advantages,
    build_rewards, checked_rollout, describe, fields_read_by, reward_specs,
)
from rlhf_core.sampling import concat_rollouts, evaluate_samples, generate
from rlhf_core.models import (
    POLICY_ADAPTER, SharedBackbone, fused_linear_problems, is_lora, load_causal_lm, lora_scope, save_causal_lm,
    use_fused_linear,
)
from rlhf_core.packing import PackingStats, packing_line, packing_problems, padding_free
from rlhf_core.tracking import is_main_process, progress
from rlhf_core.training import TrainingError, autocast_context, budget_runs

from .advantages import whiten
from .loss import (
    KL_ESTIMATORS, KLController, aggregate, clipped_value_loss, distill_rewards, local_normaliser, overlong_penalty,
    policy_loss_terms, rollout_correction, shape_rewards, truncated_responses,
)
from .rollout import (
    Experience, Samples, critic_values, response_hidden, response_logits, response_values, score_tokens, token_scores,
    widen,
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
    lr: float = 1e-4
    """Policy AdamW learning rate."""
    weight_decay: float = 0.0
    """Policy AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping; 0 = off."""
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
    critic_lr: float = 1e-4
    """Critic AdamW learning rate."""
    vf_clip: float = 0.2
    """Clip range of the clipped value loss."""
    eval_every: int = 10
    """Iterations between held-out evaluations (same random stream at start and end); 0 = start and end only."""
    eval_prompts: int = 64
    """Held-out prompts per evaluation; 0 = no evaluation."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast: ``auto`` = bf16 on CUDA devices that support it, none on CPU."""
    fused_linear: bool | Literal["auto"] = "auto"
    """Log-probs, entropy and losses from the last hidden state and the LM head without ``[B, R, V]`` logits; ``auto``
    = where the head is a plain bias-free linear layer, else off with a notice; ``true`` makes that an error."""
    shared_backbone: bool | Literal["auto"] = "auto"
    """With ``model.lora``: reward model and critic as adapters + heads on the policy's frozen base; ``auto`` = where
    they fit; ``true`` = an error where they do not; ``false`` = their own copies."""
    generator: ComponentSpec = field(default_factory=lambda: ComponentSpec("hf"))
    """The rollout engine (component): ``hf`` (option ``loop: rlhf`` for rlhf's own decode loop) or ``vllm``."""
    rollout_correction: RolloutCorrection | None = None
    """Corrections for engines whose probabilities differ from the trainer's: TIS, sequence TIS, masked IS (null:
    off)."""
    overlong: OverlongConfig | None = None
    """DAPO's overlong shaping: a soft length penalty and/or truncated responses out of the loss (null: off)."""
    dynamic_sampling: DynamicSamplingConfig | None = None
    """DAPO's dynamic sampling: replace groups whose rewards are all equal (null: off)."""
    distill: DistillConfig | None = None
    """On-policy distillation from a frozen teacher's per-token log-probs (null: off)."""
    save: bool = True
    """Save the trained policy in the stage's output directory."""

    def problems(self) -> list[str]:
        """Value checks: counts at least 1, positive finite learning rates, room for a prompt."""
        out = []
        if self.data.max_prompt_length is None and self.data.max_length <= self.generation.max_new_tokens:
            out.append(f"data.max_length: must exceed generation.max_new_tokens ({self.generation.max_new_tokens}) "
                       f"to leave room for the prompt, got {self.data.max_length}")
        if self.overlong is not None and self.overlong.cache >= self.generation.max_new_tokens:
            out.append(f"overlong.cache: the penalty window must be shorter than generation.max_new_tokens "
                       f"({self.generation.max_new_tokens}), got {self.overlong.cache}")
        return out + rule_problems(self, {
            "iterations": AT_LEAST_1, "prompts_per_batch": AT_LEAST_1, "samples_per_prompt": AT_LEAST_1,
            "ppo_epochs": AT_LEAST_1, "minibatch_size": AT_LEAST_1, "micro_batch_size": AT_LEAST_1,
            "max_tokens_per_micro_batch": AT_LEAST_1, "lr": POSITIVE, "critic_lr": POSITIVE,
            "weight_decay": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE, "entropy_coef": NON_NEGATIVE,
            "vf_clip": POSITIVE, "eval_every": AT_LEAST_0, "eval_prompts": AT_LEAST_0,
        })

    def prompt_budget(self) -> int:
        """The most prompt tokens a rollout keeps (the last ones)."""
        if self.data.max_prompt_length is not None:
            return self.data.max_prompt_length
        return self.data.max_length - self.generation.max_new_tokens


@dataclass
class PPOModels:
    """Everything PPO trains or consults, built once in :meth:`PPOStage.run`: the policy and its
    optimizer, the frozen reference (the starting policy; None with LoRA, where the reference is the
    policy with its adapters disabled), the optional critic and its optimizer, and the KL
    controller. Models are already sharded for this run's processes; ``policy_params``: what the
    policy's optimizer trains; ``shared``: the :class:`rlhf_core.models.SharedBackbone` when the
    critic or a reward model is an adapter on the policy's base (else None); ``reference_free``:
    ``kl.coef`` is 0, so there is no reference and no reference forward; ``teacher``: the frozen
    distillation teacher (None without ``distill``, or with ``teacher_is_base``: the LoRA policy's
    base with its adapters off). ``fused``: log-probs, the
    policy loss and entropy come from the last hidden states and the LM head through the
    fused-linear kernels, so no ``[B, R, V]`` logits exist (see ``fused_linear``)."""

    policy: Any
    reference: Any
    optimizer: torch.optim.Optimizer
    kl: KLController
    critic: Any = None
    critic_optimizer: torch.optim.Optimizer | None = None
    fused: bool = False
    policy_params: list[torch.nn.Parameter] = field(default_factory=list)
    shared: Any = None
    reference_free: bool = False
    teacher: Any = None
    teacher_is_base: bool = False

    def __post_init__(self):
        if not self.policy_params:  # built by hand (tests, benchmarks): every trainable policy parameter
            self.policy_params = [p for p in self.policy.parameters() if p.requires_grad]


class PPOStage:
    """setup (models, reward, estimator) -> loop (rollout -> Experience -> update) -> save."""

    config_class = PPOConfig
    produces = "policy"

    def components(self, config: PPOConfig):
        """Reward, advantage estimator, policy loss, gold judge and builtin datasets to look up."""
        return [
            *((("reward", spec, path, None) for path, spec in reward_specs(config.reward))),
            ("advantage", config.advantage, "advantage", None),
            ("loss", config.loss, "loss", ("policy",)), ("reward", config.gold, "gold", None),
            ("generator", config.generator, "generator", None),
            *dataset_components(config.data, "data"),
        ]

    def run(self, ctx, config: PPOConfig) -> StageResult:
        """Run ``iterations`` PPO iterations; summary holds reward, KL and gold scores."""
        device = ctx.device
        source = ctx.init_source(config.init, "policy")
        tokenizer = ctx.tokenizer_for(source)
        estimator_entry = ctx.registry.lookup("advantage", config.advantage)
        estimator = Estimator(estimator_entry, estimator_entry.obj(**config.advantage.options))
        loss_entry = ctx.registry.lookup("loss", config.loss, "policy")
        models, reward_fn, gold_fn = self._models(ctx, config, estimator.needs_values, source)
        generator_entry = ctx.registry.lookup("generator", config.generator)
        generator = Rollouts(generator_entry, generator_entry.obj(ctx, models.policy, tokenizer, **config.generator.options))
        # The sampling stream starts here, whatever random draws building the models took (a reward
        # model or critic of its own or on the policy's base); each rank samples its own responses.
        torch.manual_seed(ctx.seed + dist_utils.rank())

        train_recs, eval_recs = load_split(config.data, "prompts", ctx.registry, ctx.seed,
                                           read_fields(config, ctx.registry))
        eval_recs = eval_recs[: config.eval_prompts]
        stats = TokenStats()
        rendering = Rendering(config.data.chat_template, ctx.name, source)
        prompts = fit_prompts(tokenizer, [render_prompt(tokenizer, r.fields, rendering, r.source) for r in train_recs],
                              config.prompt_budget(), stats)
        eval_prompts = fit_prompts(tokenizer, [render_prompt(tokenizer, r.fields, rendering, r.source) for r in eval_recs],
                                   config.prompt_budget(), TokenStats())
        rows, eval_rows = [r.fields for r in train_recs], [r.fields for r in eval_recs]
        print(f"ppo data: {stats.total} prompts, {stats.truncated} cut to their last {config.prompt_budget()} tokens; "
              f"{len(eval_prompts)} held out")
        if config.data.packing and is_main_process():
            print(f"{ctx.name}: {packing_line(models.policy)} (scoring and update forwards)")
        rng = random.Random(ctx.seed)  # the same global prompt batches on every rank

        def evaluate() -> dict[str, float]:
            # The same sampling seed every time, so that policies are compared on one random stream.
            g = config.generation
            judges = {name: fn for name, fn in (("reward", reward_fn), ("gold", gold_fn)) if fn is not None}
            return evaluate_samples(models.policy, tokenizer, eval_prompts, judges, max_new_tokens=g.max_new_tokens,
                                    temperature=g.temperature, top_p=g.top_p, device=device, seed=ctx.seed,
                                    rows=eval_rows)

        ckpt = ctx.checkpointer
        trained, optims = {"policy": models.policy}, {"policy": [models.optimizer]}
        if isinstance(models.critic, torch.nn.Module):
            trained["critic"], optims["critic"] = models.critic, [models.critic_optimizer]
        elif models.critic is not None:  # an adapter + head inside the policy's module
            optims["policy"].append(models.critic_optimizer)
        saved = ckpt.restore(trained, optims) if ckpt is not None else None
        start = 0
        if saved is not None:  # continue exactly: prompt order, KL coefficient, estimator state, progress
            start, first, last = saved["step"], saved["first"], saved["last"]
            # per-iteration KL and reward_tied; a checkpoint of the release before kept the KL alone
            history = saved["history"] if "history" in saved else {"kl": saved["kl_history"], "reward_tied": []}
            rng.setstate(saved["prompt_rng"])
            models.kl.value = saved["kl_coef"]
            if hasattr(estimator.estimator, "load_state_dict"):
                estimator.estimator.load_state_dict(saved["estimator"])
        else:
            first = evaluate() if eval_prompts else {}
            if first:
                ctx.tracker.log(0, {f"eval_{k}": v for k, v in first.items()})
            last, history = {}, {"kl": [], "reward_tied": []}
        bar = progress(start, config.iterations, ctx.name, unit="iteration")
        with honour_stop_requests(ckpt):
            last = self._loop(ctx, config, bar, models, list(zip(prompts, rows)), rng, tokenizer, reward_fn, estimator,
                              loss_entry, evaluate, eval_prompts, first, last, history, trained, optims, generator)
        bar.close()
        final = evaluate() if eval_prompts else {}
        if final:
            ctx.tracker.log(config.iterations, {f"eval_{k}": v for k, v in final.items()})
        summary = {k: last[k] for k in ("reward_mean", "kl", "kl_coef", "clip_frac", "response_length",
                                         "packing_efficiency") if k in last}
        summary["kl_max"] = max(history["kl"]) if history["kl"] else 0.0
        summary["reward_tied_iterations"] = float(sum(history["reward_tied"]))
        if history["reward_tied"] and all(history["reward_tied"]) and is_main_process():
            print(f"{ctx.name}: warning: in every one of the {len(history['reward_tied'])} iterations "
                  + tied_reason(config.samples_per_prompt) + "; the policy learned nothing from the reward (check the "
                  "reward and its data fields, or raise generation.temperature / samples_per_prompt)")
        summary.update(prompts=float(stats.total), prompts_truncated=float(stats.truncated))
        summary.update({f"eval_{k}_start": v for k, v in first.items()})
        summary.update({f"eval_{k}_end": v for k, v in final.items()})
        headline = {}
        if gold_fn is not None and first and final:
            headline = {"gold_score_sft": first["gold"], "gold_score_ppo": final["gold"]}
        model_dir = save_causal_lm(models.policy, tokenizer, ctx.stage_dir) if config.save else None
        return StageResult(model_dir, "policy", summary, headline)

    def _loop(self, ctx, config, bar, models, prompts, rng, tokenizer, reward_fn, estimator, loss_entry, evaluate,
              eval_prompts, first, last, history, trained, optims, generator) -> dict[str, float]:
        """Iterations ``bar``: rollout -> Experience -> update -> stats, evaluation, checkpoints."""
        device, ckpt = ctx.device, ctx.checkpointer

        def draw() -> tuple[list[str], list[dict]]:
            # A rank takes a contiguous share of the global prompt batch; a prompt's samples stay together.
            share = dist_utils.shard([rng.choice(prompts) for _ in range(config.prompts_per_batch)])
            return [text for text, _ in share], [row for _, row in share]

        for it in bar:
            t0 = time.perf_counter()
            if config.dynamic_sampling is not None:
                samples = sample_informative(models, draw, tokenizer, reward_fn, config, device, generator)
            else:
                samples = sample(models, *draw(), tokenizer, reward_fn, config, device, generator)
            packing = PackingStats()
            with packed_forwards(models, config.data.packing, packing):
                exp = score_experience(models, samples, estimator, config, ctx.kernel_backend)
            t1 = time.perf_counter()
            generator.sleep()  # an engine with its own memory gives it back while the trainer works
            with packed_forwards(models, config.data.packing, packing):
                metrics = update(models, exp, loss_entry, config, ctx.kernel_backend)
            if config.data.packing:
                metrics["packing_efficiency"] = packing_efficiency(packing, device)
            generator.update_weights(models.policy)
            t2 = time.perf_counter()
            metrics.update(experience_stats(exp, models.kl.value))
            models.kl.update(metrics["kl"], config.prompts_per_batch * config.samples_per_prompt)
            metrics.update(time_generate=exp.time_generate, time_score=t1 - t0 - exp.time_generate, time_train=t2 - t1)
            tied = metrics.get("reward_tied", 0.0)  # absent with reward: null
            if tied and not any(history["reward_tied"]) and is_main_process():
                print(f"{ctx.name}: warning: iteration {it}: " + tied_reason(config.samples_per_prompt)
                      + " (counted as reward_tied in the metrics and the summary; later ones are not printed)")
            history["kl"].append(metrics["kl"])
            history["reward_tied"].append(tied)
            ctx.tracker.log(it, metrics)
            last = metrics
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.3f}")
            if eval_prompts and config.eval_every > 0 and it % config.eval_every == 0 and it != config.iterations:
                ctx.tracker.log(it, {f"eval_{k}": v for k, v in evaluate().items()})
            if ckpt is not None and ckpt.due(it, config.iterations):
                state = estimator.estimator.state_dict() if hasattr(estimator.estimator, "state_dict") else None
                ckpt.save(it, trained, optims, {
                    "first": first, "last": last, "history": history, "prompt_rng": rng.getstate(),
                    "kl_coef": models.kl.value, "estimator": state,
                })
                ckpt.after_save()
        return last

    # ------------------------------------------------------------------ setup and checks

    def validate(self, config: PPOConfig, registry, run=None) -> list[str]:
        """Cross-field problems found before any model loads (``key: message`` each)."""
        problems = packing_problems() if config.data.packing else []
        if config.shared_backbone is True and run is not None:
            if run.model.lora is None:
                problems.append("shared_backbone: true needs LoRA (model.lora): the shared base is the frozen one")
            elif run.distributed.strategy == "ddp" and dist_utils.planned_world_size() > 1:
                problems.append("shared_backbone: true does not work with distributed.strategy: ddp (DDP replicates "
                                "whole modules); use fsdp")
        estimator_cls = registry.lookup("advantage", config.advantage).obj
        try:  # an option can raise the need (reinforce_pp's baseline: group)
            need = getattr(estimator_cls(**config.advantage.options), "min_group_size", 1)
        except Exception:  # a bad option: check_options reports it
            need = getattr(estimator_cls, "min_group_size", 1)
        if config.samples_per_prompt < need:
            problems.append(
                f"samples_per_prompt: advantage estimator {config.advantage.name!r} compares samples of the same "
                f"prompt and needs samples_per_prompt >= {need}, got {config.samples_per_prompt}"
            )
        world = dist_utils.planned_world_size()
        problems += fused_linear_problems(config.fused_linear, "")
        problems += policy_loss_problems(config, registry)
        problems += sampling_problems(config, registry)
        if isinstance(config.reward, list):
            if not config.reward:
                problems.append("reward: an empty list; name at least one reward, or null for none")
            problems += [f"reward[{i}].weight: must be a finite number, got {spec.weight!r}"
                         for i, spec in enumerate(config.reward) if not math.isfinite(spec.weight)]
        if world > 1:
            if config.prompts_per_batch % world:
                problems.append(f"prompts_per_batch: must be a multiple of the {world} processes (each takes an equal "
                                f"share), got {config.prompts_per_batch}")
            if config.minibatch_size % world:
                problems.append(f"minibatch_size: must be a multiple of the {world} processes, got {config.minibatch_size}")
        return problems

    def inputs(self, config: PPOConfig, registry) -> list[StageInput]:
        """The prompt data, the starting policy, the distillation teacher and (for estimators that need
        one) the critic."""
        out = [*data_inputs(config.data, "prompts", extra=read_fields(config, registry)),
               StageInput("init", "model", config.init)]
        for path, spec in reward_specs(config.reward) + reward_specs(config.gold, "gold"):  # what a reward itself reads (a trained reward model, a judge model)
            reads = getattr(registry.lookup("reward", spec).obj, "inputs", None)
            out += [dataclasses.replace(item, path=f"{path}.{item.path}") for item in (reads(**spec.options) if reads else [])]
        if config.distill is not None:
            out.append(StageInput("distill.teacher", "model", config.distill.teacher))
        if registry.lookup("advantage", config.advantage).obj.needs_values:
            out.append(StageInput("critic_init", "model", config.critic_init))
        return out

    def plan(self, config: PPOConfig, registry, sizes: dict[str, int]) -> dict[str, Any]:
        """Iterations, samples and the most tokens generated (``rlhf run --dry-run``)."""
        samples = config.iterations * config.prompts_per_batch * config.samples_per_prompt
        return {"iterations": config.iterations, "samples": samples,
                "optimizer steps": config.iterations * config.ppo_epochs
                * math.ceil(config.prompts_per_batch * config.samples_per_prompt / config.minibatch_size),
                "generated tokens (at most)": samples * config.generation.max_new_tokens}

    @staticmethod
    def _models(ctx, config: PPOConfig, needs_critic: bool,
                source: str) -> tuple[PPOModels, RewardSum | None, RewardSum | None]:
        """Policy, reference (frozen copy of the start), reward and gold judges, critic, optimizers,
        KL controller. With LoRA the reference is the policy with its adapters off, and reward
        models and the critic that fit become adapters + heads on the policy's frozen base
        (``shared_backbone``); every model is sharded once it is complete."""
        model_cfg, device = ctx.run_config.model, ctx.device
        policy = ctx.adapt(load_causal_lm(model_cfg, source, seed=ctx.seed).to(device), source)
        # With LoRA the reference is the policy with its adapters disabled: no second copy of the weights.
        # kl.coef 0: no reference at all (nothing loaded, no reference forward).
        reference_free = config.kl.coef == 0
        reference = None if is_lora(policy) or reference_free else ctx.load_model(config.init, trainable=False)
        ctx.shared = share_backbone(ctx, config, policy)
        critic = None
        try:
            reward_fn = build_rewards(ctx, config.reward)  # None with reward: null (distillation alone)
            gold_fn = build_rewards(ctx, config.gold)
            if needs_critic:
                critic = ctx.load_scalar_model(ctx.init_source(config.critic_init, "reward"), name="critic", trainable=True)
        finally:
            shared, ctx.shared = ctx.shared, None
            if shared is not None:
                shared.seal()
        policy = ctx.wrap(policy)
        if shared is not None and not shared.trainable:
            shared = None  # nothing took the offer: the policy is an ordinary LoRA model
        params = shared.parameters_of(POLICY_ADAPTER) if shared is not None else [p for p in policy.parameters()
                                                                                  if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        critic_opt = None
        if critic is not None:
            critic_opt = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad], lr=config.critic_lr)
        kl = KLController(config.kl.coef, config.kl.adaptive, config.kl.target, config.kl.horizon)
        teacher, teacher_is_base = load_teacher(ctx, config, policy, source)
        fused = use_fused_linear(config.fused_linear, ctx.name, [policy, reference, teacher])
        return PPOModels(policy, reference, optimizer, kl, critic, critic_opt, fused=fused, policy_params=params,
                         shared=shared, reference_free=reference_free, teacher=teacher,
                         teacher_is_base=teacher_is_base), reward_fn, gold_fn


def load_teacher(ctx, config: PPOConfig, policy, source: str) -> tuple[Any, bool]:
    """``(teacher, teacher_is_base)`` for ``distill``: ``(None, False)`` without it; with LoRA and a
    teacher that is the policy's own base, ``(None, True)`` (the policy with its adapters off, no
    copy); else a frozen, sharded copy. A teacher with another vocabulary is refused: its
    log-probs must be of the very tokens the policy sampled."""
    if config.distill is None:
        return None, False
    teacher_source = ctx.init_source(config.distill.teacher, "policy")
    if ctx.tokenizer_for(teacher_source).get_vocab() != ctx.tokenizer_for(source).get_vocab():
        raise StageError(f"stage {ctx.name!r}: distill.teacher {config.distill.teacher!r} ({teacher_source}) has another "
                         f"tokenizer than the policy ({source}); on-policy distillation scores the policy's own tokens, "
                         "so the teacher must share its vocabulary")
    if is_main_process():
        print(f"{ctx.name}: distilling from the teacher {teacher_source} (coef {config.distill.coef})")
    if is_lora(policy) and teacher_source == source:
        return None, True
    return ctx.load_model(config.distill.teacher, trainable=False), False


def share_backbone(ctx, config: PPOConfig, policy) -> SharedBackbone | None:
    """The offer to reward models and the critic to be adapters on the LoRA policy's frozen base
    (``shared_backbone``), or None: off, no LoRA, DDP (one DDP module would hold parameters that
    half of the backwards leave unused), or a model that cannot skip its LM head."""
    setting = config.shared_backbone
    if setting is False or not is_lora(policy):
        return None
    why = ("DDP replicates whole modules; use distributed.strategy: fsdp"
           if dist_utils.resolve_strategy(ctx.run_config.distributed.strategy) == "ddp" else "")
    shared = SharedBackbone(policy, ctx.run_config.model.lora, required=setting is True)
    why = why or shared.problem
    if why and setting is True:
        raise StageError(f"stage {ctx.name!r}: shared_backbone: {why}; set it to auto or false")
    if why:
        if is_main_process():
            print(f"{ctx.name}: shared_backbone off ({why}); reward model and critic keep their own weights")
        return None
    return shared


# ---------------------------------------------------------------------- the phases of an iteration

@torch.no_grad()
def sample(models: PPOModels, prompts: list[str], rows: list[dict[str, Any]], tokenizer, reward_fn: RewardSum | None,
           config: PPOConfig, device: torch.device, generator: Any = None) -> Samples:
    """Sample ``samples_per_prompt`` responses per prompt (a prompt's samples in consecutive rows)
    and score them with the rewards (zeros with ``reward: null``), which see each prompt's data
    record ``rows`` (aligned with ``prompts``), plus the overlong shaping."""
    k = config.samples_per_prompt
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts for _ in range(k)]
    prompt_text = [p for p in prompts for _ in range(k)]
    sample_rows = [row for row in rows for _ in range(k)]
    group_ids = torch.arange(len(prompts), device=device).repeat_interleave(k)
    started = time.perf_counter()
    models.policy.eval()
    g = config.generation
    if generator is not None:
        generator.wake()
        roll = generator.generate(prompt_ids, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p)
    else:  # the hf engine, without the plugin wrapper (tests, benchmarks)
        roll = generate(models.policy, tokenizer, prompt_ids, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                        top_p=g.top_p, device=device)
    time_generate = time.perf_counter() - started
    rewards, parts = torch.zeros(len(prompt_ids), device=device), {}  # reward: null
    if reward_fn is not None:
        rewards, parts = reward_fn.score(prompt_text, roll.responses, sample_rows)  # [B] each, checked
        rewards, parts = rewards.to(device), {name: v.to(device) for name, v in parts.items()}
    truncated = truncated_responses(roll.labels, roll.mask, tokenizer.eos_token_id)
    overlong = torch.zeros_like(rewards)
    if config.overlong is not None:
        overlong = overlong_penalty(roll.mask.sum(1), g.max_new_tokens, config.overlong.cache,
                                    config.overlong.penalty).to(device)
        rewards = rewards + overlong
    return Samples(roll, rewards, group_ids, truncated, overlong, time_generate, reward_parts=parts)


@torch.no_grad()
def sample_informative(models: PPOModels, draw: Callable[[], tuple[list[str], list[dict]]], tokenizer,
                       reward_fn: RewardSum | None, config: PPOConfig, device: torch.device,
                       generator: Any = None) -> Samples:
    """DAPO's dynamic sampling: rounds of :func:`sample` on prompt batches from ``draw()`` (this
    rank's share of a fresh global batch each round: prompts and their data records) until every
    rank holds as many groups whose
    rewards are not all equal as one draw has prompts, or ``dynamic_sampling.max_rounds`` rounds
    were run (then dropped groups fill the batch). Every rank runs the same number of rounds (its
    sharded forwards must meet), keeping the informative groups first found. Logs ``ds_rounds``,
    ``ds_dropped_groups`` (sampled and left out) and ``ds_filled_groups`` (tied groups used to fill
    the batch), summed over ranks."""
    k = config.samples_per_prompt
    pool: list[Samples] = []
    kept: list[list[int]] = []   # rows (of the concatenated rounds) of each kept group
    spare: list[list[int]] = []  # rows of each tied group
    offset, rounds, need = 0, 0, 0
    while True:
        prompts, rows = draw()
        need = len(prompts)
        batch = sample(models, prompts, rows, tokenizer, reward_fn, config, device, generator)
        pool.append(batch)
        rounds += 1
        grouped = batch.rewards.view(-1, k)
        for i, informative in enumerate(((grouped.max(1).values - grouped.min(1).values) > 0).tolist()):
            rows = list(range(offset + i * k, offset + (i + 1) * k))
            if not informative:
                spare.append(rows)
            elif len(kept) < need:
                kept.append(rows)
        offset += len(batch.rewards)
        short = dist_utils.all_reduce_max(torch.tensor(float(len(kept) < need), device=device))
        if float(short) == 0 or rounds >= config.dynamic_sampling.max_rounds:
            break
    filled = need - len(kept)
    kept += spare[:filled]
    rows = torch.tensor([row for group in kept for row in group], dtype=torch.long)
    counts = dist_utils.all_reduce_sum(torch.tensor([len(spare) - filled, filled], dtype=torch.float64, device=device))
    if float(counts[1]) > 0 and is_main_process():
        print(f"ppo: dynamic sampling found too few groups with different rewards in {rounds} rounds; "
              f"{int(counts[1])} tied group(s) fill the batch (raise dynamic_sampling.max_rounds)")
    stats = {"ds_rounds": float(rounds), "ds_dropped_groups": float(counts[0]), "ds_filled_groups": float(counts[1])}

    def joined(name: str) -> torch.Tensor:
        return torch.cat([getattr(b, name) for b in pool])[rows.to(pool[0].rewards.device)]

    parts = {name: torch.cat([b.reward_parts[name] for b in pool])[rows.to(pool[0].rewards.device)]
             for name in pool[0].reward_parts}
    return Samples(concat_rollouts([b.rollout for b in pool], tokenizer.pad_token_id, rows), joined("rewards"),
                   torch.arange(need, device=device).repeat_interleave(k), joined("truncated"), joined("overlong"),
                   sum(b.time_generate for b in pool), stats, parts)


@torch.no_grad()
def score_experience(models: PPOModels, samples: Samples, estimator, config: PPOConfig, backend: str | None) -> Experience:
    """Scoring phase: old, reference and teacher log-probs and critic values of the samples, the
    shaped rewards (KL to the reference, distillation), advantages, rollout corrections and the
    policy loss's mask (truncated responses, masked IS)."""
    roll, rewards = samples.rollout, samples.rewards
    mask = roll.mask.float()
    # On-policy (one epoch, one minibatch, KL in the loss): the old log-probs are the update's own,
    # detached, so the no-grad scoring forward is skipped and update() fills them in.
    skip_old = on_policy(config) and roll.logprobs is None
    with autocast_context(config.mixed_precision, mask.device):
        old_logp, entropy = (None, None) if skip_old else score_tokens(models.policy, roll, backend, with_entropy=True,
                                                                       fused=models.fused)
        ref_logp = reference_logprobs(models, roll, backend)
        teacher_logp = teacher_logprobs(models, roll, backend) if config.distill is not None else None
        values = critic_values(models.critic, roll) if models.critic is not None else None
    kl_tokens = (torch.zeros_like(mask) if skip_old or ref_logp is None  # no KL without a reference; on-policy: set by update()
                 else KL_ESTIMATORS[config.kl.estimator](old_logp, ref_logp) * mask)  # [B, R]
    dense = distill_rewards(old_logp, teacher_logp, mask, config.distill.coef) if teacher_logp is not None else None
    seq_rewards, token_rewards = shape_rewards(rewards, kl_tokens, mask, models.kl.value, config.kl.placement, dense)
    advantages = estimator(AdvantageInputs(seq_rewards, token_rewards, mask, samples.group_ids, values,
                                           all_reduce=dist_utils.all_reduce_sum)) * mask
    returns = advantages + values if values is not None else None
    if config.whiten_advantages:
        advantages = whiten(advantages, mask)
    stats: dict[str, Any] = dict(samples.stats)
    if config.reward is not None:
        stats.update(reward_signal(samples, config.samples_per_prompt))
    loss_mask = None  # the response mask, unless tokens leave the policy loss
    if config.overlong is not None:
        per_sequence = torch.ones_like(rewards)
        stats["overlong_penalty_mean"] = masked_mean(samples.overlong, per_sequence, global_=True)
        stats["truncated_frac"] = masked_mean(samples.truncated.float(), per_sequence, global_=True)
        if config.overlong.mask_truncated:
            loss_mask = mask * (~samples.truncated).float().unsqueeze(1)
    if dense is not None:  # the mean sequence reverse KL to the teacher
        stats["distill_kl"] = masked_mean(((old_logp - teacher_logp) * mask).sum(1), torch.ones_like(rewards), global_=True)
    if roll.logprobs is not None:  # the engine's sampling probabilities vs the trainer's (peers document a gap)
        stats["engine_logprob_gap"] = masked_mean((old_logp - roll.logprobs).abs(), mask, global_=True)
        c = config.rollout_correction
        if c is not None:
            weight, keep, metrics = rollout_correction(old_logp, roll.logprobs, mask, c.type, cap=c.cap, low=c.low,
                                                       high=c.high)
            advantages = advantages * weight
            if c.type in ("mask", "seq_mask"):
                loss_mask = (loss_mask if loss_mask is not None else mask) * keep
            stats.update({name: masked_mean(v, mask, global_=True) for name, v in metrics.items()})
    return Experience(roll, rewards, old_logp, ref_logp, entropy, kl_tokens, advantages, values, returns,
                      samples.time_generate, {k: float(v) for k, v in stats.items()}, loss_mask)


def packed_forwards(models: PPOModels, packing: bool, stats: PackingStats):
    """A ``padding_free`` block over every model PPO scores or trains with (``data.packing``; else
    nothing): the policy (and with it a critic or reward adapter on its base), the reference, a
    critic of its own and the teacher. Sampling stays outside: decoding is never packed."""
    if not packing:
        return contextlib.nullcontext()
    critic = models.critic if isinstance(models.critic, torch.nn.Module) else None
    return padding_free(models.policy, models.reference, critic, models.teacher, stats=stats)


def packing_efficiency(stats: PackingStats, device: torch.device) -> float:
    """Real tokens over packed row capacity of this iteration's forwards, over every rank."""
    real, slots = dist_utils.all_reduce_sum(torch.tensor([stats.real, stats.slots], dtype=torch.float64,
                                                          device=device)).tolist()
    return real / slots if slots else 1.0


def tied_reason(k: int) -> str:
    """What a tied batch means, for the warnings."""
    if k > 1:
        return (f"every prompt's {k} samples got the same reward, so group-relative advantages are 0 and the reward "
                "teaches nothing in this batch")
    return "every sample in the batch got the same reward, so the reward teaches nothing in this batch"


def reward_signal(samples: Samples, k: int) -> dict[str, float]:
    """Whether the batch's rewards can teach anything, over every rank: ``reward_tied`` is 1 when
    every group of ``k > 1`` samples got equal rewards (group-relative advantages are all 0), or
    with ``k = 1`` when every reward in the batch is equal (a constant reward); with ``k > 1``,
    ``tied_groups_frac`` is the share of groups whose samples all got the same reward. With
    several weighted rewards, ``reward_<name>`` is each one's unweighted mean."""
    rewards = samples.rewards.double()
    one = torch.ones_like(rewards)
    out = {f"reward_{name}": masked_mean(part.double(), one, global_=True) for name, part in samples.reward_parts.items()}
    if k > 1:
        grouped = rewards.view(-1, k)
        tied = ((grouped.max(1).values - grouped.min(1).values) == 0).double()
        counts = dist_utils.all_reduce_sum(torch.stack([tied.sum(), torch.tensor(float(len(tied)), dtype=torch.float64,
                                                                                  device=tied.device)]))
        out["tied_groups_frac"] = float(counts[0] / counts[1])
        out["reward_tied"] = float(counts[0] == counts[1])
    else:
        high = dist_utils.all_reduce_max(rewards.max())
        low = -dist_utils.all_reduce_max(-rewards.min())
        out["reward_tied"] = float(high == low)
    return {k_: float(v) for k_, v in out.items()}


def make_experience(models: PPOModels, prompts: list[str], rows: list[dict[str, Any]], tokenizer,
                    reward_fn: RewardSum | None, estimator, config: PPOConfig, device: torch.device,
                    backend: str | None, generator: Any = None) -> Experience:
    """Rollout phase on ``prompts`` (and their data records ``rows``): :func:`sample` then
    :func:`score_experience`."""
    return score_experience(models, sample(models, prompts, rows, tokenizer, reward_fn, config, device, generator),
                            estimator, config, backend)


def reference_logprobs(models: PPOModels, roll, backend: str | None) -> torch.Tensor | None:
    """Log-probs ``[B, R]`` of the response tokens under the reference: the frozen copy, or with
    LoRA the policy itself with its adapters switched off (exactly the starting weights); None
    without a reference (``kl.coef: 0``)."""
    if models.reference_free:
        return None
    if models.reference is not None:
        return score_tokens(models.reference, roll, backend, fused=models.fused)[0]
    with lora_scope(models.policy, None):
        return score_tokens(models.policy, roll, backend, fused=models.fused)[0]


def teacher_logprobs(models: PPOModels, roll, backend: str | None) -> torch.Tensor:
    """Log-probs ``[B, R]`` of the response tokens under the distillation teacher: its frozen copy,
    or (``teacher_is_base``) the LoRA policy with its adapters switched off."""
    if not models.teacher_is_base:
        return score_tokens(models.teacher, roll, backend, fused=models.fused)[0]
    with lora_scope(models.policy, None):
        return score_tokens(models.policy, roll, backend, fused=models.fused)[0]


def update(models: PPOModels, exp: Experience, loss_entry, config: PPOConfig, backend: str | None) -> dict[str, float]:
    """Training phase: ``ppo_epochs`` passes of minibatch updates of the policy (and critic) on one
    Experience. ``loss_entry``: the registered policy loss (its function and, in ``meta``, its
    ``fused`` form). Each minibatch's normalisers (``loss_agg``'s, and the critic's token count) are
    summed over every rank before its micro-batches (``micro_batch_size`` rows each) run, and each
    micro-batch contributes its share, so the step does not depend on the number of processes or the
    micro-batch split. Returns minibatch-averaged stats."""
    mask = exp.policy_mask()  # the tokens of the policy loss
    step = PolicyLossStep(models, exp, loss_entry, config, backend)
    world = dist_utils.world_size()
    local_minibatch = max(1, config.minibatch_size // world)
    local_micro = max(1, (config.micro_batch_size or config.minibatch_size) // world)
    stats: dict[str, list[float]] = {}
    models.policy.train()
    tokens = exp.rollout.attention_mask.sum(1).tolist()  # real tokens per row, for token-budget micro-batches
    for _ in range(config.ppo_epochs):
        for idx in torch.randperm(len(mask), device=mask.device).split(local_minibatch):
            micros = (token_runs(idx, tokens, config.max_tokens_per_micro_batch)
                      if config.max_tokens_per_micro_batch is not None else idx.split(local_micro))
            normaliser = float(dist_utils.all_reduce_sum(
                local_normaliser(config.loss_agg, mask[idx], config.generation.max_new_tokens)))
            models.optimizer.zero_grad(set_to_none=True)
            window: dict[str, list[float]] = {}  # metric -> [sum of value * tokens, tokens]
            policy_loss = 0.0
            for micro in micros:
                with autocast_context(config.mixed_precision, mask.device):
                    loss, m = step(micro, normaliser)
                if not torch.isfinite(loss):
                    raise TrainingError(f"stage 'ppo': the policy loss became {float(loss.detach())}; lower lr, kl.coef "
                                        "or entropy_coef, set mixed_precision: no, or check the reward's scale")
                (loss * world).backward()  # ranks' gradients are averaged: each rank's share counts world times
                policy_loss += float(loss.detach()) * world
                n = float(mask[micro].sum())
                for key, value in m.items():
                    window.setdefault(key, [0.0, 0.0])
                    window[key][0] += value * n
                    window[key][1] += n
            grad_norm = clip_gradients(models.policy_params, config.max_grad_norm, "policy")
            models.optimizer.step()
            m = {k: total / max(count, 1e-9) for k, (total, count) in window.items()}
            m.update(policy_loss=policy_loss, grad_norm=float(grad_norm))
            if models.critic is not None:
                m["value_loss"] = critic_update(models, exp, micros, config)
            for key, value in m.items():
                stats.setdefault(key, []).append(float(value))
    if step.fill:
        response = exp.rollout.mask.float()
        exp.old_logprobs = step.old[:, :-1] * response
        exp.entropy = exp.entropy * response
        exp.kl_tokens = (KL_ESTIMATORS[config.kl.estimator](exp.old_logprobs, exp.ref_logprobs) * response
                         if exp.ref_logprobs is not None else torch.zeros_like(response))
    return dist_utils.global_mean({key: sum(v) / len(v) for key, v in stats.items()}, mask.device)


def token_runs(rows: torch.Tensor, tokens: list[int], budget: int) -> list[torch.Tensor]:
    """``rows`` cut into maximal consecutive runs whose ``tokens`` fit ``budget`` (a row over it alone)."""
    starts = budget_runs([tokens[row] for row in rows.tolist()], budget)
    return [rows[a:b] for a, b in zip(starts, starts[1:])]


def critic_update(models: PPOModels, exp: Experience, micros: list[torch.Tensor], config: PPOConfig) -> float:
    """One optimizer step of the critic on a minibatch (``micros``: its micro-batches' rows): the
    clipped value loss, a token mean over every rank's minibatch tokens. Returns this rank's loss."""
    roll, mask = exp.rollout, exp.rollout.mask.float()
    counts = [float(mask[micro].sum()) for micro in micros]
    weights = dist_utils.loss_weights(counts, mask.device)
    models.critic_optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for micro, n, weight in zip(micros, counts, weights):
        # A critic on the policy's base: its backward (a checkpointed recomputation) in its adapter's scope too.
        with getattr(models.critic, "scope", contextlib.nullcontext)():
            v_new = response_values(models.critic, roll.sequences[micro], roll.attention_mask[micro], roll.prompt_len)
            v_loss = clipped_value_loss(v_new, exp.values[micro], exp.returns[micro], mask[micro], config.vf_clip)
            if not torch.isfinite(v_loss):
                raise TrainingError(f"stage 'ppo': the value loss became {float(v_loss.detach())}; lower "
                                    "critic_lr or check the reward's scale")
            (v_loss * weight).backward()
        total += float(v_loss.detach()) * n
    clip_gradients(models.critic.parameters(), config.max_grad_norm, "critic")
    models.critic_optimizer.step()
    return total / max(sum(counts), 1e-9)


class PolicyLossStep:
    """The policy loss of one micro-batch, for :func:`update`: the per-token tensors of an
    Experience widened to the ``[B, R + 1]`` columns of the policy's forward (the extra column is
    never a target), the registered loss, and what the config says about penalties and aggregation.

    ``step(rows, normaliser) -> (loss, metrics)``: the policy's log-probs of the sampled tokens come
    from the fused-linear kernels (``models.fused``) or the logits; the registered loss turns them
    into per-token terms that :func:`aggregate` sums with the minibatch's global ``normaliser``.
    Where the loss's registered fused form applies to these options, its one-sweep kernel gives the
    micro-batch's token mean instead, scaled to the same share. On-policy (``fill``), the pass's own
    detached log-probs are the old ones, and its entropy is logged."""

    def __init__(self, models: PPOModels, exp: Experience, loss_entry, config: PPOConfig, backend: str | None):
        roll = exp.rollout
        self.models, self.exp, self.roll, self.config, self.backend = models, exp, roll, config, backend
        self.loss_fn, self.options = loss_entry.obj, config.loss.options
        self.fast = loss_entry.meta.get("fused")
        self.fast_options = self.fast.options(self.options, config.loss_agg) if self.fast is not None else None
        self.fill = exp.old_logprobs is None  # on-policy: see make_experience
        if self.fill:
            exp.old_logprobs, exp.entropy = torch.zeros_like(roll.mask.float()), torch.zeros_like(roll.mask.float())
        self.labels, self.mask = widen(roll.labels, -100), widen(exp.policy_mask(), 0.0)
        # what the fused form's token mean runs over: the tokens of the loss
        self.loss_labels = self.labels.masked_fill(self.mask == 0, -100)
        self.old, self.adv = widen(exp.old_logprobs, 0.0), widen(exp.advantages, 0.0)
        self.ref = widen(exp.ref_logprobs, 0.0) if exp.ref_logprobs is not None else None
        self.engine = widen(roll.logprobs, 0.0) if roll.logprobs is not None else None
        self.penalties = dict(kl_estimator=config.kl.estimator, kl_in_loss=config.kl.placement == "loss" and
                              self.ref is not None, beta=models.kl.value, entropy_coef=config.entropy_coef)
        self.wants_entropy = "entropy" in loss_entry.meta.get("needs", ()) or config.entropy_coef > 0

    def __call__(self, rows: torch.Tensor, normaliser: float) -> tuple[torch.Tensor, dict[str, float]]:
        share = float(self.mask[rows].sum()) / normaliser if normaliser > 0 else 0.0
        fast = self.fast_options is not None and share > 0  # its token mean needs a token in the loss
        ref = self.ref[rows] if self.ref is not None else None
        args = (self.models.policy, self.roll.sequences[rows], self.roll.attention_mask[rows], self.roll.prompt_len)
        if self.models.fused:
            def objective(hidden, head):  # inside the policy's forward
                flat, labels = hidden.reshape(-1, hidden.shape[-1]), self.labels[rows].reshape(-1)
                shape = self.labels[rows].shape
                if self.fill and not fast and not self.wants_entropy:
                    # On-policy: one pass gives the log-probs (their detached values are the old ones)
                    # and the entropy to log, instead of a scoring pass before the loss's.
                    logp, entropy = rlhf_kernels.linear_token_logprobs(flat, head, labels, backend=self.backend,
                                                                       with_entropy=True, entropy_grad=False)
                    logp = logp.view(shape)
                    self.old[rows] = logp.detach()
                    self.exp.entropy[rows] = entropy.detach().view(shape)[:, :-1]
                    return self._aggregated(rows, logp, None, normaliser)
                self._fill_old(rows, hidden, head)
                if fast:
                    loss, m = self.fast.on_linear(flat, head, self.loss_labels[rows].reshape(-1), self.old[rows].reshape(-1),
                                                  self.adv[rows].reshape(-1), ref.reshape(-1) if ref is not None else None,
                                                  self.mask[rows].reshape(-1), **self.fast_options,
                                                  backend=self.backend, **self.penalties)
                    return loss * share, m
                logp = rlhf_kernels.linear_token_logprobs(flat, head, labels, backend=self.backend).view(shape)
                entropy = (rlhf_kernels.linear_token_entropy(flat, head, backend=self.backend).view(shape)
                           if self.wants_entropy else None)
                return self._aggregated(rows, logp, entropy, normaliser)

            return response_hidden(*args, objective)
        logits = response_logits(*args)
        self._fill_old(rows, logits, None)
        if fast:
            loss, m = self.fast.on_logits(logits, self.loss_labels[rows], self.old[rows], self.adv[rows], ref, self.mask[rows],
                                          **self.fast_options, backend=self.backend, **self.penalties)
            return loss * share, m
        logp = rlhf_kernels.token_logprobs(logits, self.labels[rows], backend=self.backend)
        entropy = rlhf_kernels.token_entropy(logits, backend=self.backend) if self.wants_entropy else None
        return self._aggregated(rows, logp, entropy, normaliser)

    def _fill_old(self, rows: torch.Tensor, out: torch.Tensor, head: torch.Tensor | None) -> None:
        if self.fill:
            self.old[rows], entropy = token_scores(out.detach(), head.detach() if head is not None else None,
                                                   self.labels[rows], self.backend)
            self.exp.entropy[rows] = entropy[:, :-1]

    def _aggregated(self, rows, logprobs, entropy, normaliser) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = PolicyLossInputs(logprobs, self.old[rows], self.adv[rows], self.mask[rows],
                                  self.ref[rows] if self.ref is not None else None,
                                  self.engine[rows] if self.engine is not None else None, entropy,
                                  self.config.generation.max_new_tokens)
        terms, metrics = policy_loss_terms(self.loss_fn, self.options, inputs, **self.penalties)
        return aggregate(terms, self.mask[rows], self.config.loss_agg, normaliser), _metric_floats(metrics, self.mask[rows])


def _metric_floats(metrics: dict[str, Any], mask: torch.Tensor) -> dict[str, float]:
    """A loss's metrics as floats: per-token tensors as their masked mean, scalars as they are."""
    return {k: float(masked_mean(v.detach().float(), mask)) if torch.is_tensor(v) and v.dim() > 0 else float(v)
            for k, v in metrics.items()}


def policy_loss_problems(config: PPOConfig, registry) -> list[str]:
    """The policy loss's contract against the rest of the config: a loss written for the former
    logits contract, optional inputs it needs that this run cannot give."""
    entry = registry.lookup("loss", config.loss, "policy")
    params = list(inspect.signature(entry.obj).parameters)
    problems = []
    if params[:1] == ["logits"]:
        problems.append(f"loss: policy loss {config.loss.name!r} of plugin {entry.plugin!r} takes logits (the contract "
                        "before policy losses took log-probs); a policy loss is now fn(inputs: PolicyLossInputs, "
                        "**options) -> (per-token terms, metrics): see docs/plugins.md, 'Policy losses'")
    needs = set(entry.meta.get("needs", ()))
    unknown = needs - {"ref_logprobs", "engine_logprobs", "entropy"}
    if unknown:
        problems.append(f"loss: policy loss {config.loss.name!r} declares needs {sorted(unknown)}; accepted: "
                        "ref_logprobs, engine_logprobs, entropy")
    if "ref_logprobs" in needs and config.kl.coef == 0:
        problems.append(f"kl.coef: policy loss {config.loss.name!r} needs the reference's log-probs, and kl.coef: 0 "
                        "means no reference; set kl.coef > 0")
    if "engine_logprobs" in needs and reports_no_logprobs(config, registry):
        problems.append(f"generator: policy loss {config.loss.name!r} needs the engine's sampling log-probs, which "
                        f"generator {config.generator.name!r} does not report (it samples from the trainer's "
                        "weights); use generator: vllm, or another loss")
    return problems


def reports_no_logprobs(config: PPOConfig, registry) -> bool:
    """The configured generator declares that it reports no sampling log-probs (``hf``)."""
    return getattr(registry.lookup("generator", config.generator).obj, "reports_logprobs", None) is False


def sampling_problems(config: PPOConfig, registry) -> list[str]:
    """What the reward, dynamic sampling and rollout corrections need from the rest of the config."""
    problems = []
    if config.reward is None and config.distill is None:
        problems.append("reward: null leaves nothing to learn from; name a reward, or set distill: {teacher: ...} to "
                        "learn from a teacher's log-probs alone")
    if config.dynamic_sampling is not None and config.reward is None:
        problems.append("dynamic_sampling: keeps groups whose rewards differ, and reward: null gives every sample 0; "
                        "remove dynamic_sampling or name a reward")
    if config.dynamic_sampling is not None and config.samples_per_prompt < 2:
        problems.append(f"dynamic_sampling: drops groups whose samples all got the same reward, which needs "
                        f"samples_per_prompt >= 2, got {config.samples_per_prompt}")
    if config.rollout_correction is not None and reports_no_logprobs(config, registry):
        problems.append(f"rollout_correction: {config.rollout_correction.type} corrects for the gap between the "
                        f"engine's sampling log-probs and the trainer's, and generator {config.generator.name!r} "
                        "reports none (it samples from the trainer's own weights); remove it or use generator: vllm")
    return problems


def on_policy(config: PPOConfig) -> bool:
    """One epoch over one minibatch with the KL in the loss (or none), no rollout correction and no
    distillation (whose token rewards need them first): the policy that sampled is the one being
    updated, so the old log-probs need no forward of their own."""
    return (config.ppo_epochs == 1 and config.minibatch_size >= config.prompts_per_batch * config.samples_per_prompt
            and (config.kl.placement == "loss" or config.kl.coef == 0) and config.rollout_correction is None
            and config.distill is None)


def experience_stats(exp: Experience, beta: float) -> dict[str, float]:
    """Batch statistics of one Experience over every rank's samples: reward mean and std, mean
    sequence KL (what the KL controller tracks), entropy, response length, advantage mean."""
    mask = exp.rollout.mask.float()
    rewards = exp.rewards.double()
    sums = dist_utils.all_reduce_sum(torch.stack([
        rewards.sum(), (rewards ** 2).sum(), torch.tensor(float(len(rewards)), dtype=torch.float64, device=rewards.device),
        exp.kl_tokens.sum().double(), mask.sum().double(),
    ]))
    n = float(sums[2])
    mean = float(sums[0]) / n
    var = max(0.0, (float(sums[1]) - n * mean ** 2) / (n - 1)) if n > 1 else 0.0
    return {
        "reward_mean": mean, "reward_std": var ** 0.5, "kl": float(sums[3]) / n, "kl_coef": beta,
        "entropy": float(masked_mean(exp.entropy, mask, global_=True)), "response_length": float(sums[4]) / n,
        "advantage_mean": float(masked_mean(exp.advantages, mask, global_=True)),
        **exp.stats,
    }


def read_fields(config: PPOConfig, registry) -> dict[str, str]:
    """The data fields the rewards and the gold judge read: ``{field: "reward 'math' (plugin ...)"}``."""
    return fields_read_by(registry, reward_specs(config.reward) + reward_specs(config.gold, "gold"))


class Rollouts:
    """A generator plugin whose every rollout is checked against the Generator contract, and whose
    optional ``sleep``/``wake`` are called only when it has them."""

    def __init__(self, entry, generator):
        self.entry, self.generator = entry, generator

    def generate(self, prompt_ids: list[list[int]], **settings) -> Any:
        return checked_rollout(self.entry, self.generator.generate, prompt_ids, **settings)

    def update_weights(self, policy) -> None:
        self._call("update_weights", policy)

    def sleep(self) -> None:
        self._call("sleep")

    def wake(self) -> None:
        self._call("wake")

    def _call(self, method: str, *args) -> None:
        fn = getattr(self.generator, method, None)
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as exc:
            raise ComponentError(f"{describe(self.entry)} raised {type(exc).__name__} in {method}: {exc}") from exc


class Estimator:
    """An advantage estimator whose every output is checked against its contract."""

    def __init__(self, entry, estimator):
        self.entry, self.estimator = entry, estimator
        self.needs_values = entry.obj.needs_values

    def __call__(self, inputs: AdvantageInputs) -> torch.Tensor:
        return checked_advantages(self.entry, self.estimator(inputs), inputs.mask)


def clip_gradients(params, max_norm: float, which: str) -> torch.Tensor:
    """Clip to ``max_norm`` (0 = off); a non-finite gradient norm stops training with advice."""
    norm = dist_utils.clip_grad_norm([p for p in params if p.grad is not None], max_norm)
    if not torch.isfinite(norm):
        raise TrainingError(f"stage 'ppo': the {which} gradient became {float(norm)}; lower the learning rate, "
                            "set max_grad_norm > 0, set mixed_precision: no, or check the reward's scale")
    return norm


def fit_prompts(tokenizer, prompts: list[str], budget: int, stats: TokenStats) -> list[str]:
    """Prompts that fit ``budget`` tokens: longer ones keep their last tokens (counted in ``stats``)."""
    out = []
    for text in prompts:
        stats.total += 1
        ids = encode_prompt(tokenizer, text)
        if len(ids) > budget:
            stats.truncated += 1
            bos = 1 if getattr(tokenizer, "bos_token_id", None) is not None else 0
            text = tokenizer.decode(ids[len(ids) - budget + bos:], skip_special_tokens=False)
        out.append(text)
    return out


@hookimpl
def rlhf_register_stages(register):
    register("ppo", PPOStage)
