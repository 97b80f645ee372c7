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

import contextlib
import gc
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

import rlhf_kernels
from rlhf_core import (
    AT_LEAST_0, IGNORE_INDEX, ComponentSpec, DataConfig, GenerationConfig, Rendering, Stage, StageError, StageInput,
    StageResult, TrainConfig, Trainer, Uses, all_gather_objects, all_reduce_sum, budget_problems, build_rewards, evaluate_batches,
    evaluate_samples, fused_linear_problems, hookimpl, is_lora, is_main_process, lora_scope, make_loader,
    mismatched_pair, packing_problems, pad, padding_free, render_prompt, rule_problems, save_causal_lm, shift_labels,
    tokenize_scored, tokenize_unpaired, total_steps, train_plan, use_fused_linear, with_last_hidden,
)

from .losses import KTOInputs, PreferenceInputs, kto_reference_point

SIDES = ("chosen", "rejected")


@dataclass
class PreferenceConfig:
    """Options of the ``dpo`` stage (and, with its own data and loss, of ``kto``)."""

    data: DataConfig = field(default_factory=DataConfig)
    """Pairwise records: ``{prompt, chosen, rejected}`` (strings or messages), or ``{chosen, rejected}`` with an
    implicit prompt (see Data formats)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5))
    """The optimisation loop."""
    loss: ComponentSpec = field(default_factory=lambda: ComponentSpec("sigmoid"))
    """Preference loss (component, family ``preference``): ``sigmoid`` (DPO), ``ipo``, ``hinge``, ``robust``,
    ``simpo``, ``orpo`` or a plugin's; options such as ``beta`` beside its name."""
    init: str = "auto"
    """Policy (and reference): ``auto`` (the latest policy stage, else the base model), ``base``, ``@STAGE`` or a path."""
    reference: Literal["auto", "precomputed", "adapters_off"] = "auto"
    """Where the reference log-probs come from: ``precomputed`` (a frozen copy of ``init`` scores every example once
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


@dataclass
class KTOConfig(PreferenceConfig):
    """Options of the ``kto`` stage: those of ``dpo``, on unpaired data with the ``kto`` loss."""

    data: DataConfig = field(default_factory=DataConfig)
    """Unpaired records: ``{prompt, completion, label}`` with ``label`` true (desirable) or false (undesirable),
    strings or messages (see Data formats)."""
    loss: ComponentSpec = field(default_factory=lambda: ComponentSpec("kto"))
    """The KTO loss (component, family ``kto``) and its options ``beta``, ``desirable_weight``,
    ``undesirable_weight``."""


@dataclass(frozen=True)
class Variant:
    """What tells ``dpo`` and ``kto`` apart: the data kind, the loss family, the two sequences each
    example contributes to a ``[2B, T]`` batch, how examples are built, and the loss terms."""

    data_kind: str
    family: str
    sides: tuple[str, str]
    examples: Callable[..., tuple[list[dict], Any]]
    terms: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


class PreferenceStage(Stage):
    """setup (policy, reference log-probs, examples) -> loop (Trainer) -> save."""

    config_class: type = PreferenceConfig
    variant: Variant
    produces = "policy"

    def uses(self, config: PreferenceConfig) -> list[Uses]:
        """The preference loss and the gold judge."""
        return [Uses("loss", config.loss, "loss", (self.variant.family,)), Uses("reward", config.gold, "gold")]

    def record_kind(self, config: PreferenceConfig, registry) -> str:
        """Pairs (``dpo``) or unpaired completions (``kto``)."""
        return self.variant.data_kind

    def validate(self, config: PreferenceConfig, registry, run) -> list[str]:
        """``reference: adapters_off`` needs LoRA; ``fused_linear: true`` needs a plain LM head."""
        problems = [*fused_linear_problems(config.fused_linear, ""), *budget_problems(config.train, config.data, 2),
                    *(packing_problems() if config.data.packing else [])]
        if config.reference == "adapters_off" and run.model.lora is None:
            problems.append("reference: adapters_off is the policy with its LoRA adapters disabled, and model.lora is "
                            "not set; use precomputed (or auto)")
        return problems

    def inputs(self, config: PreferenceConfig, registry) -> list[StageInput]:
        """The starting weights."""
        return [StageInput("init", "model", config.init)]

    def plan(self, config: PreferenceConfig, registry, sizes: dict[str, int]) -> dict[str, Any]:
        """Examples, steps and the most tokens they read (``rlhf run --dry-run``)."""
        return train_plan(config.train, config.data, sizes, sequences_per_example=2)

    def run(self, ctx, config: PreferenceConfig) -> StageResult:
        """Train the policy on preference data; returns the saved policy directory."""
        variant, backend, data = self.variant, ctx.kernel_backend, config.data
        source = ctx.init_source(config.init, "policy")
        tokenizer = ctx.tokenizer_for(source)
        rendering = Rendering(data.chat_template, ctx.name, source)
        train_recs, eval_recs = self.load_data(ctx, config)
        train_items, stats = variant.examples(train_recs, tokenizer, data, rendering)
        eval_items, _ = variant.examples(eval_recs, tokenizer, data, rendering)
        if not train_items:
            raise StageError(f"stage {ctx.name!r}: no usable examples ({stats.describe()})")
        loss_entry = ctx.registry.lookup("loss", config.loss, variant.family)
        policy = ctx.load_model(config.init)
        fused = use_fused_linear(config.fused_linear, ctx.name, [policy])
        reference = reference_mode(config, loss_entry, policy)
        if is_main_process():
            print(f"{ctx.name}: {len(train_items)} examples ({stats.describe()}), {len(eval_items)} held out; loss "
                  f"{config.loss.name}; reference: {REFERENCE_TEXT[reference]}")
        if reference == "precomputed":
            frozen = ctx.load_model(config.init, trainable=False)
            with padding_free(frozen) if data.packing else contextlib.nullcontext():
                precompute_reference(frozen, [train_items, eval_items], tokenizer.pad_token_id, config.train.batch_size,
                                     backend, use_fused_linear(config.fused_linear, ctx.name, [frozen]), variant.sides)
            del frozen
            gc.collect()
        collate = lambda batch: collate_pairs(batch, tokenizer.pad_token_id, variant.sides)  # noqa: E731

        def loss_terms(batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            logps, tokens = pair_logprobs(policy, batch, backend, fused)
            ref = None
            if reference == "precomputed":
                ref = batch["ref_logps"]
            elif reference == "adapters_off":
                with torch.no_grad(), lora_scope(policy, None):
                    ref = pair_logprobs(policy, batch, backend, fused)[0]
            return variant.terms(loss_entry.obj, config.loss.options, batch, logps, tokens, ref)

        def compute_loss(batch):
            per_example, metrics = loss_terms(batch)
            return per_example.mean(), {k: float(v.float().nanmean()) if torch.is_tensor(v) else float(v)
                                        for k, v in metrics.items()}

        def per_example_sums(batch) -> dict[str, torch.Tensor]:
            # name -> [sum, count] of the per-example values (NaN = not counted)
            per_example, metrics = loss_terms(batch)
            return {name: torch.stack([value.double()[~torch.isnan(value)].sum(), (~torch.isnan(value)).sum().double()])
                    for name, value in {"loss": per_example, **metrics}.items() if torch.is_tensor(value) and value.dim() == 1}

        def evaluate() -> dict[str, float]:
            scored = evaluate_batches(eval_items, config.train.batch_size, collate, ctx.device, per_example_sums)
            # every rank reduces the same names, also one whose share of the held-out set is empty
            names = sorted({name for ranks in all_gather_objects([list(sums) for sums in scored])
                            for batch in ranks for name in batch})
            local = {name: sum((sums[name] for sums in scored if name in sums),
                               torch.zeros(2, dtype=torch.float64, device=ctx.device)) for name in names}
            return {name: float(s[0] / s[1].clamp(min=1)) for name, s in
                    ((name, all_reduce_sum(total)) for name, total in local.items())}

        gold = gold_evaluation(ctx, config, tokenizer, eval_recs, policy, rendering)
        first = gold() if gold else {}
        loader = make_loader(train_items, config.train.batch_size, collate, ctx.seed,
                             max_tokens=config.train.max_tokens_per_batch)
        steps = total_steps(config.train, loader)
        trainer = Trainer(policy, config.train, ctx.device, ctx.tracker, desc=ctx.name, packing=data.packing)
        summary = trainer.fit(loader, compute_loss, evaluate if eval_items else None, steps,
                              lambda batch: float(batch["is_real"]) * len(batch["ref_logps"]) / 2, ctx.checkpointer)
        summary.update(steps=float(steps), **stats.summary())
        if gold:
            last = gold()
            summary.update(eval_gold_start=first["gold"], eval_gold_end=last["gold"])
            ctx.tracker.log(steps, {"eval_gold": last["gold"]})
        model_dir = save_causal_lm(policy, tokenizer, ctx.stage_dir) if config.train.save else None
        return StageResult(model_dir, "policy", summary)


def pairwise_examples(records, tokenizer, data: DataConfig, rendering: Rendering) -> tuple[list[dict], Any]:
    """``dpo``'s examples: ``chosen_ids``/``chosen_labels`` and ``rejected_ids``/``rejected_labels``."""
    return tokenize_scored(records, tokenizer, data.max_length, data.max_prompt_length, SIDES, rendering)


def unpaired_examples(records, tokenizer, data: DataConfig, rendering: Rendering) -> tuple[list[dict], Any]:
    """``kto``'s examples: the completion (``completion_ids``/``completion_labels``), ``desirable``,
    and a mismatched pair (``mismatched_ids``/``mismatched_labels``): the example's prompt with the
    next example's completion (in data order, the last with the first; cut to the longer of the
    two), whose log-ratio estimates KTO's reference point z0. Fixed per example, so its reference
    log-probs can be precomputed like the completion's."""
    items, stats = tokenize_unpaired(records, tokenizer, data.max_length, data.max_prompt_length, rendering)
    out = []
    for i, item in enumerate(items):
        pair = mismatched_pair(item, items[(i + 1) % len(items)])
        out.append({"completion_ids": item["ids"], "completion_labels": item["labels"], "desirable": item["desirable"],
                    "mismatched_ids": pair["input_ids"], "mismatched_labels": pair["labels"]})
    return out, stats


def pairwise_terms(loss_fn, options: dict, batch, logps, tokens, ref) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``dpo``: the preference loss per pair and its metrics, plus each side's summed log-probs."""
    inputs = preference_inputs(logps, tokens, ref)
    per_pair, metrics = loss_fn(inputs, **options)
    return per_pair, {**metrics, "logps_chosen": inputs.chosen_logps.detach(),
                      "logps_rejected": inputs.rejected_logps.detach()}


def unpaired_terms(loss_fn, options: dict, batch, logps, tokens, ref) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``kto``: the loss per example with the reference point z0 from the batch's mismatched pairs
    (global over processes; per micro-batch, as in TRL), and the rewards of desirable and
    undesirable examples apart (NaN where an example is of the other kind: not counted)."""
    half = len(logps) // 2
    kept = half if float(batch["is_real"]) > 0 else 0  # a stand-in batch (a rank without a share) adds no pair
    z0 = kto_reference_point(logps[half:half + kept], ref[half:half + kept], all_reduce_sum)
    desirable = batch["desirable"]
    per_example, metrics = loss_fn(KTOInputs(logps[:half], ref[:half], desirable, z0), **options)
    rewards = metrics.pop("rewards")
    nan = torch.full_like(rewards, math.nan)
    return per_example, {**metrics, "kl": z0.expand(half), "rewards_desirable": torch.where(desirable, rewards, nan),
                         "rewards_undesirable": torch.where(desirable, nan, rewards),
                         "logps": logps[:half].detach()}


class DPOStage(PreferenceStage):
    """``dpo``: pairwise preference optimisation with a ``preference``-family loss."""

    config_class = PreferenceConfig
    variant = Variant("pairwise", "preference", SIDES, pairwise_examples, pairwise_terms)


class KTOStage(PreferenceStage):
    """``kto``: unpaired desirable / undesirable completions with the ``kto`` loss."""

    config_class = KTOConfig
    variant = Variant("unpaired", "kto", ("completion", "mismatched"), unpaired_examples, unpaired_terms)


REFERENCE_TEXT = {"precomputed": "log-probs of a frozen copy, computed once before training",
                  "adapters_off": "the policy with its LoRA adapters off (no copy)",
                  "none": "none (a reference-free loss)"}


def reference_mode(config: PreferenceConfig, loss_entry, policy) -> str:
    """``none`` for a reference-free loss, else ``precomputed`` or ``adapters_off`` (see
    :attr:`PreferenceConfig.reference`)."""
    if loss_entry.meta.get("reference_free"):
        return "none"
    if config.reference == "auto":
        return "adapters_off" if is_lora(policy) else "precomputed"
    return config.reference


def collate_pairs(items: list[dict], pad_id: int, sides: tuple[str, str] = SIDES) -> dict[str, torch.Tensor]:
    """One ``[2B, T]`` batch of two sequences per item (``<side>_ids`` / ``<side>_labels``): every
    item's first side, then every item's second (chosen then rejected; for KTO the completion then
    its mismatched pair), right padded (``input_ids``, ``attention_mask``, ``labels`` with -100 on
    prompt and padding); ``ref_logps [2B]`` (the precomputed reference log-probs, NaN until
    computed); ``desirable [B]`` when the items have it (KTO)."""
    seqs = [it[f"{side}_ids"] for side in sides for it in items]
    out = {
        "input_ids": pad(seqs, pad_id), "attention_mask": pad([[1] * len(s) for s in seqs], 0),
        "labels": pad([it[f"{side}_labels"] for side in sides for it in items], IGNORE_INDEX),
        "ref_logps": torch.tensor([it.get("ref_logps", (math.nan, math.nan))[j] for j in range(2) for it in items],
                                  dtype=torch.float32),
    }
    if "desirable" in items[0]:
        out["desirable"] = torch.tensor([it["desirable"] for it in items], dtype=torch.bool)
    return out


def pair_logprobs(model, batch: dict[str, torch.Tensor], backend: str | None,
                  fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps [2B], tokens [2B])``: each sequence's summed log-probability of its response tokens
    (float32) and how many there are, from one forward. With ``fused`` the log-probs come from the
    last hidden states and the LM head through ``linear_token_logprobs`` inside the model's own
    forward (:func:`rlhf_core.models.with_last_hidden`): no ``[2B, T, V]`` logits."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = shift_labels(batch["labels"])  # [2B, T]
    if fused:
        per_token = with_last_hidden(model, lambda hidden, weight: rlhf_kernels.linear_token_logprobs(
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
                         backend: str | None, fused: bool, sides: tuple[str, str] = SIDES) -> None:
    """Store ``ref_logps`` (the frozen ``reference``'s summed response log-probs of the item's two
    sequences, see :func:`collate_pairs`) in every item of ``item_lists``. Every process scores every
    item (a sharded reference needs the same forwards on each rank), once, before the first step."""
    reference.eval()
    device = next(reference.parameters()).device
    for items in item_lists:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id, sides).items()}
            logps = pair_logprobs(reference, batch, backend, fused)[0].cpu().tolist()
            for i, item in enumerate(chunk):
                item["ref_logps"] = (logps[i], logps[len(chunk) + i])


def gold_evaluation(ctx, config: PreferenceConfig, tokenizer, eval_recs, policy, rendering: Rendering):
    """``() -> {"gold": mean score}`` of fresh samples of the held-out prompts under ``gold`` (None
    without a gold judge or held-out pairs): the same function and seed as PPO's evaluation."""
    if config.gold is None or not eval_recs or config.eval_prompts == 0:
        return None
    judge = build_rewards(ctx, config.gold)
    recs = eval_recs[: config.eval_prompts]
    prompts, rows = [render_prompt(tokenizer, r.fields, rendering, r.source) for r in recs], [r.fields for r in recs]
    gen = config.generation

    def evaluate() -> dict[str, float]:
        out = evaluate_samples(policy, tokenizer, prompts, {"gold": judge}, max_new_tokens=gen.max_new_tokens,
                               temperature=gen.temperature, top_p=gen.top_p, device=ctx.device, seed=ctx.seed, rows=rows)
        policy.train()
        return out

    return evaluate


@hookimpl
def rlhf_register_stages(register):
    register("dpo", DPOStage)
    register("kto", KTOStage)
