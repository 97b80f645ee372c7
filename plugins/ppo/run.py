"""One PPO stage as a run object, step 3 of the three-step instruction-tuning recipe (RLHF with PPO).

:class:`PPORun` is built once (:meth:`PPORun.build`): the policy and its optimizer, the frozen
reference, the critic and its optimizer, the distillation teacher, the KL controller, the rollout
engine, the rewards, the advantage estimator and the policy loss. :meth:`PPORun.train` runs the
iterations; each one reads top to bottom in :meth:`PPORun.iteration`:

1. :meth:`~PPORun.sample` (or :meth:`~PPORun.sample_informative`): responses and their rewards;
2. :meth:`~PPORun.score`: old, reference and teacher log-probs, critic values, shaped rewards,
   advantages, rollout corrections -> an :class:`~.rollout.Experience`, filled once;
3. :meth:`~PPORun.update`: ``ppo_epochs`` passes of minibatch steps of the policy (and critic);
4. :meth:`~PPORun.stats`: what the iteration logs.

The math lives in pure functions (:mod:`.loss`, :mod:`.advantages`); the model calls in
:mod:`.rollout`. Deliberately left out: asynchronous rollouts (the engine samples, then the trainer
trains). Multi-turn episodes (``environment``) replace the one ``generate`` call of
:meth:`~PPORun.sample` by :class:`~.episodes.EpisodeRunner`; everything after it is unchanged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import rlhf_kernels
from rlhf_core import (
    AdvantageInputs, CheckedEnvironment, CheckedEstimator, CheckedGenerator, ComponentSpec, ModelConfig, OptimizerStep,
    Rollout, RunConfig, StageContext,
    append_column, load_tokenizer, PackingStats, PolicyLossInputs, Record,
    Rendering, RewardSum, SharedBackbone, StageError, autocast_context, build_rewards, concat_rollouts,
    evaluate_samples, fit_prompt, is_lora, is_main_process, load_causal_lm, lora_scope, masked_mean, padding_free,
    progress, render_prompt, use_fused_linear,
)
from rlhf_core import distributed as dist_utils
from rlhf_core.checkpoint import honour_stop_requests
from rlhf_core.models import POLICY_ADAPTER
from rlhf_core.training import budget_runs

from .advantages import whiten
from .config import PPOConfig
from .loss import (
    KL_ESTIMATORS, KLController, aggregate, clipped_value_loss, distill_rewards, local_normaliser, overlong_penalty,
    policy_loss_terms, rollout_correction, shape_rewards, truncated_responses,
)
from .asynchronous import Batch, RolloutWorker
from .episodes import EpisodeRendering, EpisodeRunner, ToolBox
from .rollout import (
    Experience, Samples, critic_values, response_hidden, response_logits, response_values, score_tokens,
    token_scores,
)


@dataclass
class Prompt:
    """A prompt as PPO samples it: its token ids (cut to the prompt budget), the text the rewards
    read, and its data record (the fields the rewards read)."""

    ids: list[int]
    text: str
    row: dict[str, Any]
    seed: int = 0
    """The episode's seed with ``environment`` (drawn with the prompt; the same for its samples)."""


@dataclass
class Outcome:
    """How :meth:`PPORun.train` ended: the first and final evaluations (empty without held-out
    prompts), the last iteration's metrics, and per iteration the KL and whether the rewards tied."""

    first: dict[str, float]
    final: dict[str, float]
    last: dict[str, float]
    history: dict[str, list[float]]


@dataclass
class PolicyUpdate:
    """What :meth:`PPORun.update` measured: minibatch-averaged ``metrics`` (over every rank), and
    on-policy (see :func:`on_policy`), the update's own log-probs of the sampled tokens before its
    step (``old_logprobs [B, R]``, the old policy's) and their entropy, which the Experience could
    not hold (None otherwise)."""

    metrics: dict[str, float]
    old_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


@dataclass
class PPORun:
    """Everything PPO trains or consults, built once (:meth:`build`; a test builds one from its
    parts). Models are already sharded for this run's processes.

    ``reference``: the frozen starting policy (None with LoRA, where the reference is the policy
    with its adapters off, and with ``kl.coef: 0``, where there is none); ``teacher``: the frozen
    distillation teacher (None without ``distill`` or with ``teacher_is_base``: the LoRA policy's
    base with its adapters off); ``shared``: the :class:`~rlhf_core.SharedBackbone` when the
    critic or a reward model is an adapter on the policy's base; ``fused``: log-probs, the policy
    loss and entropy come from the last hidden states and the LM head (no ``[B, R, V]`` logits);
    ``seed``: where the prompt sampler ``rng`` and every evaluation's random stream start;
    ``episodes``: the multi-turn episode runner with ``environment`` (None: one prompt, one response)."""

    config: PPOConfig
    name: str
    policy: Any
    policy_optim: OptimizerStep
    tokenizer: Any
    generator: CheckedGenerator
    rewards: RewardSum | None
    estimator: CheckedEstimator
    loss: Any
    kl: KLController
    device: torch.device
    backend: str | None
    seed: int
    reference: Any = None
    critic: Any = None
    critic_optim: OptimizerStep | None = None
    teacher: Any = None
    teacher_is_base: bool = False
    shared: SharedBackbone | None = None
    gold: RewardSum | None = None
    fused: bool = False
    episodes: EpisodeRunner | None = None
    rng: random.Random = field(init=False)
    worker: RolloutWorker | None = field(default=None, init=False)

    def __post_init__(self):
        self.rng = random.Random(self.seed)  # the prompt sampler: the same global batches on every rank

    # ------------------------------------------------------------------ setup

    @classmethod
    def build(cls, ctx, config: PPOConfig) -> "PPORun":
        """Policy, reference, rewards and gold judge, critic, optimizers, KL controller, teacher and
        rollout engine for a stage's ``ctx``. With LoRA the reference is the policy with its adapters
        off, and reward models and a critic that fit become adapters + heads on the policy's frozen
        base (``shared_backbone``, passed to what it builds as ``ctx.sharing(shared)``); every model
        is sharded once it is complete."""
        source = ctx.init_source(config.init, "policy")
        tokenizer = ctx.tokenizer_for(source)
        estimator_entry = ctx.registry.lookup("advantage", config.advantage)
        estimator = CheckedEstimator(estimator_entry, estimator_entry.obj(**config.advantage.options))
        policy = ctx.adapt(load_causal_lm(ctx.run_config.model, source, seed=ctx.seed).to(ctx.device), source)
        # With LoRA the reference is the policy with its adapters disabled: no second copy of the weights.
        # kl.coef 0: no reference at all (nothing loaded, no reference forward).
        reference = (None if is_lora(policy) or config.kl.coef == 0
                     else ctx.load_model(config.init, trainable=False))
        shared = share_backbone(ctx, config, policy)
        builder = ctx.sharing(shared)
        rewards = build_rewards(builder, config.reward)  # None with reward: null (distillation alone)
        gold = build_rewards(builder, config.gold)
        critic = (builder.load_scalar_model(ctx.init_source(config.critic_init, "reward"), name="critic", trainable=True)
                  if estimator.needs_values else None)
        if shared is not None:
            shared.seal()
        policy = ctx.wrap(policy)
        if shared is not None and not shared.trainable:
            shared = None  # nothing took the offer: the policy is an ordinary LoRA model
        teacher, teacher_is_base = load_teacher(ctx, config, policy, source)
        fused = use_fused_linear(config.fused_linear, ctx.name, [policy, reference, teacher])
        generator_entry = ctx.registry.lookup("generator", config.generator)
        generator = CheckedGenerator(generator_entry, generator_entry.obj(ctx, policy, tokenizer,
                                                                          **config.generator.options))
        run = cls.from_parts(ctx.registry, config, policy, tokenizer=tokenizer, reference=reference, critic=critic,
                             rewards=rewards, gold=gold, estimator=estimator, generator=generator, shared=shared,
                             teacher=teacher, teacher_is_base=teacher_is_base, fused=fused, backend=ctx.kernel_backend,
                             device=ctx.device, seed=ctx.seed, name=ctx.name, ctx=ctx)
        # The sampling stream starts here, whatever random draws building the models took (a reward
        # model or critic of its own or on the policy's base); each rank samples its own responses.
        torch.manual_seed(ctx.seed + dist_utils.rank())
        return run

    @classmethod
    def from_parts(cls, registry, config: PPOConfig, policy, *, tokenizer=None, reference=None, critic=None,
                   rewards: Any = None, gold: RewardSum | None = None, estimator: Any = None,
                   generator: CheckedGenerator | None = None, shared: SharedBackbone | None = None, teacher=None,
                   teacher_is_base: bool = False, fused: bool = False, backend: str | None = None,
                   device: torch.device = torch.device("cpu"), seed: int = 0, name: str = "ppo",
                   ctx: StageContext | None = None) -> "PPORun":
        """The run on these models; :meth:`build` loads, adapts and shards them for a stage and ends
        here, and a notebook, a benchmark or a test can start here with models built elsewhere (in one
        process, nothing checked up front): ``policy`` (trainable, on ``device``), an optional frozen
        ``reference``, ``critic`` and ``teacher``, ``rewards`` and ``gold`` (a
        :class:`~rlhf_core.RewardSum`; ``rewards`` may be a function ``(prompts, responses, rows) ->
        [B]``), an ``estimator`` (an instance, checked or not; default: ``config.advantage``'s), a
        ``generator`` (default: ``config.generator`` built on the policy), the ``shared`` backbone the
        critic or a reward model are adapters on (sealed). Optimizers, KL controller and policy loss
        are built as ``config`` says, and with ``config.environment`` the episode runner (its
        environment built with ``ctx``, by default a bare context of this process)."""
        tokenizer = tokenizer or load_tokenizer(ModelConfig())
        if rewards is not None and not isinstance(rewards, RewardSum):
            rewards = RewardSum([("reward", 1.0, rewards)])
        ctx = ctx or StageContext(name=name, stage_dir=Path("."), run_config=RunConfig(), registry=registry, tracker=None,
                                  device=device, seed=seed, results={})
        if generator is None:
            entry = registry.lookup("generator", config.generator)
            generator = CheckedGenerator(entry, entry.obj(ctx, policy, tokenizer, **config.generator.options))
        if estimator is None:
            entry = registry.lookup("advantage", config.advantage)
            estimator = CheckedEstimator(entry, entry.obj(**config.advantage.options))
        elif not isinstance(estimator, CheckedEstimator):
            estimator = CheckedEstimator(next(e for e in registry.entries("advantage") if e.obj is type(estimator)),
                                         estimator)
        steps, who, hint = config.optimizer_steps(), f"stage {name!r}", "check the reward's scale"
        params = shared.parameters_of(POLICY_ADAPTER) if shared is not None else policy.parameters()
        policy_optim = OptimizerStep(params, config.optim, device, steps, who=who, prefix="optim.", model="policy",
                                     hint=f"lower kl.coef or entropy_coef, or {hint}")
        critic_optim = (OptimizerStep(critic.parameters(), config.critic_optim, device, steps, who=who,
                                      prefix="critic_optim.", model="value", hint=hint) if critic is not None else None)
        kl = KLController(config.kl.coef, config.kl.adaptive, config.kl.target, config.kl.horizon)
        episodes = episode_runner(ctx, config, policy, tokenizer, generator) if config.environment is not None else None
        return cls(config, name, policy, policy_optim, tokenizer, generator, rewards, estimator,
                   registry.lookup("loss", config.loss, "policy"), kl, device, backend, seed, reference=reference,
                   critic=critic, critic_optim=critic_optim, teacher=teacher, teacher_is_base=teacher_is_base,
                   shared=shared, gold=gold, fused=fused, episodes=episodes)

    def prompt(self, text: str, row: dict[str, Any] | None = None) -> tuple[Prompt, bool]:
        """``(prompt, truncated)``: rendered prompt ``text`` as PPO samples it, within the prompt budget
        (a longer one keeps its BOS and last tokens; the rewards then read those tokens' text), with
        its data record ``row``."""
        ids, truncated = fit_prompt(self.tokenizer, text, self.config.prompt_budget())
        if truncated:
            text = self.tokenizer.decode(ids[1:] if ids[:1] == [self.tokenizer.bos_token_id] else ids,
                                         skip_special_tokens=False)
        return Prompt(ids, text, row if row is not None else {}), truncated

    def prompts(self, records: list[Record], rendering: Rendering) -> tuple[list[Prompt], int]:
        """The records as :class:`Prompt` s (see :meth:`prompt`), and how many were cut."""
        out = [self.prompt(render_prompt(self.tokenizer, r.fields, rendering, r.source), r.fields) for r in records]
        return [p for p, _ in out], sum(cut for _, cut in out)

    # ------------------------------------------------------------------ the loop

    def train(self, ctx, prompts: list[Prompt], held_out: list[Prompt]) -> "Outcome":
        """``iterations`` iterations on ``prompts``, logged to ``ctx.tracker``, with evaluations on
        ``held_out`` at the start, every ``eval_every`` iterations and at the end, and checkpoints as
        ``ctx.checkpointer`` says; continues exactly from its newest checkpoint. With ``async`` the
        rollout worker runs for the loop's duration (see :mod:`.asynchronous`)."""
        config, ckpt, tracker = self.config, ctx.checkpointer, ctx.tracker
        saved = ckpt.restore(*self.checkpointed()) if ckpt is not None else None
        start = 0
        if saved is not None:  # continue exactly: prompt order, KL coefficient, estimator state, progress
            start, first, last, history = saved["step"], saved["first"], saved["last"], saved["history"]
            self.load_state_dict(saved)
        else:
            first = self.evaluate(held_out) if held_out else {}
            if first:
                tracker.log(0, {f"eval_{k}": v for k, v in first.items()})
            last, history = {}, {"kl": [], "reward_tied": []}
        threads = torch.get_num_threads()
        if config.async_ is not None and config.async_.max_staleness > 0:
            self.start_worker(prompts, start, saved.get("async_batches") if saved is not None else None)
        bar = progress(start, config.iterations, self.name, unit="iteration")
        try:
            with honour_stop_requests(ckpt):
                for it in bar:
                    last = self.iteration(it, prompts, history)
                    tracker.log(it, last)
                    bar.set_postfix(reward=f"{last['reward_mean']:.3f}", kl=f"{last['kl']:.3f}")
                    if held_out and config.eval_every > 0 and it % config.eval_every == 0 and it != config.iterations:
                        tracker.log(it, {f"eval_{k}": v for k, v in self.evaluate(held_out).items()})
                    if ckpt is not None and ckpt.due(it, config.iterations):
                        queued = {"async_batches": self.queued(it)} if self.worker is not None else {}
                        ckpt.save(it, *self.checkpointed(), {"first": first, "last": last, "history": history,
                                                             **self.state_dict(), **queued})
                        ckpt.after_save()
        finally:
            if self.worker is not None:
                self.worker.close()
                self.worker = None
                torch.set_num_threads(threads)
        bar.close()
        final = self.evaluate(held_out) if held_out else {}
        if final:
            tracker.log(config.iterations, {f"eval_{k}": v for k, v in final.items()})
        return Outcome(first, final, last, history)

    def start_worker(self, prompts: list[Prompt], done: int, queued: list | None) -> None:
        """Start the rollout worker at the weights after ``done`` updates, with the batches a checkpoint
        held (``queued``, see :meth:`queued`); it requests the next ones itself, each drawn with
        :meth:`draw` in batch order. On CPU the trainer keeps the cores the worker does not use."""
        settings = self.config.async_
        k, gen = self.config.samples_per_prompt, self.config.generation

        def request(index: int) -> tuple[list[list[int]], list[Prompt]]:
            drawn = self.draw(prompts)
            return [p.ids for p in drawn for _ in range(k)], drawn

        if self.device.type == "cpu":
            torch.set_num_threads(max(1, torch.get_num_threads() - settings.threads))
        self.worker = RolloutWorker(self.policy, self.tokenizer, staleness=settings.max_staleness,
                                    iterations=self.config.iterations, seed=self.seed,
                                    settings={"max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature,
                                              "top_p": gen.top_p,
                                              **{k: v for k, v in self.config.generator.options.items()
                                                 if k in ("loop", "compile")}},
                                    threads=settings.threads, timeout=settings.timeout, device=self.device)
        restored = {}
        for item in queued or []:
            batch = Batch(item["index"], item["version"], item["prompt_ids"], item["response"], item["logprobs"])
            restored[batch.index] = (batch, [Prompt(**p) for p in item["prompts"]])
        self.worker.start(done, restored, request)

    def queued(self, it: int) -> list[dict[str, Any]]:
        """The batches sampled (or being sampled) for the iterations after ``it``, as plain values for
        a checkpoint: a resumed run consumes the very same batches, sampled with the same weights."""
        return [{"index": b.index, "version": b.version, "prompt_ids": b.prompt_ids, "response": b.response,
                 "logprobs": b.logprobs, "prompts": [dataclasses.asdict(p) for p in drawn]}
                for b, drawn in self.worker.pending(it).values()]

    def iteration(self, it: int, prompts: list[Prompt], history: dict[str, list[float]]) -> dict[str, float]:
        """One iteration: rollout -> Experience -> update -> stats (``history``: per-iteration KL and
        whether the rewards were tied, for the summary)."""
        config = self.config
        t0 = time.perf_counter()
        draw = lambda: self.draw(prompts)  # noqa: E731
        if self.worker is not None:
            samples = self.sample_ahead(it)
        elif config.dynamic_sampling is not None:
            samples = self.sample_informative(draw)
        else:
            samples = self.sample(draw())
        packing = PackingStats()
        with self.packed_forwards(packing):
            exp = self.score(samples)
        t1 = time.perf_counter()
        self.generator.sleep()  # an engine with its own memory gives it back while the trainer works
        with self.packed_forwards(packing):
            update = self.update(exp)
        if self.worker is not None:
            self.worker.publish(self.policy, it)  # the weights after `it` updates
        else:
            self.generator.update_weights(self.policy)
        t2 = time.perf_counter()
        metrics = dict(update.metrics)
        if config.data.packing:
            metrics["packing_efficiency"] = packing_efficiency(packing, self.device)
        metrics.update(self.stats(exp, update))
        self.kl.update(metrics["kl"], config.prompts_per_batch * config.samples_per_prompt)
        metrics.update(time_generate=exp.time_generate, time_score=t1 - t0 - exp.time_generate, time_train=t2 - t1)
        tied = metrics.get("reward_tied", 0.0)  # absent with reward: null
        if tied and not any(history["reward_tied"]) and is_main_process():
            print(f"{self.name}: warning: iteration {it}: " + tied_reason(config.samples_per_prompt)
                  + " (counted as reward_tied in the metrics and the summary; later ones are not printed)")
        history["kl"].append(metrics["kl"])
        history["reward_tied"].append(tied)
        return metrics

    def draw(self, prompts: list[Prompt]) -> list[Prompt]:
        """This rank's contiguous share of a fresh global prompt batch (a prompt's samples stay together);
        with an environment each drawn prompt gets an episode seed from the same sampler."""
        drawn = [self.rng.choice(prompts) for _ in range(self.config.prompts_per_batch)]
        if self.episodes is not None:
            drawn = [dataclasses.replace(p, seed=self.rng.getrandbits(31)) for p in drawn]
        return dist_utils.shard(drawn)

    # ------------------------------------------------------------------ 1. sample

    @torch.no_grad()
    def sample_ahead(self, it: int) -> Samples:
        """Iteration ``it``'s batch from the rollout worker (sampled ahead, with the weights after
        ``it - 1 - max_staleness`` updates), scored with the rewards like :meth:`sample`; logs
        ``staleness`` (updates between the sampling weights and the trainer's) and ``async_wait``
        (seconds the trainer waited for the batch)."""
        batch, drawn, waited = self.worker.take(it)
        samples = self.sample(drawn, batch.rollout(self.tokenizer, self.device))
        samples.time_generate = waited
        samples.stats.update(staleness=float(it - 1 - batch.version), async_wait=waited)
        return samples

    @torch.no_grad()
    def sample(self, prompts: list[Prompt], sampled: Rollout | None = None) -> Samples:
        """Sample ``samples_per_prompt`` responses per prompt (a prompt's samples in consecutive
        rows; ``sampled``: already sampled elsewhere) and score them with the rewards (zeros with
        ``reward: null``), which see each prompt's data record, plus the overlong shaping."""
        config, k, gen = self.config, self.config.samples_per_prompt, self.config.generation
        prompt_ids = [p.ids for p in prompts for _ in range(k)]
        group_ids = torch.arange(len(prompts), device=self.device).repeat_interleave(k)
        started = time.perf_counter()
        self.policy.eval()
        self.generator.wake()
        texts, rows = [p.text for p in prompts for _ in range(k)], [p.row for p in prompts for _ in range(k)]
        rewards, stats = torch.zeros(len(prompt_ids), device=self.device), {}  # reward: null
        if self.episodes is not None:  # multi-turn: the environment's rewards, the last reply for the rewards
            batch = self.episodes.run(rows, [p.seed for p in prompts for _ in range(k)])
            roll, rewards, texts, stats = batch.rollout, batch.rewards, batch.texts, batch.stats
        elif sampled is not None:
            roll = sampled
        else:
            roll = self.generator.generate(prompt_ids, max_new_tokens=gen.max_new_tokens,
                                           temperature=gen.temperature, top_p=gen.top_p)
        time_generate = time.perf_counter() - started
        parts = {}
        if self.rewards is not None:
            scores, parts = self.rewards.score(texts, roll.responses, rows)  # [B] each, checked
            scores, parts = scores.to(self.device), {name: v.to(self.device) for name, v in parts.items()}
            rewards = scores if self.episodes is None else rewards + scores
        truncated = (batch.truncated if self.episodes is not None
                     else truncated_responses(roll.labels, roll.mask, self.tokenizer.eos_token_id))
        overlong = torch.zeros_like(rewards)
        if config.overlong is not None:
            overlong = overlong_penalty(roll.mask.sum(1), gen.max_new_tokens, config.overlong.cache,
                                        config.overlong.penalty).to(self.device)
            rewards = rewards + overlong
        return Samples(roll, rewards, group_ids, truncated, overlong, time_generate, stats, reward_parts=parts)

    @torch.no_grad()
    def sample_informative(self, draw: Callable[[], list[Prompt]]) -> Samples:
        """DAPO's dynamic sampling: rounds of :meth:`sample` on prompt batches from ``draw()`` (this
        rank's share of a fresh global batch each round) until every rank holds as many groups whose
        rewards are not all equal as one draw has prompts, or ``dynamic_sampling.max_rounds`` rounds
        were run (then dropped groups fill the batch). Every rank runs the same number of rounds (its
        sharded forwards must meet), keeping the informative groups first found. Logs ``ds_rounds``,
        ``ds_dropped_groups`` (sampled and left out) and ``ds_filled_groups`` (tied groups used to
        fill the batch), summed over ranks."""
        k = self.config.samples_per_prompt
        pool: list[Samples] = []
        kept: list[list[int]] = []   # rows (of the concatenated rounds) of each kept group
        spare: list[list[int]] = []  # rows of each tied group
        offset, rounds, need = 0, 0, 0
        while True:
            prompts = draw()
            need = len(prompts)
            batch = self.sample(prompts)
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
            short = dist_utils.all_reduce_max(torch.tensor(float(len(kept) < need), device=self.device))
            if float(short) == 0 or rounds >= self.config.dynamic_sampling.max_rounds:
                break
        filled = need - len(kept)
        kept += spare[:filled]
        rows = torch.tensor([row for group in kept for row in group], dtype=torch.long)
        counts = dist_utils.all_reduce_sum(torch.tensor([len(spare) - filled, filled], dtype=torch.float64,
                                                        device=self.device))
        if float(counts[1]) > 0 and is_main_process():
            print(f"{self.name}: dynamic sampling found too few groups with different rewards in {rounds} rounds; "
                  f"{int(counts[1])} tied group(s) fill the batch (raise dynamic_sampling.max_rounds)")
        stats = {key: sum(b.stats[key] for b in pool) / len(pool) for key in pool[0].stats}  # episodes' means per round
        stats.update(ds_rounds=float(rounds), ds_dropped_groups=float(counts[0]), ds_filled_groups=float(counts[1]))
        index = rows.to(pool[0].rewards.device)

        def joined(name: str) -> torch.Tensor:
            return torch.cat([getattr(b, name) for b in pool])[index]

        parts = {name: torch.cat([b.reward_parts[name] for b in pool])[index] for name in pool[0].reward_parts}
        return Samples(concat_rollouts([b.rollout for b in pool], self.tokenizer.pad_token_id, rows), joined("rewards"),
                       torch.arange(need, device=self.device).repeat_interleave(k), joined("truncated"),
                       joined("overlong"), sum(b.time_generate for b in pool), stats, parts)

    # ------------------------------------------------------------------ 2. score

    @torch.no_grad()
    def score(self, samples: Samples) -> Experience:
        """Old, reference and teacher log-probs and critic values of the samples, the shaped rewards
        (KL to the reference, distillation), advantages, rollout corrections and the policy loss's
        mask (truncated responses, masked IS). On-policy (see :func:`on_policy`) the old log-probs
        are the update's own, so no scoring forward of the policy runs here (a TIS correction and the
        engine's log-prob gap are then applied and measured by the update, see :class:`PolicyLossStep`)."""
        config, backend = self.config, self.backend
        roll, rewards = samples.rollout, samples.rewards
        mask = roll.mask.float()
        from_update = on_policy(config)
        with autocast_context(config.optim.mixed_precision, mask.device):
            old_logp, entropy = ((None, None) if from_update
                                 else score_tokens(self.policy, roll, backend, with_entropy=True, fused=self.fused))
            ref_logp = self.reference_logprobs(roll)
            teacher_logp = self.teacher_logprobs(roll) if config.distill is not None else None
            values = critic_values(self.critic, roll) if self.critic is not None else None
        kl_tokens = (torch.zeros_like(mask) if from_update or ref_logp is None  # the KL is in the loss, or none
                     else KL_ESTIMATORS[config.kl.estimator](old_logp, ref_logp) * mask)  # [B, R]
        dense = distill_rewards(old_logp, teacher_logp, mask, config.distill.coef) if teacher_logp is not None else None
        seq_rewards, token_rewards = shape_rewards(rewards, kl_tokens, mask, self.kl.value, config.kl.placement, dense)
        advantages = self.estimator(AdvantageInputs(seq_rewards, token_rewards, mask, samples.group_ids, values,
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
            stats["distill_kl"] = masked_mean(((old_logp - teacher_logp) * mask).sum(1), torch.ones_like(rewards),
                                              global_=True)
        if roll.logprobs is not None and not from_update:  # the engine's probabilities vs the trainer's (a known gap)
            c = config.rollout_correction
            weight, keep, measured = engine_gap(old_logp, roll.logprobs, mask, c)
            stats.update(measured)
            if c is not None:
                advantages = advantages * weight
                if c.type in ("mask", "seq_mask"):
                    loss_mask = (loss_mask if loss_mask is not None else mask) * keep
        return Experience(roll, rewards, old_logp, ref_logp, entropy, kl_tokens, advantages, values, returns,
                          samples.time_generate, {k: float(v) for k, v in stats.items()}, loss_mask)

    def make_experience(self, prompts: list[Prompt]) -> Experience:
        """:meth:`sample` then :meth:`score`."""
        return self.score(self.sample(prompts))

    def reference_logprobs(self, roll) -> torch.Tensor | None:
        """Log-probs ``[B, R]`` of the response tokens under the reference: the frozen copy, or with
        LoRA the policy itself with its adapters switched off (exactly the starting weights); None
        without a reference (``kl.coef: 0``)."""
        if self.config.kl.coef == 0:
            return None
        if self.reference is not None:
            return score_tokens(self.reference, roll, self.backend, fused=self.fused)[0]
        with lora_scope(self.policy, None):
            return score_tokens(self.policy, roll, self.backend, fused=self.fused)[0]

    def teacher_logprobs(self, roll) -> torch.Tensor:
        """Log-probs ``[B, R]`` of the response tokens under the distillation teacher: its frozen
        copy, or (``teacher_is_base``) the LoRA policy with its adapters switched off."""
        if not self.teacher_is_base:
            return score_tokens(self.teacher, roll, self.backend, fused=self.fused)[0]
        with lora_scope(self.policy, None):
            return score_tokens(self.policy, roll, self.backend, fused=self.fused)[0]

    # ------------------------------------------------------------------ 3. update

    def update(self, exp: Experience) -> PolicyUpdate:
        """``ppo_epochs`` passes of minibatch updates of the policy (and critic) on one Experience.
        Each minibatch's normalisers (``loss_agg``'s, and the critic's token count) are summed over
        every rank before its micro-batches (``micro_batch_size`` rows, or runs of
        ``max_tokens_per_micro_batch`` tokens) run, and each micro-batch contributes its share, so
        the step does not depend on the number of processes or the micro-batch split."""
        config = self.config
        mask = exp.policy_mask()  # the tokens of the policy loss
        step = PolicyLossStep(self, exp)
        world = dist_utils.world_size()
        local_minibatch = max(1, config.minibatch_size // world)
        local_micro = max(1, (config.micro_batch_size or config.minibatch_size) // world)
        stats: dict[str, list[float]] = {}
        self.policy.train()
        tokens = exp.rollout.attention_mask.sum(1).tolist()  # real tokens per row, for token-budget micro-batches
        for _ in range(config.ppo_epochs):
            for idx in torch.randperm(len(mask), device=mask.device).split(local_minibatch):
                micros = (token_runs(idx, tokens, config.max_tokens_per_micro_batch)
                          if config.max_tokens_per_micro_batch is not None else idx.split(local_micro))
                normaliser = float(dist_utils.all_reduce_sum(
                    local_normaliser(config.loss_agg, mask[idx], config.generation.max_new_tokens)))
                self.policy_optim.zero_grad()
                window: dict[str, list[float]] = {}  # metric -> [sum of value * tokens, tokens]
                policy_loss = 0.0
                for micro in micros:
                    with autocast_context(config.optim.mixed_precision, mask.device):
                        loss, m = step(micro, normaliser)
                    self.policy_optim.check_loss(loss)
                    self.policy_optim.backward(loss * world)  # ranks' gradients are averaged: each share counts world times
                    policy_loss += float(loss.detach()) * world
                    n = float(mask[micro].sum())
                    for key, value in m.items():
                        window.setdefault(key, [0.0, 0.0])
                        window[key][0] += value * n
                        window[key][1] += n
                grad_norm = self.policy_optim.step()
                m = {k: total / max(count, 1e-9) for k, (total, count) in window.items()}
                m.update(policy_loss=policy_loss, grad_norm=float(grad_norm))
                if self.critic is not None:
                    m["value_loss"] = self.critic_step(exp, micros)
                for key, value in m.items():
                    stats.setdefault(key, []).append(float(value))
        metrics = dist_utils.global_mean({key: sum(v) / len(v) for key, v in stats.items()}, mask.device)
        if not step.on_policy:
            return PolicyUpdate(metrics)
        response = exp.rollout.mask.float()
        old = step.old[:, :-1] * response
        if exp.rollout.logprobs is not None:  # what score() measures off-policy, from the update's old log-probs
            _, _, measured = engine_gap(old, exp.rollout.logprobs, response, step.correction)
            metrics.update({name: float(v) for name, v in measured.items()})
            if step.correction is not None:
                exp.advantages = step.adv[:, :-1]  # as corrected (what score() returns off-policy)
        return PolicyUpdate(metrics, old, step.entropy * response)

    def critic_step(self, exp: Experience, micros: list[torch.Tensor]) -> float:
        """One optimizer step of the critic on a minibatch (``micros``: its micro-batches' rows): the
        clipped value loss, a token mean over every rank's minibatch tokens. Returns this rank's loss."""
        roll, mask, optim = exp.rollout, exp.rollout.mask.float(), self.critic_optim
        counts = [float(mask[micro].sum()) for micro in micros]
        weights = dist_utils.loss_weights(counts, mask.device)
        optim.zero_grad()
        total = 0.0
        for micro, n, weight in zip(micros, counts, weights):
            # A critic on the policy's base: its backward (a checkpointed recomputation) in its adapter's scope too.
            with getattr(self.critic, "scope", contextlib.nullcontext)(), \
                    autocast_context(self.config.critic_optim.mixed_precision, mask.device):
                v_new = response_values(self.critic, roll.sequences[micro], roll.attention_mask[micro], roll.prompt_len)
                v_loss = clipped_value_loss(v_new, exp.values[micro], exp.returns[micro], mask[micro],
                                            self.config.vf_clip)
                optim.check_loss(v_loss)
                optim.backward(v_loss * weight)
            total += float(v_loss.detach()) * n
        optim.step()
        return total / max(sum(counts), 1e-9)

    # ------------------------------------------------------------------ 4. stats

    def stats(self, exp: Experience, update: PolicyUpdate) -> dict[str, float]:
        """Batch statistics of one iteration over every rank's samples: reward mean and std, mean
        sequence KL to the reference (what the KL controller tracks), entropy, response length,
        advantage mean, and what sampling and scoring measured (``exp.stats``)."""
        mask = exp.rollout.mask.float()
        entropy, kl_tokens = exp.entropy, exp.kl_tokens
        if update.old_logprobs is not None:  # on-policy: measured by the update, before its step
            entropy = update.entropy
            kl_tokens = (KL_ESTIMATORS[self.config.kl.estimator](update.old_logprobs, exp.ref_logprobs) * mask
                         if exp.ref_logprobs is not None else torch.zeros_like(mask))
        rewards = exp.rewards.double()
        sums = dist_utils.all_reduce_sum(torch.stack([
            rewards.sum(), (rewards ** 2).sum(),
            torch.tensor(float(len(rewards)), dtype=torch.float64, device=rewards.device),
            kl_tokens.sum().double(), mask.sum().double(),
        ]))
        n = float(sums[2])
        mean = float(sums[0]) / n
        var = max(0.0, (float(sums[1]) - n * mean ** 2) / (n - 1)) if n > 1 else 0.0
        return {
            "reward_mean": mean, "reward_std": var ** 0.5, "kl": float(sums[3]) / n, "kl_coef": self.kl.value,
            "entropy": float(masked_mean(entropy, mask, global_=True)), "response_length": float(sums[4]) / n,
            "advantage_mean": float(masked_mean(exp.advantages, mask, global_=True)),
            **exp.stats,
        }

    # ------------------------------------------------------------------ evaluation, checkpoints

    def evaluate(self, held_out: list[Prompt]) -> dict[str, float]:
        """Mean reward (and gold score) of one fresh sample per held-out prompt, on the same random
        stream every time, so that policies are compared on equal terms (with an environment, one
        episode per prompt: see :meth:`evaluate_episodes`)."""
        if self.episodes is not None:
            return self.evaluate_episodes(held_out)
        gen = self.config.generation
        judges = {name: fn for name, fn in (("reward", self.rewards), ("gold", self.gold)) if fn is not None}
        return evaluate_samples(self.policy, self.tokenizer, [p.text for p in held_out], judges,
                                max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                                device=self.device, seed=self.seed, rows=[p.row for p in held_out])

    @torch.no_grad()
    def evaluate_episodes(self, held_out: list[Prompt]) -> dict[str, float]:
        """:meth:`evaluate` with an environment: one episode per held-out prompt (seeds fixed by the
        prompt's place, sampling on the evaluation's own random stream), each process its share.
        ``reward``: the environment's reward plus the rewards' score of the last reply; ``gold``:
        the gold judge's; and the episodes' turns, tokens, endings and ``env_*`` means."""
        seeds = [self.seed + i for i in range(len(held_out))]
        share = dist_utils.shard(list(zip(held_out, seeds)))
        real = 1.0 if share else 0.0
        share = share or [(held_out[0], seeds[0])]  # a process without prompts still steps with the others
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed + dist_utils.rank())
            self.policy.eval()
            self.generator.wake()
            batch = self.episodes.run([p.row for p, _ in share], [s for _, s in share])
        rows, responses = [p.row for p, _ in share], batch.rollout.responses
        reward = batch.rewards.double().cpu()
        if self.rewards is not None:
            reward = reward + self.rewards.score(batch.texts, responses, rows)[0].double().cpu()
        columns = {"reward": reward.tolist()}
        if self.gold is not None:
            columns["gold"] = self.gold.score(batch.texts, responses, rows)[0].double().tolist()
        columns.update(self.episodes.columns(batch.episodes))
        names = list(columns)
        sums = torch.tensor([real * sum(columns[n]) for n in names] + [real * len(share)], dtype=torch.float64,
                            device=self.device)
        sums = dist_utils.all_reduce_sum(sums)
        return {name: float(sums[i] / sums[-1]) for i, name in enumerate(names)}

    def checkpointed(self) -> tuple[dict[str, Any], dict[str, list[torch.optim.Optimizer]]]:
        """``(models, optimizers)`` by name, as :class:`rlhf_core.Checkpointer` saves them: a critic of
        its own beside the policy, a critic on the policy's base inside it."""
        trained, optims = {"policy": self.policy}, {"policy": [self.policy_optim.optimizer]}
        if isinstance(self.critic, torch.nn.Module):
            trained["critic"], optims["critic"] = self.critic, [self.critic_optim.optimizer]
        elif self.critic is not None:  # an adapter + head inside the policy's module
            optims["policy"].append(self.critic_optim.optimizer)
        return trained, optims

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs beyond weights and optimizers: the prompt sampler, the KL
        coefficient, the estimator's state and the optimizers' schedules."""
        estimator = self.estimator.estimator
        return {"prompt_rng": self.rng.getstate(), "kl_coef": self.kl.value,
                "estimator": estimator.state_dict() if hasattr(estimator, "state_dict") else None,
                "policy_optim": self.policy_optim.state_dict(),
                "critic_optim": self.critic_optim.state_dict() if self.critic_optim is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.rng.setstate(state["prompt_rng"])
        self.kl.value = state["kl_coef"]
        if hasattr(self.estimator.estimator, "load_state_dict"):
            self.estimator.estimator.load_state_dict(state["estimator"])
        if "policy_optim" in state:  # a checkpoint of the release before had constant learning rates only
            self.policy_optim.load_state_dict(state["policy_optim"])
            if self.critic_optim is not None:
                self.critic_optim.load_state_dict(state["critic_optim"])

    def packed_forwards(self, stats: PackingStats):
        """A ``padding_free`` block over every model PPO scores or trains with (``data.packing``; else
        nothing): the policy (and with it a critic or reward adapter on its base), the reference, a
        critic of its own and the teacher. Sampling stays outside: decoding is never packed."""
        if not self.config.data.packing:
            return contextlib.nullcontext()
        critic = self.critic if isinstance(self.critic, torch.nn.Module) else None
        return padding_free(self.policy, self.reference, critic, self.teacher, stats=stats)


class PolicyLossStep:
    """The policy loss of one micro-batch, for :meth:`PPORun.update`: the per-token tensors of an
    Experience widened to the ``[B, R + 1]`` columns of the policy's forward (the extra column is
    never a target), the registered loss, and what the config says about penalties and aggregation.

    ``step(rows, normaliser) -> (loss, metrics)``: the policy's log-probs of the sampled tokens come
    from the fused-linear kernels (``run.fused``) or the logits; the registered loss turns them into
    per-token terms that :func:`aggregate` sums with the minibatch's global ``normaliser``. Where
    the loss's registered fused form applies to these options, its one-sweep kernel gives the
    micro-batch's token mean instead, scaled to the same share. ``on_policy`` (the Experience has no
    old log-probs, see :func:`on_policy`): the pass's own detached log-probs are the old ones
    (``old``), and their entropy is kept for the logs (``entropy``); with engine log-probs and a
    ``tis``/``seq_tis`` rollout correction (``correction``), each micro-batch's advantages are
    weighted from them before its loss, as :meth:`PPORun.score` would have weighted them (each row
    is in exactly one micro-batch of the one epoch)."""

    def __init__(self, run: PPORun, exp: Experience):
        config, roll = run.config, exp.rollout
        self.run, self.exp, self.roll, self.config = run, exp, roll, config
        self.loss_fn, self.options = run.loss.obj, config.loss.options
        self.fast = run.loss.meta.get("fused")
        self.fast_options = (self.fast.options(run.loss.with_defaults(self.options), config.loss_agg)
                             if self.fast is not None else None)
        self.on_policy = exp.old_logprobs is None
        old = exp.old_logprobs if not self.on_policy else torch.zeros_like(roll.mask.float())
        self.entropy = torch.zeros_like(roll.mask.float()) if self.on_policy else None  # [B, R]
        self.labels, self.mask = append_column(roll.labels, -100), append_column(exp.policy_mask(), 0.0)
        # what the fused form's token mean runs over: the tokens of the loss
        self.loss_labels = self.labels.masked_fill(self.mask == 0, -100)
        self.old, self.adv = append_column(old, 0.0), append_column(exp.advantages, 0.0)
        self.ref = append_column(exp.ref_logprobs, 0.0) if exp.ref_logprobs is not None else None
        self.engine = append_column(roll.logprobs, 0.0) if roll.logprobs is not None else None
        self.correction = config.rollout_correction if self.on_policy and self.engine is not None else None
        self.penalties = dict(kl_estimator=config.kl.estimator, kl_in_loss=config.kl.placement == "loss" and
                              self.ref is not None, beta=run.kl.value, entropy_coef=config.entropy_coef)
        self.wants_entropy = "entropy" in run.loss.meta.get("needs", ()) or config.entropy_coef > 0

    def __call__(self, rows: torch.Tensor, normaliser: float) -> tuple[torch.Tensor, dict[str, float]]:
        share = float(self.mask[rows].sum()) / normaliser if normaliser > 0 else 0.0
        fast = self.fast_options is not None and share > 0  # its token mean needs a token in the loss
        ref = self.ref[rows] if self.ref is not None else None
        backend = self.run.backend
        args = (self.run.policy, self.roll.sequences[rows], self.roll.attention_mask[rows], self.roll.prompt_len)
        if self.run.fused:
            def objective(hidden, head):  # inside the policy's forward
                flat, labels = hidden.reshape(-1, hidden.shape[-1]), self.labels[rows].reshape(-1)
                shape = self.labels[rows].shape
                if self.on_policy and not fast and not self.wants_entropy:
                    # On-policy: one pass gives the log-probs (their detached values are the old ones)
                    # and the entropy to log, instead of a scoring pass before the loss's.
                    logp, entropy = rlhf_kernels.linear_token_logprobs(flat, head, labels, backend=backend,
                                                                       with_entropy=True, entropy_grad=False)
                    logp = logp.view(shape)
                    self.old[rows] = logp.detach()
                    self.entropy[rows] = entropy.detach().view(shape)[:, :-1]
                    self._correct(rows)
                    return self._aggregated(rows, logp, None, normaliser)
                self._old_from_this_pass(rows, hidden, head)
                if fast:
                    loss, m = self.fast.on_linear(flat, head, self.loss_labels[rows].reshape(-1), self.old[rows].reshape(-1),
                                                  self.adv[rows].reshape(-1), ref.reshape(-1) if ref is not None else None,
                                                  self.mask[rows].reshape(-1), **self.fast_options,
                                                  backend=backend, **self.penalties)
                    return loss * share, m
                logp = rlhf_kernels.linear_token_logprobs(flat, head, labels, backend=backend).view(shape)
                entropy = (rlhf_kernels.linear_token_entropy(flat, head, backend=backend).view(shape)
                           if self.wants_entropy else None)
                return self._aggregated(rows, logp, entropy, normaliser)

            return response_hidden(*args, objective)
        logits = response_logits(*args)
        self._old_from_this_pass(rows, logits, None)
        if fast:
            loss, m = self.fast.on_logits(logits, self.loss_labels[rows], self.old[rows], self.adv[rows], ref,
                                          self.mask[rows], **self.fast_options, backend=backend, **self.penalties)
            return loss * share, m
        logp = rlhf_kernels.token_logprobs(logits, self.labels[rows], backend=backend)
        entropy = rlhf_kernels.token_entropy(logits, backend=backend) if self.wants_entropy else None
        return self._aggregated(rows, logp, entropy, normaliser)

    def _old_from_this_pass(self, rows: torch.Tensor, out: torch.Tensor, head: torch.Tensor | None) -> None:
        """On-policy: the old log-probs (and the entropy to log) of ``rows`` from this forward, detached."""
        if self.on_policy:
            self.old[rows], entropy = token_scores(out.detach(), head.detach() if head is not None else None,
                                                   self.labels[rows], self.run.backend)
            self.entropy[rows] = entropy[:, :-1]
            self._correct(rows)

    def _correct(self, rows: torch.Tensor) -> None:
        """On-policy with a rollout correction: weight the advantages of ``rows`` by it, from this
        pass's old log-probs and the engine's (see :func:`rollout_correction`)."""
        if self.correction is not None:
            c, response = self.correction, self.roll.mask[rows].float()
            weight, _, _ = rollout_correction(self.old[rows][:, :-1] * response, self.engine[rows][:, :-1], response,
                                              c.type, cap=c.cap, low=c.low, high=c.high)
            self.adv[rows] = self.adv[rows] * append_column(weight, 0.0)

    def _aggregated(self, rows, logprobs, entropy, normaliser) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = PolicyLossInputs(logprobs, self.old[rows], self.adv[rows], self.mask[rows],
                                  self.ref[rows] if self.ref is not None else None,
                                  self.engine[rows] if self.engine is not None else None, entropy,
                                  self.config.generation.max_new_tokens)
        terms, metrics = policy_loss_terms(self.loss_fn, self.options, inputs, **self.penalties)
        return aggregate(terms, self.mask[rows], self.config.loss_agg, normaliser), metric_floats(metrics, self.mask[rows])


def metric_floats(metrics: dict[str, Any], mask: torch.Tensor) -> dict[str, float]:
    """A loss's metrics as floats: per-token tensors as their masked mean, scalars as they are."""
    return {k: float(masked_mean(v.detach().float(), mask)) if torch.is_tensor(v) and v.dim() > 0 else float(v)
            for k, v in metrics.items()}


def engine_gap(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor,
               correction: Any) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
    """The engine's sampling log-probs against the trainer's old ones over every rank's ``mask``:
    ``(weight, loss mask, stats)`` of the rollout ``correction`` (None, None without one), with
    ``engine_logprob_gap`` (mean absolute difference) and the correction's metrics as global means."""
    stats = {"engine_logprob_gap": masked_mean((old_logprobs - engine_logprobs).abs(), mask, global_=True)}
    if correction is None:
        return None, None, stats
    weight, keep, metrics = rollout_correction(old_logprobs, engine_logprobs, mask, correction.type, cap=correction.cap,
                                               low=correction.low, high=correction.high)
    stats.update({name: masked_mean(v, mask, global_=True) for name, v in metrics.items()})
    return weight, keep, stats


def on_policy(config: PPOConfig) -> bool:
    """One epoch over one minibatch with the KL in the loss (or none), no distillation (whose token
    rewards need them first) and no masking rollout correction (``mask``/``seq_mask`` change the
    loss's tokens, which its normaliser counts first): the policy being updated is the one the
    samples are scored against, so the old log-probs need no forward of their own (the update's are
    they; a ``tis``/``seq_tis`` correction weights each micro-batch's advantages from them)."""
    return (config.ppo_epochs == 1 and config.minibatch_size >= config.prompts_per_batch * config.samples_per_prompt
            and (config.kl.placement == "loss" or config.kl.coef == 0) and config.distill is None
            and (config.rollout_correction is None or config.rollout_correction.type in ("tis", "seq_tis")))


def token_runs(rows: torch.Tensor, tokens: list[int], budget: int) -> list[torch.Tensor]:
    """``rows`` cut into maximal consecutive runs whose ``tokens`` fit ``budget`` (a row over it alone)."""
    starts = budget_runs([tokens[row] for row in rows.tolist()], budget)
    return [rows[a:b] for a, b in zip(starts, starts[1:])]


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


def tied_reason(k: int) -> str:
    """What a tied batch means, for the warnings."""
    if k > 1:
        return (f"every prompt's {k} samples got the same reward, so group-relative advantages are 0 and the reward "
                "teaches nothing in this batch")
    return "every sample in the batch got the same reward, so the reward teaches nothing in this batch"


def packing_efficiency(stats: PackingStats, device: torch.device) -> float:
    """Real tokens over packed row capacity of this iteration's forwards, over every rank."""
    real, slots = dist_utils.all_reduce_sum(torch.tensor([stats.real, stats.slots], dtype=torch.float64,
                                                          device=device)).tolist()
    return real / slots if slots else 1.0


def episode_runner(ctx, config: PPOConfig, policy, tokenizer, generator: CheckedGenerator) -> EpisodeRunner:
    """The multi-turn episode runner of ``config.environment``: the environment built with its
    options and ``ctx``, the tools it names, the chat template (or the fallback) that renders the
    turns, and the bounds of an episode (prompt budget, ``data.max_length``, the model's context)."""
    spec = config.environment
    entry = ctx.registry.lookup("environment", spec)
    environment = CheckedEnvironment(entry, entry.obj(ctx, **spec.options))
    tools = (ToolBox([ctx.registry.lookup("tool", ComponentSpec(name)) for name in spec.tools], spec.tool_tags,
                     spec.tool_timeout) if spec.tools else None)
    use_template = bool(getattr(tokenizer, "chat_template", None)) and config.data.chat_template != "never"
    rendering = EpisodeRendering(tokenizer, use_template, tools.schemas if tools is not None else None,
                                 f"stage {ctx.name!r}: environment {spec.name!r}")
    context = getattr(getattr(dist_utils.unwrap(policy), "config", None), "max_position_embeddings", None)
    return EpisodeRunner(spec, environment, tools, rendering, tokenizer, generator, config.generation,
                         prompt_budget=config.prompt_budget(), max_length=config.data.max_length, context=context,
                         device=ctx.device)


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
