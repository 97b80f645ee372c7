"""Stage ``sft`` and loss ``cross_entropy``: the seed's step 1.

theta* = argmin_theta 1/N sum_i L(f_theta(x_i), y_i), with L the token cross-entropy of the
reference response y_i given the prompt x_i (prompt tokens are masked out of the loss).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

import rlhf_kernels
from rlhf_core import hookimpl
from rlhf_core.config import ComponentSpec, DataConfig, TrainConfig
from rlhf_core.distributed import all_reduce_sum, masked_mean
from rlhf_core.data import Rendering, collate_sft, data_inputs, dataset_components, load_split, shift_labels, tokenize_sft
from rlhf_core.interfaces import StageError, StageInput, StageResult
from rlhf_core.models import fused_linear_problems, root_call, save_causal_lm, use_fused_linear
from rlhf_core.packing import packing_problems
from rlhf_core.training import Trainer, budget_problems, make_loader, total_steps, train_plan


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


def fused_blocker(config: SFTConfig) -> str:
    """Why the configured loss cannot take the fused path ("" when it can)."""
    if config.loss.name != "cross_entropy" or config.loss.options.get("aggregation", "token_mean") != "token_mean":
        options = f" {config.loss.options}" if config.loss.options else ""
        return f"computes token-mean cross_entropy only; the loss is {config.loss.name!r}{options}"
    return ""


def sft_loss_terms(model, batch, loss_fn, options: dict, backend: str | None, fused_linear: bool,
                   targets_only: bool = False):
    """``(loss, metrics)`` of one batch: logits path through the registered loss, or the fused path
    (with ``targets_only``, over the positions that have a target only: a packed forward leaves
    zeros on padding, and the LM head need not see them)."""
    labels = shift_labels(batch["labels"])
    if fused_linear:  # inside the model's forward: a sharded LM head is gathered there (root_call)
        def fused_loss(hidden, weight):
            hidden, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
            if targets_only:
                keep = (targets != -100).nonzero().squeeze(1)
                hidden, targets = hidden.index_select(0, keep), targets.index_select(0, keep)
            return rlhf_kernels.linear_cross_entropy(hidden, weight.to(hidden.dtype), targets, backend=backend)

        loss = root_call(model, fused_loss, batch["input_ids"], batch["attention_mask"])
        return loss, {"tokens_per_batch": float((labels != -100).sum())}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return loss_fn(logits, labels, backend=backend, **options)


class SFTStage:
    """Supervised fine-tuning: setup (data, model) -> loop (Trainer) -> save (save_pretrained)."""

    config_class = SFTConfig
    produces = "policy"

    def components(self, config: SFTConfig):
        """The loss and builtin datasets this stage will look up."""
        return [("loss", config.loss, "loss", ("token",)), *dataset_components(config.data, "data")]

    def validate(self, config: SFTConfig, registry) -> list[str]:
        """``fused_linear: true`` computes plain token-mean cross-entropy only; a token budget holds an example."""
        return [*fused_linear_problems(config.fused_linear, fused_blocker(config)),
                *budget_problems(config.train, config.data), *(packing_problems() if config.data.packing else [])]

    def inputs(self, config: SFTConfig, registry) -> list[StageInput]:
        """The sft records and the starting weights."""
        return [*data_inputs(config.data, "sft"), StageInput("init", "model", config.init)]

    def plan(self, config: SFTConfig, registry, sizes: dict[str, int]) -> dict[str, Any]:
        """Examples, steps and the most tokens they read (``rlhf run --dry-run``)."""
        return train_plan(config.train, config.data, sizes)

    def run(self, ctx, config: SFTConfig) -> StageResult:
        """Train the policy on (prompt, response) pairs; returns the saved policy directory."""
        backend = ctx.kernel_backend
        source = ctx.init_source(config.init, "policy")
        tokenizer = ctx.tokenizer_for(source)
        train_recs, eval_recs = load_split(config.data, "sft", ctx.registry, ctx.seed)
        dl = config.data
        rendering = Rendering(dl.chat_template, ctx.name, source)
        train_items, stats = tokenize_sft(train_recs, tokenizer, dl.max_length, dl.max_prompt_length, rendering)
        eval_items, _ = tokenize_sft(eval_recs, tokenizer, dl.max_length, dl.max_prompt_length, rendering)
        print(f"sft data: {stats.describe()}; {len(eval_items)} held out")
        if not train_items:
            raise StageError(f"stage {ctx.name!r}: no usable training examples ({stats.describe()})")
        model = ctx.load_model(config.init)
        loss_entry = ctx.registry.lookup("loss", config.loss, "token")
        per_sequence = config.loss.options.get("aggregation") == "sequence_mean"

        fused = use_fused_linear(config.fused_linear, ctx.name, [model], fused_blocker(config))

        def compute_loss(batch):
            return sft_loss_terms(model, batch, loss_entry.obj, config.loss.options, backend, fused, dl.packing)

        def count(batch):
            # What the loss averages over: response tokens (token_mean) or sequences that have one.
            valid = shift_labels(batch["labels"]) != -100
            return float(valid.any(dim=1).sum() if per_sequence else valid.sum())

        def evaluate():
            sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # [nll sum, token count]
            for batch in make_loader(eval_items, config.train.batch_size, lambda b: collate_sft(b, tokenizer.pad_token_id), 0, False):
                batch = {k: v.to(ctx.device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = shift_labels(batch["labels"])
                nll = rlhf_kernels.cross_entropy(logits, labels, reduction="sum", backend=backend)
                sums += batch["real"] * torch.stack([nll.double(), (labels != -100).sum().double()])
            total, tokens = all_reduce_sum(sums).tolist()
            return {"loss": total / max(tokens, 1.0)}

        loader = make_loader(train_items, config.train.batch_size, lambda b: collate_sft(b, tokenizer.pad_token_id), ctx.seed,
                             max_tokens=config.train.max_tokens_per_batch)
        steps = total_steps(config.train, loader)
        trainer = Trainer(model, config.train, ctx.device, ctx.tracker, desc=f"{ctx.name}", packing=dl.packing)
        summary = trainer.fit(loader, compute_loss, evaluate if eval_items else None, steps, count, ctx.checkpointer)
        summary.update(steps=float(steps), **stats.summary())
        model_dir = save_causal_lm(model, tokenizer, ctx.stage_dir) if config.train.save else None
        return StageResult(model_dir, "policy", summary)


@hookimpl
def rlhf_register_stages(register):
    register("sft", SFTStage)


@hookimpl
def rlhf_register_losses(register):
    register("cross_entropy", cross_entropy_loss, family="token")
