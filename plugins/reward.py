"""Stage ``reward`` and losses ``mse``, ``huber``, ``bradley_terry``: step 2 of the three-step
instruction-tuning recipe.

phi* = argmin_phi 1/N sum_i L_reward(R_phi(x_i, y_i), s_i): the reward model's score is regressed
on the human score s_i. R_phi is a transformer backbone with a scalar head read at the last
non-pad token (:class:`rlhf_core.ScalarHeadModel`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from rlhf_core import (
    ComponentSpec, DataConfig, Rendering, Stage, StageError, StageInput, StageResult, TrainConfig, Trainer, Uses,
    all_gather_objects, budget_problems, collate_scored, evaluate_batches, hookimpl, is_reward_model_dir,
    load_scalar_model, make_loader, packing_problems, tokenize_scored, total_steps, train_plan,
)
from rlhf_core.distributed import unwrap


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean squared error ``mean_i (R_i - s_i)^2`` over ``pred [B]``, ``target [B]``."""
    return F.mse_loss(pred.float(), target.float()), {}


def huber_loss(pred: torch.Tensor, target: torch.Tensor, *, delta: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Huber loss: ``0.5 e^2`` for ``|e| <= delta``, else ``delta (|e| - 0.5 delta)``, mean over B.
    Robust to a few wildly mis-scored examples."""
    return F.huber_loss(pred.float(), target.float(), delta=delta), {}


def _check_huber(*, delta: float) -> None:
    if not delta > 0:
        raise ValueError(f"huber: delta must be > 0, got {delta}")


huber_loss.check_options = _check_huber


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, margin: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Pairwise Bradley-Terry: ``-log sigmoid(R(x, y_chosen) - R(x, y_rejected) - margin)``, mean over B.
    Metric ``accuracy``: share of pairs ranked correctly."""
    diff = chosen.float() - rejected.float()
    return -F.logsigmoid(diff - margin).mean(), {"accuracy": float((diff > 0).float().mean())}


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors (0 when either is constant)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.norm() * y.norm()).item()
    return float((x * y).sum().item() / denom) if denom > 0 else 0.0


@dataclass
class RewardConfig:
    """Options of the ``reward`` stage."""

    data: DataConfig = field(default_factory=DataConfig)
    """Scored records ``{prompt, response, score}`` (or ``completion``, or ``messages``), or pairwise ``{prompt, chosen,
    rejected}`` (or ``{chosen, rejected}`` holding the prompt) for a ``pairwise`` loss; strings or messages."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-4))
    """The optimisation loop."""
    loss: ComponentSpec = field(default_factory=lambda: ComponentSpec("mse"))
    """A ``score`` loss (``mse``, ``huber`` with ``delta``) or a ``pairwise`` one (``bradley_terry`` with ``margin``)."""
    init: str = "auto"
    """Backbone weights: ``auto`` (the latest policy stage, else base), ``base``, ``@STAGE`` or a path."""


class RewardStage(Stage):
    """Reward-model training: setup (data, backbone + head) -> loop -> save (backbone + head)."""

    config_class = RewardConfig
    produces = "reward"

    def uses(self, config: RewardConfig) -> list[Uses]:
        """The score or pairwise loss."""
        return [Uses("loss", config.loss, "loss", ("score", "pairwise"))]

    def record_kind(self, config: RewardConfig, registry) -> str:
        """Scored records, or pairs for a pairwise loss."""
        return "pairwise" if is_pairwise(config, registry) else "reward"

    def validate(self, config: RewardConfig, registry, run) -> list[str]:
        """A token budget holds an example (two sequences for a pairwise loss); packing is available."""
        return [*budget_problems(config.train, config.data, 2 if is_pairwise(config, registry) else 1),
                *(packing_problems() if config.data.packing else [])]

    def inputs(self, config: RewardConfig, registry) -> list[StageInput]:
        """The backbone's weights."""
        return [StageInput("init", "model", config.init)]

    def plan(self, config: RewardConfig, registry, sizes: dict[str, int]) -> dict[str, Any]:
        """Examples, steps and the most tokens they read (``rlhf run --dry-run``; a pair is two sequences)."""
        return train_plan(config.train, config.data, sizes, sequences_per_example=2 if is_pairwise(config, registry) else 1)

    def run(self, ctx, config: RewardConfig) -> StageResult:
        """Train R_phi; report held-out MSE and correlation (or pairwise accuracy)."""
        loss_entry = ctx.registry.lookup("loss", config.loss, ("score", "pairwise"))
        pairwise = is_pairwise(config, ctx.registry)
        keys = ("chosen", "rejected") if pairwise else ("response",)
        source = ctx.init_source(config.init, "policy")
        tokenizer = ctx.tokenizer_for(source)
        train_recs, eval_recs = self.load_data(ctx, config)
        data_cfg = config.data
        rendering = Rendering(data_cfg.chat_template, ctx.name, source)
        train_items, stats = tokenize_scored(train_recs, tokenizer, data_cfg.max_length, data_cfg.max_prompt_length,
                                             keys, rendering)
        eval_items, _ = tokenize_scored(eval_recs, tokenizer, data_cfg.max_length, data_cfg.max_prompt_length, keys,
                                        rendering)
        print(f"reward data: {stats.describe()}; {len(eval_items)} held out")
        if not train_items:
            raise StageError(f"stage {ctx.name!r}: no usable training examples ({stats.describe()})")
        fresh_head = not is_reward_model_dir(source)
        model = load_scalar_model(ctx.run_config.model, source, seed=ctx.seed)
        if fresh_head and not pairwise:  # start at the mean score so the head learns deviations, not the offset
            with torch.no_grad():
                model.head.bias.fill_(sum(it["score"] for it in train_items) / len(train_items))
        model = ctx.wrap(ctx.adapt(model, source).to(ctx.device))
        collate = lambda b: collate_scored(b, tokenizer.pad_token_id, keys)  # noqa: E731

        def scores(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
            """R_phi of the batch's responses (pairwise: chosen and rejected in one forward)."""
            if not pairwise:
                return model(batch["response_ids"], batch["response_mask"], score=True), None
            width = max(batch["chosen_ids"].shape[1], batch["rejected_ids"].shape[1])
            ids = torch.cat([F.pad(batch[f"{k}_ids"], (0, width - batch[f"{k}_ids"].shape[1]), value=tokenizer.pad_token_id)
                             for k in keys])
            mask = torch.cat([F.pad(batch[f"{k}_mask"], (0, width - batch[f"{k}_mask"].shape[1])) for k in keys])
            both = model(ids, mask, score=True)
            return both[: len(both) // 2], both[len(both) // 2:]

        def compute_loss(batch):
            first, second = scores(batch)
            if pairwise:
                return loss_entry.obj(first, second, **config.loss.options)
            return loss_entry.obj(first, batch["score"], **config.loss.options)

        def evaluate():
            def predicted(batch) -> tuple[torch.Tensor, torch.Tensor]:
                first, second = scores(batch)
                return first.float().cpu(), (second.float().cpu() if pairwise else batch["score"].cpu())

            gathered = all_gather_objects(evaluate_batches(eval_items, config.train.batch_size, collate, ctx.device,
                                                           predicted))
            p = torch.cat([pred for scored in gathered for pred, _ in scored])
            t = torch.cat([target for scored in gathered for _, target in scored])
            if pairwise:
                return {"accuracy": float((p > t).float().mean())}
            return {"mse": float(F.mse_loss(p, t)), "corr": pearson(p, t)}

        loader = make_loader(train_items, config.train.batch_size, collate, ctx.seed,
                             max_tokens=config.train.max_tokens_per_batch)
        steps = total_steps(config.train, loader)
        trainer = Trainer(model, config.train, ctx.device, ctx.tracker, desc=f"{ctx.name}", packing=data_cfg.packing)
        summary = trainer.fit(loader, compute_loss, evaluate if eval_items else None, steps, checkpointer=ctx.checkpointer)
        summary.update(steps=float(steps), **stats.summary())
        model_dir = unwrap(model).save_pretrained(ctx.stage_dir, tokenizer) if config.train.save else None
        return StageResult(model_dir, "reward", summary)


def is_pairwise(config: RewardConfig, registry) -> bool:
    """The configured loss compares chosen with rejected (family ``pairwise``): the data is pairs."""
    return registry.lookup("loss", config.loss, ("score", "pairwise")).meta["family"] == "pairwise"


@hookimpl
def rlhf_register_stages(register):
    register("reward", RewardStage)


@hookimpl
def rlhf_register_losses(register):
    register("mse", mse_loss, family="score")
    register("huber", huber_loss, family="score")
    register("bradley_terry", bradley_terry_loss, family="pairwise")
