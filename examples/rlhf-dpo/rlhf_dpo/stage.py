"""Stage ``dpo``: Direct Preference Optimization (Rafailov et al. 2023), as a third-party plugin.

L = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]),
log pi(y|x) the summed log-probability of the response tokens, ``ref`` the frozen starting policy.
Everything it uses is rlhf's public stage API: config dataclasses, data loading and tokenising,
``ctx.load_policy``, ``Trainer``, ``save_causal_lm``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import rlhf_kernels
from rlhf_core import hookimpl
from rlhf_core.config import POSITIVE, DataConfig, TrainConfig, rule_problems
from rlhf_core.data import collate_scored, data_inputs, dataset_components, load_split, shift_labels, tokenize_scored
from rlhf_core.distributed import all_reduce_sum
from rlhf_core.interfaces import StageError, StageInput, StageResult
from rlhf_core.models import save_causal_lm
from rlhf_core.training import Trainer, make_loader, total_steps

KEYS = ("chosen", "rejected")


@dataclass
class DPOConfig:
    """Options of the ``dpo`` stage."""

    data: DataConfig = field(default_factory=DataConfig)
    """Pairwise records ``{prompt, chosen, rejected}``."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4))
    """The optimisation loop."""
    beta: float = 0.1
    """The KL strength: how far the policy may move from its reference."""
    init: str = "auto"
    """Policy and frozen reference: ``auto`` = the latest policy stage's output."""

    def problems(self) -> list[str]:
        return rule_problems(self, {"beta": POSITIVE})


def sequence_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, backend) -> torch.Tensor:
    """``log p(response | prompt)`` per row ``[B]``: response-token log-probs summed."""
    logits = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
    return rlhf_kernels.token_logprobs(logits, shift_labels(labels), backend=backend).sum(dim=1)


def dpo_loss(policy_w, policy_l, ref_w, ref_l, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss over ``[B]`` sequence log-probs; metrics: preference ``accuracy`` and ``margin``."""
    margin = beta * ((policy_w - ref_w) - (policy_l - ref_l))
    return -F.logsigmoid(margin).mean(), {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean())}


class DPOStage:
    """setup (policy, frozen reference, pairwise data) -> loop (Trainer) -> save."""

    config_class = DPOConfig
    produces = "policy"

    def components(self, config: DPOConfig):
        return dataset_components(config.data, "data")

    def inputs(self, config: DPOConfig, registry) -> list[StageInput]:
        return [*data_inputs(config.data, "pairwise"), StageInput("init", "model", config.init)]

    def run(self, ctx, config: DPOConfig) -> StageResult:
        tokenizer, policy = ctx.load_policy(config.init)
        reference = ctx.load_model(config.init, trainable=False)  # a frozen copy
        train_recs, eval_recs = load_split(config.data, "pairwise", ctx.registry, ctx.seed)
        dl = config.data
        train_items, stats = tokenize_scored(train_recs, tokenizer, dl.max_length, dl.max_prompt_length, KEYS)
        eval_items, _ = tokenize_scored(eval_recs, tokenizer, dl.max_length, dl.max_prompt_length, KEYS)
        if not train_items:
            raise StageError(f"stage {ctx.name!r}: no usable pairs ({stats.describe()})")
        collate = lambda b: collate_scored(b, tokenizer.pad_token_id, KEYS)  # noqa: E731
        backend = ctx.kernel_backend

        def logps(model, batch):
            return [sequence_logprobs(model, batch[f"{k}_ids"], batch[f"{k}_mask"], batch[f"{k}_labels"], backend)
                    for k in KEYS]

        def compute_loss(batch):
            with torch.no_grad():
                ref_w, ref_l = logps(reference, batch)
            policy_w, policy_l = logps(policy, batch)
            return dpo_loss(policy_w, policy_l, ref_w, ref_l, config.beta)

        def evaluate():
            sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # [pairs ranked right, pairs]
            for batch in make_loader(eval_items, config.train.batch_size, collate, 0, False):
                batch = {k: v.to(ctx.device) for k, v in batch.items()}
                (pw, pl), (rw, rl) = logps(policy, batch), logps(reference, batch)
                right = (((pw - rw) - (pl - rl)) > 0).double().sum()
                sums += batch["real"] * torch.stack([right, torch.tensor(float(len(pw)), dtype=torch.float64)])
            right, total = all_reduce_sum(sums).tolist()
            return {"accuracy": right / max(total, 1.0)}

        loader = make_loader(train_items, config.train.batch_size, collate, ctx.seed)
        steps = total_steps(config.train, len(train_items))
        trainer = Trainer(policy, config.train, ctx.device, ctx.tracker, desc=ctx.name)
        summary = trainer.fit(loader, compute_loss, evaluate if eval_items else None, steps,
                              checkpointer=ctx.checkpointer)
        summary.update(steps=float(steps), **stats.summary())
        model_dir = save_causal_lm(policy, tokenizer, ctx.stage_dir) if config.train.save else None
        return StageResult(model_dir, "policy", summary)


@hookimpl
def rlhf_register_stages(register):
    register("dpo", DPOStage)
