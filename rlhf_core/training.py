"""The optimisation loop shared by the stages: AdamW, warm-up + schedule, gradient accumulation,
clipping, periodic eval, autocast, progress bar, stage-tagged metric logging.

The same on one process or many: the loader yields *global* batches and each rank collates its
contiguous share (:func:`rlhf_core.distributed.shard`); every micro-batch loss is weighted by its
share of the step's global count (tokens, sequences: what the loss averages over), so that the
gradient equals that of the mean over the whole step, whatever the number of ranks and of
accumulation micro-batches.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Iterable, Iterator

import torch

from . import distributed as dist_utils
from .checkpoint import honour_stop_requests
from .data import held_out_count
from .errors import TrainingError
from .packing import padding_free, packing_line
from .distributed import is_main_process
from .runtime.tracking import progress


#: The supported plugin API of this module (see docs/reference/api.md).
__all__ = ["Trainer", "OptimizerStep", "TrainingError", "Batches", "make_loader", "evaluate_batches", "total_steps", "autocast_context",
           "example_tokens", "budget_problems", "budget_runs", "train_plan"]


def seed_everything(seed: int) -> None:
    """Seed Python, torch (CPU and CUDA)."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


class Batches:
    """Global batches in a seeded order, each rank collating its share.

    Epoch ``e`` visits the items in the order ``randperm(n)`` drawn from a generator seeded with
    ``seed + e`` (or in order without ``shuffle``) and cuts it into batches of ``batch_size`` items,
    or, with ``max_tokens``, into runs of consecutive items whose tokens (:func:`example_tokens`)
    fit the budget (an item alone when it is over it). The batch at any position of the stream is a
    pure function of the position: a resumed run continues with exactly the batch it would have
    seen. A rank takes a contiguous share (balanced by items, or with ``max_tokens`` by tokens); a
    rank whose share of a (last, short) batch is empty collates one stand-in item and marks the
    batch ``is_real = 0``, so that it still takes part in every collective but adds nothing."""

    def __init__(self, items: list, batch_size: int, collate: Callable, seed: int, shuffle: bool = True,
                 max_tokens: int | None = None):
        self.items, self.batch_size, self.collate, self.seed, self.shuffle = items, batch_size, collate, seed, shuffle
        self.max_tokens = max_tokens
        self.tokens = [example_tokens(item) for item in items] if max_tokens is not None else None
        self._orders: dict[int, list[int]] = {}
        self._starts: dict[int, list[int]] = {}  # epoch -> offsets where its token-budget batches start, and n

    def __len__(self) -> int:
        """Batches per epoch (with ``max_tokens``: in epoch 0; later epochs differ by a few)."""
        if self.max_tokens is None:
            return math.ceil(len(self.items) / self.batch_size)
        return len(self._batch_starts(0)) - 1

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            if self.shuffle:
                self._orders = {epoch: torch.randperm(len(self.items), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()}
            else:
                self._orders = {epoch: list(range(len(self.items)))}
        return self._orders[epoch]

    def _batch_starts(self, epoch: int) -> list[int]:
        if epoch not in self._starts:
            self._starts[epoch] = budget_runs([self.tokens[i] for i in self._order(epoch)], self.max_tokens)
        return self._starts[epoch]

    def _span(self, position: int) -> tuple[int, int, int]:
        """``(epoch, start, stop)``: where global batch ``position`` lies in its epoch's order."""
        if self.max_tokens is None:
            epoch, index = divmod(position, len(self))
            return epoch, index * self.batch_size, (index + 1) * self.batch_size
        epoch = 0
        while position >= len(self._batch_starts(epoch)) - 1:
            position -= len(self._batch_starts(epoch)) - 1
            epoch += 1
        starts = self._batch_starts(epoch)
        return epoch, starts[position], starts[position + 1]

    def batch(self, position: int) -> dict[str, torch.Tensor]:
        """The collated share of global batch number ``position`` of the endless stream."""
        epoch, start, stop = self._span(position)
        order = self._order(epoch)[start:stop]
        tokens = [self.tokens[i] for i in order] if self.tokens is not None else None
        return _collate_share([self.items[i] for i in order], self.collate, tokens)

    def stream(self, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches from position ``start``, reshuffled every epoch."""
        position = start
        while True:
            yield self.batch(position)
            position += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch (evaluation)."""
        return (self.batch(i) for i in range(len(self)))


def budget_runs(tokens: list[int], budget: int) -> list[int]:
    """Where the maximal runs of consecutive items whose ``tokens`` fit ``budget`` start (an item
    over the budget is a run alone), followed by ``len(tokens)``: runs are ``[starts[k], starts[k + 1])``."""
    starts, used = [0], 0
    for offset, n in enumerate(tokens):
        if used and used + n > budget:
            starts.append(offset)
            used = 0
        used += n
    return starts + [len(tokens)]


def example_tokens(item: dict) -> int:
    """The tokens of a tokenised example: every sequence it holds (its ``*ids`` lists)."""
    return sum(len(v) for k, v in item.items() if k.endswith("ids") and isinstance(v, list))


def make_loader(items: list, batch_size: int, collate: Callable, seed: int, shuffle: bool = True,
                max_tokens: int | None = None) -> Batches:
    """:class:`Batches` over in-memory items (every rank draws the same global batches)."""
    return Batches(items, batch_size, collate, seed, shuffle, max_tokens)


def evaluate_batches(items: list, batch_size: int, collate: Callable, device: torch.device,
                     score: Callable[[dict], Any]) -> list[Any]:
    """The one evaluation loop over held-out ``items``: ``score(batch)`` on this rank's share of each
    batch of ``batch_size`` (in order, on ``device``), returning the results of the batches that hold
    rows. Every rank runs the same number of forwards (a sharded model needs them all): a rank whose
    share of a short last batch is empty scores a stand-in row whose result is dropped here."""
    results = []
    for batch in make_loader(items, batch_size, collate, 0, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        result = score(batch)
        if float(batch["is_real"]) > 0:
            results.append(result)
    return results


def token_share(tokens: list[int]) -> tuple[int, int]:
    """``(start, stop)``: this rank's contiguous share of a batch of items with ``tokens`` each,
    balanced by tokens (an item goes to the rank where its first token falls)."""
    w, r, total = dist_utils.world_size(), dist_utils.rank(), sum(tokens)
    owners, before = [], 0
    for n in tokens:
        owners.append(min(w - 1, before * w // max(total, 1)))
        before += n
    mine = [i for i, owner in enumerate(owners) if owner == r]
    return (mine[0], mine[-1] + 1) if mine else (0, 0)


def _collate_share(batch: list, collate: Callable, tokens: list[int] | None = None) -> dict[str, torch.Tensor]:
    if tokens is None:
        share = dist_utils.shard(batch)
    else:
        start, stop = token_share(tokens)
        share = batch[start:stop]
    out = collate(share or batch[:1])
    out["is_real"] = torch.tensor(1.0 if share else 0.0)
    return out


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier on the base lr: linear warm-up over ``warmup`` steps, then the schedule.
    ``cosine`` decays to 10% of the base lr at ``total``; ``linear`` to 0; ``constant`` stays."""

    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0

    return fn


def _weighted_means(window: dict[str, list[float]], device: torch.device) -> dict[str, float]:
    """Each metric's mean over every micro-batch of every rank, weighted by the loss's count."""
    keys = sorted(window)
    sums = dist_utils.all_reduce_sum(torch.tensor([window[k] for k in keys], dtype=torch.float64, device=device))
    return {k: float(total / count) if count > 0 else float("nan") for k, (total, count) in zip(keys, sums.tolist())}


def resolve_precision(mode: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA devices that support it, else ``no``; other modes unchanged."""
    if mode == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return mode


def autocast_context(mode: str, device: torch.device):
    """bf16/fp16 autocast, or nothing (see :func:`resolve_precision`)."""
    mode = resolve_precision(mode, device)
    if mode == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def total_steps(train_cfg: Any, data: int | Batches) -> int:
    """Optimizer steps: ``steps`` if set, else ``epochs`` over the data (``n`` items in batches of
    ``batch_size``, or a loader's batches per epoch, e.g. token-budget ones)."""
    if train_cfg.steps is not None:
        return max(1, train_cfg.steps)
    batches = len(data) if isinstance(data, Batches) else math.ceil(data / train_cfg.batch_size)
    per_epoch = math.ceil(batches / train_cfg.grad_accum)
    return max(1, math.ceil(per_epoch * train_cfg.epochs))


def train_plan(train_cfg: Any, data_cfg: Any, sizes: dict[str, int], sequences_per_example: int = 1) -> dict[str, Any]:
    """A ``Trainer`` stage's ``plan`` (``rlhf run --dry-run``): training examples (what ``data.train``
    leaves after the held-out share), optimizer steps and the most tokens the steps can read
    (``max_length`` per sequence; ``sequences_per_example`` is 2 for pairs). With token-budget
    batches and no ``steps``, the steps depend on the examples' lengths: the plan says so."""
    n = sizes.get("data.train", 0)
    if data_cfg.eval is None:
        n -= held_out_count(n, data_cfg.eval_fraction)
    if data_cfg.limit is not None:
        n = min(n, data_cfg.limit)
    budget = train_cfg.max_tokens_per_batch
    if budget is not None and train_cfg.steps is None:
        return {"training examples": n, "optimizer steps": f"{train_cfg.epochs:g} epoch(s) of {budget}-token batches "
                f"(counted once tokenised)", "tokens (at most)": math.ceil(train_cfg.epochs * n * sequences_per_example
                                                                           * data_cfg.max_length)}
    steps = total_steps(train_cfg, n)
    tokens = (steps * train_cfg.grad_accum * budget if budget is not None
              else steps * train_cfg.batch_size * train_cfg.grad_accum * sequences_per_example * data_cfg.max_length)
    return {"training examples": n, "optimizer steps": steps, "tokens (at most)": tokens}


def budget_problems(train_cfg: Any, data_cfg: Any, sequences_per_example: int = 1) -> list[str]:
    """``train.max_tokens_per_batch`` must hold the longest example a stage can have."""
    budget, longest = train_cfg.max_tokens_per_batch, sequences_per_example * data_cfg.max_length
    if budget is not None and budget < longest:
        what = "data.max_length" if sequences_per_example == 1 else f"{sequences_per_example} x data.max_length"
        return [f"train.max_tokens_per_batch: must be at least {what} ({longest}), the most tokens one example can "
                f"have, so that every example fits a batch; got {budget}"]
    return []


class OptimizerStep:
    """The one optimizer step of every stage (the :class:`Trainer`'s and PPO's): AdamW over the
    ``params`` that require grad, linear warm-up then the schedule over ``total_steps``
    (:func:`lr_lambda`), fp16 loss scaling, gradient-norm clipping and the non-finite checks, from
    an :class:`~rlhf_core.config.OptimConfig` ``cfg``.

    Per step: :meth:`zero_grad`, then :meth:`backward` for each micro-batch's (weighted) loss after
    :meth:`check_loss`, then :meth:`step`. Errors name ``who`` (``stage 'sft'``) and ``model`` (``policy``, ``critic``; "" for
    the one model of a stage), and advise on the config keys under ``prefix`` (``train.``, ``optim.``)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], cfg: Any, device: torch.device, total_steps: int, *,
                 who: str, prefix: str = "train.", model: str = "", hint: str = "check the data"):
        self.params = [p for p in params if p.requires_grad]
        self.cfg, self.who, self.prefix, self.hint = cfg, who, prefix, hint
        self.model = f"{model} " if model else ""
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda(cfg.schedule, cfg.warmup_steps, total_steps))
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
        self.scaler = torch.amp.GradScaler(device.type, enabled=resolve_precision(cfg.mixed_precision, device) == "fp16")

    def check_loss(self, loss: torch.Tensor, where: str = "") -> None:
        """A non-finite loss stops training with advice (``where``: `` at step 12``)."""
        if not torch.isfinite(loss):
            raise TrainingError(f"{self.who}: the {self.model}loss became {float(loss.detach())}{where}; lower "
                                f"{self.prefix}lr, set {self.prefix}mixed_precision: no, or {self.hint}")

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of ``loss`` (scaled under fp16)."""
        self.scaler.scale(loss).backward()

    def step(self, where: str = "") -> torch.Tensor:
        """Clip, check, update the weights, advance the schedule, clear the gradients; returns the
        gradient norm before clipping. With fp16 loss scaling an inf gradient is expected now and then
        (the scaler skips that step and lowers the scale); anywhere else it would silently poison the
        weights, so it is an error."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = dist_utils.clip_grad_norm(self.params, self.cfg.max_grad_norm)
        if not self.scaler.is_enabled() and not torch.isfinite(grad_norm):
            raise TrainingError(f"{self.who}: the {self.model}gradient norm became {float(grad_norm)}{where}; lower "
                                f"{self.prefix}lr, set {self.prefix}max_grad_norm > 0, or {self.hint}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return grad_norm

    def zero_grad(self) -> None:
        """Clear the gradients before a step's first backward (they stay readable after :meth:`step`)."""
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        """The schedule's and the loss scaler's state (the optimizer's is checkpointed with the model)."""
        return {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


class Trainer:
    """Runs ``steps`` optimizer steps of ``compute_loss(batch) -> (loss, metrics)`` over a loader."""

    def __init__(self, model: torch.nn.Module, train_cfg: Any, device: torch.device, tracker: Any, desc: str,
                 params: Iterable[torch.nn.Parameter] | None = None, packing: bool = False):
        self.model, self.cfg, self.device, self.tracker, self.desc = model, train_cfg, device, tracker, desc
        self.packing = packing  # every forward of compute_loss and evaluate on packed rows (rlhf_core.packing)
        self.params = list(params if params is not None else model.parameters())

    def fit(self, loader: Batches, compute_loss: Callable[[dict], tuple[torch.Tensor, dict]],
            evaluate: Callable[[], dict[str, float]] | None, steps: int,
            count: Callable[[dict], float] | None = None, checkpointer: Any = None) -> dict[str, float]:
        """Train; returns the last logged training metrics (``train_<name>``: the loss and every metric
        ``compute_loss`` returned) merged with the final eval metrics (``eval_<name>``).

        ``compute_loss(batch)`` returns a mean over ``count(batch)`` units (valid tokens for a
        token-mean loss, rows for a per-example loss; default: rows of ``is_real`` batches), which
        weights it in the step's global mean.

        With a ``checkpointer`` the loop starts from its newest checkpoint (model, optimizer,
        scheduler, scaler, RNGs, data position, logging window) and saves one whenever it is due.

        With ``packing`` the training and evaluation forwards run on packed rows, and the logs and
        the summary report ``packing_efficiency`` (real tokens over row capacity)."""
        cfg = self.cfg
        if self.packing and is_main_process():
            print(f"{self.desc}: {packing_line(self.model)}")
        optim = OptimizerStep(self.params, cfg, self.device, steps, who=f"stage {self.desc!r}")
        window: dict[str, list[float]] = {}  # metric -> [sum of value * count, sum of count]
        last: dict[str, float] = {}
        start = 0
        saved = checkpointer.restore({"model": self.model}, {"model": optim.optimizer}) if checkpointer else None
        if saved is not None:
            optim.load_state_dict(saved)
            start, window, last = saved["step"], saved["window"], saved["last"]
        batches = loader.stream(start * cfg.grad_accum)
        bar = progress(start, steps, self.desc)
        self.model.train()
        count = count or (lambda batch: float(batch["is_real"]) * len(next(iter(batch.values()))))
        with honour_stop_requests(checkpointer):
            last = self._loop(bar, batches, compute_loss, evaluate, steps, count, optim, window, last, checkpointer)
        bar.close()
        # Every training metric of the last logging window (the loss's own ones included), not the schedule.
        final = {f"train_{k}": v for k, v in last.items() if k not in ("lr", "grad_norm", "tokens_per_s")}
        if evaluate is not None:
            result = self._eval(evaluate)
            self.tracker.log(steps, {f"eval_{k}": v for k, v in result.items()})
            final.update({f"eval_{k}": v for k, v in result.items()})
        return final

    def _loop(self, bar, batches, compute_loss, evaluate, steps, count, optim: OptimizerStep, window, last,
              checkpointer) -> dict[str, float]:
        cfg = self.cfg
        tokens, started = 0, time.perf_counter()
        for step in bar:
            optim.zero_grad()
            micro = [{k: v.to(self.device) for k, v in next(batches).items()} for _ in range(cfg.grad_accum)]
            counts = [count(b) * float(b["is_real"]) for b in micro]
            # Each micro-batch's mean weighs by its share of the step's count over every rank.
            weights = dist_utils.loss_weights(counts, self.device)
            for batch, n, weight in zip(micro, counts, weights):
                with autocast_context(cfg.mixed_precision, self.device), self._packed() as packed:
                    loss, metrics = compute_loss(batch)
                optim.check_loss(loss, f" at step {step}")
                optim.backward(loss * weight)
                # Every mask in the batch counts its real tokens (attention_mask, response_mask, chosen_mask, ...).
                tokens += float(batch["is_real"]) * sum(int(v.sum()) for k, v in batch.items() if k.endswith("_mask"))
                for key, value in {"loss": loss.item(), **metrics}.items():  # weighted like the loss
                    window.setdefault(key, [0.0, 0.0])
                    window[key][0] += float(value) * n
                    window[key][1] += n
                if packed is not None:  # real tokens over row capacity, over the window
                    window.setdefault("packing_efficiency", [0.0, 0.0])
                    window["packing_efficiency"][0] += packed.real * float(batch["is_real"])
                    window["packing_efficiency"][1] += packed.slots * float(batch["is_real"])
            grad_norm = optim.step(f" at step {step}")
            if step % cfg.log_every == 0 or step == steps:
                elapsed = time.perf_counter() - started
                last = _weighted_means(window, self.device)
                all_tokens = float(dist_utils.all_reduce_sum(torch.tensor(float(tokens), dtype=torch.float64, device=self.device)))
                last.update(lr=optim.lr, grad_norm=float(grad_norm), tokens_per_s=all_tokens / max(elapsed, 1e-9))
                self.tracker.log(step, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                window = {}
                tokens, started = 0, time.perf_counter()  # throughput over the last logging window
            if evaluate is not None and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != steps:
                self.tracker.log(step, {f"eval_{k}": v for k, v in self._eval(evaluate).items()})
                started = time.perf_counter()  # evaluation time is not training throughput
            if checkpointer is not None and checkpointer.due(step, steps):
                checkpointer.save(step, {"model": self.model}, {"model": optim.optimizer}, {
                    **optim.state_dict(), "window": window, "last": last,
                })
                checkpointer.after_save()
                started = time.perf_counter()
        return last

    def _packed(self):
        """A ``padding_free`` block over the model with packing (yields its stats), else nothing (None)."""
        return padding_free(self.model) if self.packing else contextlib.nullcontext()

    def _eval(self, evaluate: Callable[[], dict[str, float]]) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad(), autocast_context(self.cfg.mixed_precision, self.device), self._packed():
            result = evaluate()
        self.model.train()
        return result
