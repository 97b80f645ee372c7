"""Stage ``sft`` and loss ``cross_entropy``: step 1 of the three-step instruction-tuning recipe.

theta* = argmin_theta 1/N sum_i L(f_theta(x_i), y_i), with L the token cross-entropy of the
reference response y_i given the prompt x_i (prompt tokens are masked out of the loss).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

import rlhf_kernels
from rlhf_core import (
    ComponentSpec, DataConfig, FusedTokenLoss, RegistryError, Rendering, Stage, StageError, StageInput, StageResult, TrainConfig,
    Trainer, Uses, all_reduce_sum, budget_problems, collate_sft, evaluate_batches, fused_linear_problems, hookimpl,
    make_loader, masked_mean, packing_problems, save_causal_lm, shift_labels, tokenize_sft, total_steps, train_plan,
    use_fused_linear, with_last_hidden,
)


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor, *, backend: str | None = None,
                       aggregation: Literal["token_mean", "sequence_mean"] = "token_mean") -> tuple[torch.Tensor, dict[str, float]]:
    """Token cross-entropy of ``labels [B, T]`` under ``logits [B, T, V]`` (labels already shifted:
    ``labels[:, t]`` is the token that ``logits[:, t]`` predicts).

    ``aggregation``: ``token_mean`` (default) averages over all response tokens of the batch, so
    long responses weigh more; ``sequence_mean`` averages each sequence's tokens first, then the
    sequences. Ignored labels (-100) contribute nothing. Metrics: ``tokens_per_batch`` (the response
    tokens of this batch; the stage summary reports its mean as ``train_tokens_per_batch``).
    """
    valid = labels != -100
    if aggregation == "token_mean":
        loss = rlhf_kernels.cross_entropy(logits, labels, reduction="mean", backend=backend)
    elif aggregation == "sequence_mean":
        nll = rlhf_kernels.cross_entropy(logits, labels, reduction="none", backend=backend)  # [B, T]
        loss = masked_mean(masked_mean(nll, valid, dim=1), valid.any(dim=1))
    else:
        raise ValueError(f"cross_entropy: unknown aggregation {aggregation!r}; accepted: token_mean, sequence_mean")
    return loss, {"tokens_per_batch": float(valid.sum())}


@dataclass
class SFTConfig:
    """Options of the ``sft`` stage."""

    data: DataConfig = field(default_factory=DataConfig)
    """Demonstrations: ``{prompt, response}`` (or ``completion``) records, strings or messages, or ``{messages}``."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3))
    """The optimisation loop."""
    loss: ComponentSpec = field(default_factory=lambda: ComponentSpec("cross_entropy"))
    """A ``token``-family loss (component): ``cross_entropy`` (option ``aggregation``: ``token_mean`` or
    ``sequence_mean``) or a plugin's."""
    init: str = "base"
    """Starting weights: ``base``, ``auto`` (the latest policy stage, else base), ``@STAGE`` or a path."""
    fused_linear: bool | Literal["auto"] = "auto"
    """Cross-entropy from the last hidden states and the LM head (``rlhf_kernels.linear_cross_entropy``), never
    materialising ``[B, T, V]`` logits; ``auto`` = with token-mean ``cross_entropy`` and a plain bias-free linear
    head, else off with a notice; ``true`` makes that an error."""


def cross_entropy_on_linear(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                            backend: str | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`cross_entropy_loss` with ``aggregation: token_mean`` from the last hidden states
    ``[N, H]`` and the LM head ``[V, H]`` (``rlhf_kernels.linear_cross_entropy``): no ``[N, V]`` logits."""
    loss = rlhf_kernels.linear_cross_entropy(hidden, weight, labels, backend=backend)
    return loss, {"tokens_per_batch": float((labels != -100).sum())}


#: The fused-linear form of ``cross_entropy``: the token mean only.
CROSS_ENTROPY_FUSED = FusedTokenLoss(options=lambda o: {} if o["aggregation"] == "token_mean" else None,
                                     on_linear=cross_entropy_on_linear)


def fused_form(entry, options: dict[str, Any]) -> tuple[FusedTokenLoss | None, dict | None, str]:
    """``(fused form, its keyword arguments, why not)`` of a registered token loss with these options:
    the form the loss registered (``fused=``) when it applies to them, else ``(None, None, reason)``."""
    fused = entry.meta.get("fused")
    kwargs = fused.options(entry.with_defaults(options)) if fused is not None else None
    if kwargs is None:
        shown = f" {options}" if options else ""
        return None, None, f"the loss {entry.name!r}{shown} has no fused-linear form for these options"
    return fused, kwargs, ""


def sft_loss_terms(model, batch, entry, options: dict, backend: str | None, fused_linear: bool,
                   targets_only: bool = False):
    """``(loss, metrics)`` of one batch under the registered token loss ``entry``: on the logits, or
    (``fused_linear``) its fused form on the last hidden states and the LM head, computed inside the
    model's forward so that a sharded head is gathered there (with ``targets_only``, over the
    positions that have a target only: a packed forward leaves zeros on padding, and the LM head
    need not see them)."""
    labels = shift_labels(batch["labels"])
    if fused_linear:
        fused, kwargs, _ = fused_form(entry, options)

        def fused_loss(hidden, weight):
            hidden, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
            if targets_only:
                keep = (targets != -100).nonzero().squeeze(1)
                hidden, targets = hidden.index_select(0, keep), targets.index_select(0, keep)
            return fused.on_linear(hidden, weight.to(hidden.dtype), targets, backend=backend, **kwargs)

        return with_last_hidden(model, fused_loss, batch["input_ids"], batch["attention_mask"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return entry.obj(logits, labels, backend=backend, **options)


class SFTStage(Stage):
    """Supervised fine-tuning: setup (data, model) -> loop (Trainer) -> save (save_pretrained)."""

    config_class = SFTConfig
    produces = "policy"
    records = "sft"

    def uses(self, config: SFTConfig) -> list[Uses]:
        """The token loss."""
        return [Uses("loss", config.loss, "loss", ("token",))]

    def validate(self, config: SFTConfig, registry, run) -> list[str]:
        """``fused_linear: true`` needs a loss with a fused form; a token budget holds an example."""
        try:
            blocker = fused_form(registry.lookup("loss", config.loss, "token"), config.loss.options)[2]
        except RegistryError:  # an unknown loss or one of another family: reported as the loss's own problem
            blocker = ""
        return [*fused_linear_problems(config.fused_linear, blocker), *budget_problems(config.train, config.data),
                *(packing_problems() if config.data.packing else [])]

    def inputs(self, config: SFTConfig, registry) -> list[StageInput]:
        """The starting weights."""
        return [StageInput("init", "model", config.init)]

    def plan(self, config: SFTConfig, registry, sizes: dict[str, int]) -> dict[str, Any]:
        """Examples, steps and the most tokens they read (``rlhf run --dry-run``)."""
        return train_plan(config.train, config.data, sizes)

    def run(self, ctx, config: SFTConfig) -> StageResult:
        """Train the policy on (prompt, response) pairs; returns the saved policy directory."""
        backend, data_cfg = ctx.kernel_backend, config.data
        source = ctx.init_source(config.init, "policy")
        tokenizer = ctx.tokenizer_for(source)
        train_recs, eval_recs = self.load_data(ctx, config)
        rendering = Rendering(data_cfg.chat_template, ctx.name, source)
        train_items, stats = tokenize_sft(train_recs, tokenizer, data_cfg.max_length, data_cfg.max_prompt_length,
                                          rendering)
        eval_items, _ = tokenize_sft(eval_recs, tokenizer, data_cfg.max_length, data_cfg.max_prompt_length, rendering)
        print(f"sft data: {stats.describe()}; {len(eval_items)} held out")
        if not train_items:
            raise StageError(f"stage {ctx.name!r}: no usable training examples ({stats.describe()})")
        model = ctx.load_model(config.init)
        loss_entry = ctx.registry.lookup("loss", config.loss, "token")
        options = config.loss.options
        per_sequence = loss_entry.with_defaults(options).get("aggregation") == "sequence_mean"
        fused = use_fused_linear(config.fused_linear, ctx.name, [model], fused_form(loss_entry, options)[2])
        collate = lambda b: collate_sft(b, tokenizer.pad_token_id)  # noqa: E731

        def compute_loss(batch):
            return sft_loss_terms(model, batch, loss_entry, options, backend, fused, data_cfg.packing)

        def count(batch):
            # What the loss averages over: response tokens (token_mean) or sequences that have one.
            valid = shift_labels(batch["labels"]) != -100
            return float(valid.any(dim=1).sum() if per_sequence else valid.sum())

        def weighted_loss(batch) -> tuple[torch.Tensor, float]:
            n = count(batch)
            return compute_loss(batch)[0].double() * n, n

        def evaluate():
            # The training loss (the configured one, fused when training is) over every held-out example.
            scored = evaluate_batches(eval_items, config.train.batch_size, collate, ctx.device, weighted_loss)
            sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # [loss * count, count]
            for weighted, n in scored:
                sums += torch.stack([weighted, torch.tensor(n, dtype=torch.float64, device=ctx.device)])
            total, n = all_reduce_sum(sums).tolist()
            return {"loss": total / max(n, 1.0)}

        loader = make_loader(train_items, config.train.batch_size, collate, ctx.seed,
                             max_tokens=config.train.max_tokens_per_batch)
        steps = total_steps(config.train, loader)
        trainer = Trainer(model, config.train, ctx.device, ctx.tracker, desc=f"{ctx.name}", packing=data_cfg.packing)
        summary = trainer.fit(loader, compute_loss, evaluate if eval_items else None, steps, count, ctx.checkpointer)
        summary.update(steps=float(steps), **stats.summary())
        model_dir = save_causal_lm(model, tokenizer, ctx.stage_dir) if config.train.save else None
        return StageResult(model_dir, "policy", summary)


@hookimpl
def rlhf_register_stages(register):
    register("sft", SFTStage)


@hookimpl
def rlhf_register_losses(register):
    register("cross_entropy", cross_entropy_loss, family="token", fused=CROSS_ENTROPY_FUSED)
