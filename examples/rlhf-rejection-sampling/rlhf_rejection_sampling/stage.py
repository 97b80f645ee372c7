"""Stage ``rejection_sampling``: rejection-sampling fine-tuning (best-of-K, as in Llama 2's RLHF and
RAFT, Dong et al. 2023), as a third-party plugin that rlhf does not ship.

Each round: sample ``samples_per_prompt`` responses per prompt from the current policy, score them
with a registered reward (any of rlhf's or a plugin's, reading the prompt records' fields), keep
the best response of each prompt (when it beats ``min_reward``), and fine-tune on the kept pairs
with token cross-entropy. The kept responses are trained on as the exact token ids the policy
sampled: never decoded and encoded again. Everything it uses is imported from ``rlhf_core`` (the
plugin API): the ``Stage`` base class, config dataclasses, ``generate``, rewards (``build_rewards``),
``Trainer``, ``save_causal_lm``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import rlhf_kernels
from rlhf_core import (
    AT_LEAST_1, IGNORE_INDEX, ComponentSpec, DataConfig, GenerationConfig, Stage, StageError, StageInput, StageResult,
    TrainConfig, Trainer, Uses, build_rewards, collate_sft, encode_prompt, evaluate_samples, generate, hookimpl,
    make_loader, render_prompt, rule_problems, save_causal_lm, shift_labels,
)


@dataclass
class RejectionSamplingConfig:
    """Options of the ``rejection_sampling`` stage."""

    data: DataConfig = field(default_factory=DataConfig)
    """Prompt records (with the fields the reward reads)."""
    reward: ComponentSpec = field(default_factory=lambda: ComponentSpec("reward_model"))
    """The registered reward that picks the best sample."""
    gold: ComponentSpec | None = None
    """A reward judging fresh samples of held-out prompts at the start and the end; null = none."""
    init: str = "auto"
    """The policy: ``auto`` = the latest policy stage's output."""
    rounds: int = 2
    """Sample-select-train rounds."""
    prompts_per_round: int = 128
    """Prompts sampled each round."""
    samples_per_prompt: int = 4
    """K: responses per prompt; the best one is kept."""
    min_reward: float = -math.inf
    """Keep a prompt's best response only when its reward is at least this."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=20, lr=1e-4))
    """The fine-tuning of each round (``steps`` per round)."""
    eval_prompts: int = 64
    """Held-out prompts for the ``gold`` evaluation."""

    def problems(self) -> list[str]:
        """Value checks."""
        return rule_problems(self, {"rounds": AT_LEAST_1, "prompts_per_round": AT_LEAST_1,
                                    "samples_per_prompt": AT_LEAST_1, "eval_prompts": AT_LEAST_1})


class RejectionSamplingStage(Stage):
    """setup (policy, reward, prompts) -> rounds of (sample K -> keep the best -> fine-tune) -> save."""

    config_class = RejectionSamplingConfig
    produces = "policy"
    records = "prompts"  # what config.data holds; the fields the rewards read are checked with it

    def uses(self, config: RejectionSamplingConfig) -> list[Uses]:
        return [Uses("reward", config.reward, "reward"), Uses("reward", config.gold, "gold")]

    def inputs(self, config: RejectionSamplingConfig, registry) -> list[StageInput]:
        return [StageInput("init", "model", config.init)]

    def run(self, ctx, config: RejectionSamplingConfig) -> StageResult:
        tokenizer, policy = ctx.load_policy(config.init)
        train_recs, eval_recs = self.load_data(ctx, config)
        reward = build_rewards(ctx, config.reward)
        gen = config.generation
        held = eval_recs[: config.eval_prompts]

        def gold() -> float:
            out = evaluate_samples(policy, tokenizer, [render_prompt(tokenizer, r.fields) for r in held],
                                   {"gold": build_rewards(ctx, config.gold)}, max_new_tokens=gen.max_new_tokens,
                                   temperature=gen.temperature, top_p=gen.top_p, device=ctx.device, seed=ctx.seed,
                                   rows=[r.fields for r in held])
            return out["gold"]

        first = gold() if config.gold and held else None
        rng = torch.Generator().manual_seed(ctx.seed)
        summary: dict[str, float] = {}
        for round_ in range(config.rounds):
            picks = torch.randint(len(train_recs), (config.prompts_per_round,), generator=rng).tolist()
            items, best = self.best_of_k(ctx, config, policy, tokenizer, reward, [train_recs[i] for i in picks])
            if not items:
                raise StageError(f"stage {ctx.name!r}: round {round_ + 1} of {config.rounds}: no response reached "
                                 f"min_reward {config.min_reward}; lower min_reward or raise samples_per_prompt")
            ctx.tracker.log(round_ * config.train.steps, {"kept": float(len(items)), "best_reward": best})

            def compute_loss(batch):
                logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = shift_labels(batch["labels"])
                return rlhf_kernels.cross_entropy(logits, labels, backend=ctx.kernel_backend), {}

            def count(batch):
                return float((shift_labels(batch["labels"]) != IGNORE_INDEX).sum())

            loader = make_loader(items, config.train.batch_size, lambda b: collate_sft(b, tokenizer.pad_token_id),
                                 ctx.seed + round_)
            trainer = Trainer(policy, config.train, ctx.device, ctx.tracker, desc=f"{ctx.name} round {round_ + 1}")
            summary = trainer.fit(loader, compute_loss, None, config.train.steps, count)
            summary.update(kept=float(len(items)), best_reward=best)
        if first is not None:
            summary.update(eval_gold_start=first, eval_gold_end=gold())
        model_dir = save_causal_lm(policy, tokenizer, ctx.stage_dir) if config.train.save else None
        return StageResult(model_dir, "policy", summary)

    @staticmethod
    @torch.no_grad()
    def best_of_k(ctx, config, policy, tokenizer, reward, records) -> tuple[list[dict], float]:
        """Fine-tuning items from the best of K samples per record, and their mean reward. An item
        is the prompt's ids followed by the sampled response ids exactly as generated."""
        k, gen = config.samples_per_prompt, config.generation
        prompt_ids = [encode_prompt(tokenizer, render_prompt(tokenizer, r.fields)) for r in records]
        policy.eval()
        roll = generate(policy, tokenizer, [p for p in prompt_ids for _ in range(k)], max_new_tokens=gen.max_new_tokens,
                        temperature=gen.temperature, top_p=gen.top_p, device=ctx.device)
        rows = [r.fields for r in records for _ in range(k)]
        prompts = [render_prompt(tokenizer, r) for r in rows]
        scores = reward.score(prompts, roll.responses, rows)[0].view(len(records), k)
        items, kept = [], []
        for i, row in enumerate(scores.argmax(1).tolist()):
            value = float(scores[i, row])
            if value < config.min_reward:
                continue
            response = roll.labels[i * k + row][roll.mask[i * k + row].bool()].tolist()  # the sampled ids, EOS included
            items.append({"input_ids": prompt_ids[i] + response, "labels": [IGNORE_INDEX] * len(prompt_ids[i]) + response})
            kept.append(value)
        policy.train()
        return items, sum(kept) / max(len(kept), 1)


@hookimpl
def rlhf_register_stages(register):
    register("rejection_sampling", RejectionSamplingStage)
