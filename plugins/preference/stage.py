"""Stage ``dpo``: offline preference optimisation on pairwise data (``{prompt, chosen, rejected}``)
with any loss of the ``preference`` family (``sigmoid`` = DPO, ``ipo``, ``hinge``, ``robust``,
``simpo``, ``orpo``, or a plugin's; see :mod:`rlhf_plugins.preference.losses`).

setup (policy, reference log-probs, pairs) -> loop (Trainer) -> save. Each step runs chosen and
rejected through **one** forward (``[2B, T]``, chosen rows first); the summed log-probs of each
response come from the last hidden states and the LM head through the fused-linear kernels, so
no ``[B, T, V]`` logits exist (``fused_linear``). The reference's log-probs are computed **once**,
before the first step, for the training and held-out pairs (the frozen copy is then freed, so no
second model stays in memory), or, with LoRA, they are the policy's own with its adapters off
(no copy at all); reference-free losses (``simpo``, ``orpo``) use none.
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

import rlhf_kernels
from rlhf_core import hookimpl
from rlhf_core.config import AT_LEAST_0, ComponentSpec, DataConfig, GenerationConfig, TrainConfig, rule_problems
from rlhf_core.data import (
    IGNORE_INDEX, data_inputs, dataset_components, load_split, pad, render_prompt, shift_labels, tokenize_scored,
)
from rlhf_core.distributed import all_reduce_sum
from rlhf_core.interfaces import CheckedReward, RewardSum, StageError, StageInput, StageResult, reward_fields
from rlhf_core.models import fused_linear_problems, is_lora, lora_scope, root_call, save_causal_lm, use_fused_linear
from rlhf_core.sampling import evaluate_samples
from rlhf_core.tracking import is_main_process
from rlhf_core.training import Trainer, make_loader, total_steps, train_plan

from .losses import PreferenceInputs

SIDES = ("chosen", "rejected")


@dataclass
class DPOConfig:
    """Options of the ``dpo`` stage."""

    data: DataConfig = field(default_factory=DataConfig)
    """Pairwise records ``{prompt, chosen, rejected}``."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5))
    """The optimisation loop."""
    loss: ComponentSpec = field(default_factory=lambda: ComponentSpec("sigmoid"))
    """Preference loss (component, family ``preference``): ``sigmoid`` (DPO), ``ipo``, ``hinge``, ``robust``,
    ``simpo``, ``orpo`` or a plugin's; options such as ``beta`` beside its name."""
    init: str = "auto"
    """Policy (and reference): ``auto`` (the latest policy stage, else the base model), ``base``, ``@STAGE`` or a path."""
    reference: Literal["auto", "precomputed", "adapters_off"] = "auto"
    """Where the reference log-probs come from: ``precomputed`` (a frozen copy of ``init`` scores every pair once
    before training, then is freed), ``adapters_off`` (with ``model.lora``: the policy with its adapters disabled,
    every step); ``auto`` = ``adapters_off`` with LoRA, else ``precomputed``. Unused by reference-free losses."""
    fused_linear: bool | Literal["auto"] = "auto"
    """Sequence log-probs from the last hidden state and the LM head without ``[B, T, V]`` logits; ``auto`` = where
    the head is a plain bias-free linear layer, else off with a notice; ``true`` makes that an error."""
    gold: ComponentSpec | None = None
    """A reward that judges fresh samples of held-out prompts at the start and the end (``eval_gold_start`` /
    ``eval_gold_end``), e.g. ``letters_gold``; null = none."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling for the ``gold`` evaluation."""
    eval_prompts: int = 64
    """Held-out prompts the ``gold`` evaluation samples from."""

    def problems(self) -> list[str]:
        """Value checks."""
        return rule_problems(self, {"eval_prompts": AT_LEAST_0})


class DPOStage:
    """setup (policy, reference log-probs, pairs) -> loop (Trainer) -> save."""

    config_class = DPOConfig
    produces = "policy"

    def components(self, config: DPOConfig):
        """The preference loss, the gold judge and builtin datasets to look up."""
        return [("loss", config.loss, "loss", ("preference",)), ("reward", config.gold, "gold", None),
                *dataset_components(config.data, "data")]

    def validate(self, config: DPOConfig, registry, run=None) -> list[str]:
        """``reference: adapters_off`` needs LoRA; ``fused_linear: true`` needs a plain LM head."""
        problems = fused_linear_problems(config.fused_linear, "")
        if config.reference == "adapters_off" and run is not None and run.model.lora is None:
            problems.append("reference: adapters_off is the policy with its LoRA adapters disabled, and model.lora is "
                            "not set; use precomputed (or auto)")
        return problems

    def inputs(self, config: DPOConfig, registry) -> list[StageInput]:
        """The pairwise records (with the fields the gold judge reads) and the starting weights."""
        return [*data_inputs(config.data, "pairwise", extra=gold_fields(config, registry)),
                StageInput("init", "model", config.init)]

    def plan(self, config: DPOConfig, registry, sizes: dict[str, int]) -> dict[str, Any]:
        """Pairs, steps and the most tokens they read (``rlhf run --dry-run``)."""
        return train_plan(config.train, config.data, sizes, sequences_per_example=2)

    def run(self, ctx, config: DPOConfig) -> StageResult:
        """Train the policy on preference pairs; returns the saved policy directory."""
        backend, data = ctx.kernel_backend, config.data
        source = ctx.init_source(config.init, "policy")
        tokenizer = ctx.tokenizer_for(source)
        train_recs, eval_recs = load_split(data, "pairwise", ctx.registry, ctx.seed, gold_fields(config, ctx.registry))
        train_items, stats = tokenize_scored(train_recs, tokenizer, data.max_length, data.max_prompt_length, SIDES)
        eval_items, _ = tokenize_scored(eval_recs, tokenizer, data.max_length, data.max_prompt_length, SIDES)
        if not train_items:
            raise StageError(f"stage {ctx.name!r}: no usable pairs ({stats.describe()})")
        loss_entry = ctx.registry.lookup("loss", config.loss, "preference")
        policy = ctx.load_model(config.init)
        fused = use_fused_linear(config.fused_linear, ctx.name, [policy])
        reference = reference_mode(config, loss_entry, policy)
        if is_main_process():
            print(f"{ctx.name}: {len(train_items)} pairs ({stats.describe()}), {len(eval_items)} held out; loss "
                  f"{config.loss.name}; reference: {REFERENCE_TEXT[reference]}")
        if reference == "precomputed":
            frozen = ctx.load_model(config.init, trainable=False)
            precompute_reference(frozen, [train_items, eval_items], tokenizer.pad_token_id, config.train.batch_size,
                                 backend, use_fused_linear(config.fused_linear, ctx.name, [frozen]))
            del frozen
            gc.collect()
        collate = lambda batch: collate_pairs(batch, tokenizer.pad_token_id)  # noqa: E731

        def loss_terms(batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            logps, tokens = pair_logprobs(policy, batch, backend, fused)
            ref = None
            if reference == "precomputed":
                ref = batch["ref_logps"]
            elif reference == "adapters_off":
                with torch.no_grad(), lora_scope(policy, None):
                    ref = pair_logprobs(policy, batch, backend, fused)[0]
            inputs = preference_inputs(logps, tokens, ref)
            per_pair, metrics = loss_entry.obj(inputs, **config.loss.options)
            return per_pair, {**metrics, "logps_chosen": inputs.chosen_logps.detach(),
                              "logps_rejected": inputs.rejected_logps.detach()}

        def compute_loss(batch):
            per_pair, metrics = loss_terms(batch)
            return per_pair.mean(), {k: float(v.float().mean()) if torch.is_tensor(v) else float(v)
                                     for k, v in metrics.items()}

        def evaluate() -> dict[str, float]:
            sums: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                for batch in make_loader(eval_items, config.train.batch_size, collate, 0, False):
                    batch = {k: v.to(ctx.device) for k, v in batch.items()}
                    per_pair, metrics = loss_terms(batch)
                    for name, value in {"loss": per_pair, **metrics}.items():
                        if torch.is_tensor(value) and value.dim() == 1:
                            total = batch["real"] * torch.stack([value.double().sum(), torch.tensor(
                                float(len(value)), dtype=torch.float64, device=value.device)])
                            sums[name] = sums.get(name, 0) + total
            return {name: float(s[0] / s[1].clamp(min=1)) for name, s in
                    ((name, all_reduce_sum(total)) for name, total in sorted(sums.items()))}

        gold = gold_evaluation(ctx, config, tokenizer, eval_recs, policy)
        first = gold() if gold else {}
        loader = make_loader(train_items, config.train.batch_size, collate, ctx.seed)
        steps = total_steps(config.train, len(train_items))
        trainer = Trainer(policy, config.train, ctx.device, ctx.tracker, desc=ctx.name)
        summary = trainer.fit(loader, compute_loss, evaluate if eval_items else None, steps,
                              lambda batch: float(batch["real"]) * len(batch["ref_logps"]) / 2, ctx.checkpointer)
        summary.update(steps=float(steps), **stats.summary())
        if gold:
            last = gold()
            summary.update(eval_gold_start=first["gold"], eval_gold_end=last["gold"])
            ctx.tracker.log(steps, {"eval_gold": last["gold"]})
        model_dir = save_causal_lm(policy, tokenizer, ctx.stage_dir) if config.train.save else None
        return StageResult(model_dir, "policy", summary)


REFERENCE_TEXT = {"precomputed": "log-probs of a frozen copy, computed once before training",
                  "adapters_off": "the policy with its LoRA adapters off (no copy)",
                  "none": "none (a reference-free loss)"}


def reference_mode(config: DPOConfig, loss_entry, policy) -> str:
    """``none`` for a reference-free loss, else ``precomputed`` or ``adapters_off`` (see
    :attr:`DPOConfig.reference`)."""
    if loss_entry.meta.get("reference_free"):
        return "none"
    if config.reference == "auto":
        return "adapters_off" if is_lora(policy) else "precomputed"
    return config.reference


def collate_pairs(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One ``[2B, T]`` batch of the pairs' sequences, chosen rows first then rejected, right padded
    (``input_ids``, ``attention_mask``, ``labels`` with -100 on prompt and padding), and
    ``ref_logps [2B]`` (the precomputed reference log-probs, NaN until computed)."""
    seqs = [it[f"{side}_ids"] for side in SIDES for it in items]
    return {
        "input_ids": pad(seqs, pad_id), "attention_mask": pad([[1] * len(s) for s in seqs], 0),
        "labels": pad([it[f"{side}_labels"] for side in SIDES for it in items], IGNORE_INDEX),
        "ref_logps": torch.tensor([it.get(f"ref_{side}", math.nan) for side in SIDES for it in items],
                                  dtype=torch.float32),
    }


def pair_logprobs(model, batch: dict[str, torch.Tensor], backend: str | None,
                  fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps [2B], tokens [2B])``: each sequence's summed log-probability of its response tokens
    (float32) and how many there are, from one forward. With ``fused`` the log-probs come from the
    last hidden states and the LM head through ``linear_token_logprobs`` inside the model's own
    forward (:func:`rlhf_core.models.root_call`): no ``[2B, T, V]`` logits."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = shift_labels(batch["labels"])  # [2B, T]
    if fused:
        per_token = root_call(model, lambda hidden, weight: rlhf_kernels.linear_token_logprobs(
            hidden.reshape(-1, hidden.shape[-1]), weight.to(hidden.dtype), targets.reshape(-1),
            backend=backend).view(targets.shape), ids, mask)
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits  # [2B, T, V]
        per_token = rlhf_kernels.token_logprobs(logits, targets, backend=backend)
    valid = targets != IGNORE_INDEX
    return (per_token.float() * valid).sum(1), valid.sum(1)


def preference_inputs(logps: torch.Tensor, tokens: torch.Tensor, ref: torch.Tensor | None) -> PreferenceInputs:
    """Split ``[2B]`` (chosen rows first) into a :class:`PreferenceInputs` of ``[B]`` each."""
    half = len(logps) // 2
    return PreferenceInputs(logps[:half], logps[half:], ref[:half] if ref is not None else None,
                            ref[half:] if ref is not None else None, tokens[:half], tokens[half:])


@torch.no_grad()
def precompute_reference(reference, item_lists: list[list[dict]], pad_id: int, batch_size: int,
                         backend: str | None, fused: bool) -> None:
    """Store ``ref_chosen`` / ``ref_rejected`` (the frozen ``reference``'s summed response log-probs)
    in every item of ``item_lists``. Every process scores every pair (a sharded reference needs the
    same forwards on each rank), once, before the first step."""
    reference.eval()
    device = next(reference.parameters()).device
    for items in item_lists:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
            logps = pair_logprobs(reference, batch, backend, fused)[0].cpu().tolist()
            for i, item in enumerate(chunk):
                item["ref_chosen"], item["ref_rejected"] = logps[i], logps[len(chunk) + i]


def gold_fields(config: DPOConfig, registry) -> dict[str, str]:
    """The data fields the gold judge reads (``{field: "gold 'math'"}``)."""
    if config.gold is None:
        return {}
    return {name: f"gold {config.gold.name!r}" for name in reward_fields(registry.lookup("reward", config.gold),
                                                                        config.gold.options)}


def gold_evaluation(ctx, config: DPOConfig, tokenizer, eval_recs, policy):
    """``() -> {"gold": mean score}`` of fresh samples of the held-out prompts under ``gold`` (None
    without a gold judge or held-out pairs): the same function and seed as PPO's evaluation."""
    if config.gold is None or not eval_recs or config.eval_prompts == 0:
        return None
    judge = RewardSum([(config.gold.name, 1.0, CheckedReward(ctx.registry.lookup("reward", config.gold), ctx,
                                                              config.gold.options))])
    recs = eval_recs[: config.eval_prompts]
    prompts, rows = [render_prompt(tokenizer, r.fields) for r in recs], [r.fields for r in recs]
    g = config.generation

    def evaluate() -> dict[str, float]:
        out = evaluate_samples(policy, tokenizer, prompts, {"gold": judge}, max_new_tokens=g.max_new_tokens,
                               temperature=g.temperature, top_p=g.top_p, device=ctx.device, seed=ctx.seed, rows=rows)
        policy.train()
        return out

    return evaluate


@hookimpl
def rlhf_register_stages(register):
    register("dpo", DPOStage)
