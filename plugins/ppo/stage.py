"""Stage ``ppo``: step 3 of the three-step instruction-tuning recipe, RLHF with PPO, and its
successors (GRPO, RLOO, DAPO, Dr. GRPO, GSPO, CISPO, on-policy distillation) as options.

theta* = argmax_theta E_{(x, y) ~ pi_theta}[R_phi(x, y)], optimised with the clipped surrogate
min(r A, clip(r, 1-eps, 1+eps) A), r = pi_theta / pi_theta_old, A from a registered advantage
estimator (default ``batch_mean``: A = R - mean R). A KL penalty to the frozen reference (the
starting policy) keeps the policy from drifting onto the reward model's blind spots.

This file is the stage's declarations and checks (options in :mod:`.config`); the run itself, one
iteration top to bottom, is :class:`rlhf_plugins.ppo.run.PPORun`.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

from rlhf_core import (
    ComponentSpec, Rendering, Stage, StageInput, StageResult, Uses, fused_linear_problems, hookimpl, is_main_process, packing_problems,
    reward_specs, save_causal_lm,
)
from rlhf_core import distributed as dist_utils
from rlhf_core.packing import packing_line

from .config import PPOConfig
from .run import PPORun, tied_reason


class PPOStage(Stage):
    """setup (:meth:`PPORun.build`) -> loop (:meth:`PPORun.train`) -> save."""

    config_class = PPOConfig
    produces = "policy"
    records = "prompts"

    def uses(self, config: PPOConfig) -> list[Uses]:
        """Rewards, advantage estimator, policy loss, gold judge, rollout engine, and the environment
        and its tools."""
        env = config.environment
        tools = [Uses("tool", ComponentSpec(name), f"environment.tools[{i}]") for i, name in enumerate(env.tools)] if env else []
        return [*(Uses("reward", spec, path) for path, spec in reward_specs(config.reward)),
                Uses("advantage", config.advantage, "advantage"), Uses("loss", config.loss, "loss", ("policy",)),
                Uses("reward", config.gold, "gold"), Uses("generator", config.generator, "generator"),
                Uses("environment", env, "environment"), *tools]

    def run(self, ctx, config: PPOConfig) -> StageResult:
        """Run ``iterations`` PPO iterations; summary holds reward, KL and gold scores."""
        run = PPORun.build(ctx, config)
        train_recs, eval_recs = self.load_data(ctx, config)
        rendering = Rendering(config.data.chat_template, ctx.name, ctx.init_source(config.init, "policy"))
        prompts, cut = run.prompts(train_recs, rendering)
        held_out = run.prompts(eval_recs[: config.eval_prompts], rendering)[0]
        print(f"ppo data: {len(prompts)} prompts, {cut} cut to their last {config.prompt_budget()} tokens; "
              f"{len(held_out)} held out")
        if config.data.packing and is_main_process():
            print(f"{ctx.name}: {packing_line(run.policy)} (scoring and update forwards)")
        outcome = run.train(ctx, prompts, held_out)
        last, history = outcome.last, outcome.history
        summary = {k: last[k] for k in ("reward_mean", "kl", "kl_coef", "clip_frac", "response_length",
                                         "packing_efficiency") if k in last}
        summary["kl_max"] = max(history["kl"]) if history["kl"] else 0.0
        summary["reward_tied_iterations"] = float(sum(history["reward_tied"]))
        if history["reward_tied"] and all(history["reward_tied"]) and is_main_process():
            print(f"{ctx.name}: warning: in every one of the {len(history['reward_tied'])} iterations "
                  + tied_reason(config.samples_per_prompt) + "; the policy learned nothing from the reward (check the "
                  "reward and its data fields, or raise generation.temperature / samples_per_prompt)")
        summary.update(prompts=float(len(prompts)), prompts_truncated=float(cut))
        summary.update({f"eval_{k}_start": v for k, v in outcome.first.items()})
        summary.update({f"eval_{k}_end": v for k, v in outcome.final.items()})
        headline = {}
        if run.gold is not None and outcome.first and outcome.final:
            headline = {"gold_score_sft": outcome.first["gold"], "gold_score_ppo": outcome.final["gold"]}
        model_dir = save_causal_lm(run.policy, run.tokenizer, ctx.stage_dir) if config.save else None
        return StageResult(model_dir, "policy", summary, headline)

    # ------------------------------------------------------------------ checks before anything loads

    def validate(self, config: PPOConfig, registry, run) -> list[str]:
        """Cross-field problems found before any model loads (``key: message`` each)."""
        problems = packing_problems() if config.data.packing else []
        if config.shared_backbone is True:
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
        """The starting policy, what the rewards themselves read (a trained reward model, a judge
        model), the distillation teacher and (for estimators that need one) the critic."""
        out = [StageInput("init", "model", config.init)]
        for path, spec in reward_specs(config.reward) + reward_specs(config.gold, "gold"):
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
        turns = config.environment.max_turns if config.environment is not None else 1
        plan = {"iterations": config.iterations, "samples": samples, "optimizer steps": config.optimizer_steps(),
                "generated tokens (at most)": samples * config.generation.max_new_tokens * turns}
        if config.environment is not None:
            plan["episode turns (at most)"] = samples * turns
        return plan


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
    if "engine_logprobs" in needs and reports_no_logprobs(config, registry) and not lagged(config):
        problems.append(f"generator: policy loss {config.loss.name!r} needs the engine's sampling log-probs, which "
                        f"generator {config.generator.name!r} does not report (it samples from the trainer's "
                        "weights); use generator: vllm, or another loss")
    return problems


def lagged(config: PPOConfig) -> bool:
    """Rollouts overlap training (``async`` with ``max_staleness > 0``): the worker reports its
    behaviour log-probs whatever the generator."""
    return config.async_ is not None and config.async_.max_staleness > 0


def reports_no_logprobs(config: PPOConfig, registry) -> bool:
    """The configured generator declares that it reports no sampling log-probs (``hf``)."""
    return getattr(registry.lookup("generator", config.generator).obj, "reports_logprobs", None) is False


def sampling_problems(config: PPOConfig, registry) -> list[str]:
    """What the reward, dynamic sampling and rollout corrections need from the rest of the config."""
    problems = []
    if config.reward is None and config.distill is None and config.environment is None:
        problems.append("reward: null leaves nothing to learn from; name a reward, set distill: {teacher: ...} to "
                        "learn from a teacher's log-probs alone, or an environment that gives rewards")
    if config.environment is not None and config.overlong is not None:
        problems.append("overlong: shapes one response by its length against generation.max_new_tokens; a multi-turn "
                        "episode's length is bounded by environment.max_tokens and max_turns instead (cut episodes "
                        "are counted as episode_cut_*); remove overlong")
    if config.dynamic_sampling is not None and config.reward is None and config.environment is None:
        problems.append("dynamic_sampling: keeps groups whose rewards differ, and reward: null gives every sample 0; "
                        "remove dynamic_sampling or name a reward")
    if config.dynamic_sampling is not None and config.samples_per_prompt < 2:
        problems.append(f"dynamic_sampling: drops groups whose samples all got the same reward, which needs "
                        f"samples_per_prompt >= 2, got {config.samples_per_prompt}")
    lag = lagged(config)
    if lag:
        why = [reason for reason, broken in (
            ("multi-turn episodes (environment) are sampled by the trainer", config.environment is not None),
            ("dynamic_sampling draws a changing number of batches", config.dynamic_sampling is not None),
            ("its worker samples with the hf engine's decode loops", config.generator.name != "hf"),
        ) if broken]
        problems += [f"async: not with this config: {reason}" for reason in why]
        if config.rollout_correction is None:
            problems.append(f"async: samples from weights up to {config.async_.max_staleness} update(s) old need a "
                            "correction for the lag; add rollout_correction: {type: tis} (or seq_tis, mask, seq_mask)")
    if config.rollout_correction is not None and reports_no_logprobs(config, registry) and not lag:
        problems.append(f"rollout_correction: {config.rollout_correction.type} corrects for the gap between the "
                        f"engine's sampling log-probs and the trainer's, and generator {config.generator.name!r} "
                        "reports none (it samples from the trainer's own weights); remove it or use generator: vllm")
    return problems


@hookimpl
def rlhf_register_stages(register):
    register("ppo", PPOStage)
