"""Rollouts that overlap training (``ppo.async: {max_staleness: K}``).

A rollout worker — a process of its own, with its own copy of the policy and its own threads —
samples the next batches while the trainer scores and updates the current one. The schedule is
fixed, so a run is deterministic and resumable: with iterations counted from 1 and version ``v``
the policy after ``v`` updates, batch ``i`` is always sampled with version ``max(0, i - 1 - K)``
(synchronous PPO samples batch ``i`` with version ``i - 1``). With ``K = 1`` batch ``i + 1`` is
sampled during iteration ``i``'s scoring and update.

Weights reach the worker without touching disk: the trainer writes them into tensors in shared
memory and bumps a version counter; before a batch the worker copies the version it needs into its
model. The trainer never publishes version ``v + 1`` while a batch that needs version ``v`` has
not taken it yet (it waits for the worker instead), so one buffer suffices.

Every batch comes back with the version it was sampled with and its **behaviour log-probs** (the
worker's own scoring forward of the tokens it sampled, under the weights that sampled them); PPO
treats them as engine log-probs, so ``rollout_correction`` (TIS, sequence TIS, masked IS)
corrects for the lag, and ``staleness`` (iteration - 1 - version) is logged.

The worker samples with rlhf's ``generate`` (``hf`` engine, ``loop`` and ``compile`` as configured) on the
trainer's device (on a GPU both processes share it), each batch from its own seed (``seed``, batch
index, rank: :func:`batch_seed`), so a batch does not depend on timing. With several processes
(FSDP) every rank has its own worker, which samples that rank's share of each batch with the full
weights: publishing gathers them (a collective every rank joins after each update). A worker that
dies or stops answering ends the run with a clear error within ``async.timeout`` seconds (death is
noticed within half a second).
"""
from __future__ import annotations

import queue
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

from rlhf_core import TrainingError, make_rollout
from rlhf_core import distributed as dist_utils
from rlhf_core.models.lora import plain_model, plain_state_dict
from rlhf_core.sampling import generate, pad_prompts

from .rollout import score_tokens

#: Seconds between the trainer's checks that the worker is alive while it waits.
POLL = 0.5


@dataclass
class Batch:
    """One sampled batch as the worker returns it: ``index`` (the iteration that consumes it), the
    policy ``version`` it was sampled with, the prompt ids, the response ids ``[B, R]`` and the
    behaviour log-probs ``[B, R]`` (0 after EOS)."""

    index: int
    version: int
    prompt_ids: list[list[int]]
    response: torch.Tensor
    logprobs: torch.Tensor

    def rollout(self, tokenizer, device: torch.device):
        """The batch as a :class:`~rlhf_core.Rollout` whose engine log-probs are the behaviour policy's."""
        ids, attn = pad_prompts(tokenizer, self.prompt_ids, device)
        return make_rollout(tokenizer, ids, attn, self.response.to(device), self.logprobs.to(device))


def needed_version(index: int, staleness: int) -> int:
    """The policy version batch ``index`` (1-based) is sampled with: ``max(0, index - 1 - staleness)``."""
    return max(0, index - 1 - staleness)


def batch_seed(seed: int, index: int, rank: int) -> int:
    """The torch seed batch ``index`` is sampled with on process ``rank`` (each rank's worker samples
    that rank's share of the batch)."""
    return seed * 1_000_003 + index + rank * 7_919_993


def plain_state(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's full weights under the plain model's names (LoRA merged in), on CPU."""
    return {k: v.detach().to("cpu") for k, v in plain_state_dict(policy).items()}


def _work(config, tokenizer, weights, version, taken, requests, results, threads: int, device: str) -> None:
    """The worker process: for each request ``(index, need, prompt_ids, settings, seed)`` wait for
    weights ``need``, copy them into its model, sample, score the samples (behaviour log-probs) and
    send a :class:`Batch`; ``None`` ends it. An exception is sent back as text."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    try:
        model = AutoModelForCausalLM.from_config(config).to(device).eval()
        held = -1
        while True:
            job = requests.get()
            if job is None:
                return
            index, need, prompt_ids, settings, seed = job
            while held != need:
                if version.value == need:
                    with torch.no_grad():
                        model.load_state_dict(weights)
                    held = need
                    taken.value = need
                else:
                    time.sleep(0.002)
            torch.manual_seed(seed)
            roll = generate(model, tokenizer, prompt_ids, device=torch.device(device), **settings)
            logprobs, _ = score_tokens(model, roll, None)
            response = roll.sequences[:, roll.prompt_len:]
            results.put(Batch(index, need, prompt_ids, response.cpu(), (logprobs * roll.mask).cpu()))
    except Exception:  # sent to the trainer, which stops the run with it
        results.put(("error", traceback.format_exc()))


class RolloutWorker:
    """The trainer's side of the rollout worker: requests batches ahead, publishes weights after
    every update, and hands each iteration its batch (see the module docstring)."""

    def __init__(self, policy: torch.nn.Module, tokenizer: Any, *, staleness: int, iterations: int, seed: int,
                 settings: dict[str, Any], threads: int, timeout: float, device: torch.device):
        self.tokenizer, self.staleness, self.iterations, self.seed = tokenizer, staleness, iterations, seed
        self.settings, self.timeout = settings, timeout
        ctx = mp.get_context("spawn")
        plain = plain_model(policy)
        self.weights = {k: v.clone().share_memory_() for k, v in plain_state(policy).items()}
        self.version, self.taken = ctx.Value("i", 0), ctx.Value("i", -1)
        self.requests, self.results = ctx.Queue(), ctx.Queue()
        self.ready: dict[int, Batch] = {}
        self.extras: dict[int, Any] = {}  # what request() returned with each batch's prompts
        self.requested = 0  # the last batch index requested
        self.process = ctx.Process(target=_work, args=(plain.config, tokenizer, self.weights, self.version, self.taken,
                                                       self.requests, self.results, threads, str(device)),
                                   name="rlhf-rollout-worker", daemon=True)
        self.process.start()

    def start(self, version: int, done: dict[int, tuple[Batch, Any]], request: Any) -> None:
        """Begin at weights ``version`` with the batches already sampled (``done``: ``index -> (batch,
        extra)``, from a checkpoint) and request the batches ahead: ``request(index) -> (prompt_ids,
        extra)`` draws one batch's prompts (in batch order, so the prompt sampler's stream is that of
        synchronous PPO)."""
        if version > 0:  # a resumed run: the worker starts from the trainer's current weights
            self.version.value = version
        for index, (batch, extra) in done.items():
            self.ready[index], self.extras[index] = batch, extra
        self.request_fn = request
        self.requested = max([version] + list(done))
        self._fill(version + 1)

    def _fill(self, current: int) -> None:
        """Request every batch up to ``current + staleness`` (not past the last iteration)."""
        while self.requested < min(current + self.staleness, self.iterations):
            self.requested += 1
            index = self.requested
            prompt_ids, extra = self.request_fn(index)
            self.extras[index] = extra
            self.requests.put((index, needed_version(index, self.staleness), prompt_ids, self.settings,
                               batch_seed(self.seed, index, dist_utils.rank())))

    def take(self, index: int) -> tuple[Batch, Any, float]:
        """``(batch, what request() returned with its prompts, seconds waited)`` for iteration ``index``."""
        started = time.perf_counter()
        while index not in self.ready:
            self._receive(f"batch {index}", started)
        self._fill(index)
        return self.ready.pop(index), self.extras.pop(index), time.perf_counter() - started

    def _dead(self, what: str) -> TrainingError:
        return TrainingError(f"ppo async: the rollout worker (pid {self.process.pid}) died with exit code "
                             f"{self.process.exitcode} while sampling {what}; nothing after the last checkpoint is "
                             "kept (rerun with --resume)")

    def _receive(self, what: str, started: float) -> None:
        try:
            item = self.results.get(timeout=POLL)
        except queue.Empty:
            if not self.process.is_alive():
                raise self._dead(what) from None
            if time.perf_counter() - started > self.timeout:
                raise TrainingError(f"ppo async: the rollout worker sent no {what} within async.timeout "
                                    f"({self.timeout:g} s); it is stopped (raise async.timeout if sampling a batch "
                                    "takes longer)") from None
            return
        except Exception as exc:  # the pipe broke: the worker died while writing to it
            self.process.join(timeout=5)
            if not self.process.is_alive():
                raise self._dead(what) from None
            raise TrainingError(f"ppo async: reading the rollout worker's batch failed: {type(exc).__name__}: "
                                f"{exc}") from None
        if isinstance(item, tuple):
            raise TrainingError(f"ppo async: the rollout worker failed:\n{item[1]}")
        self.ready[item.index] = item

    def publish(self, policy: torch.nn.Module, version: int) -> None:
        """Version ``version`` of the weights (after that many updates), once the worker has taken the
        version before it for every batch that needs it."""
        needs_previous = [i for i in range(version, self.requested + 1)
                          if i not in self.ready and needed_version(i, self.staleness) == version - 1]
        started = time.perf_counter()
        while needs_previous and self.taken.value < version - 1:
            self._receive(f"the weights of version {version - 1} taken", started)
            needs_previous = [i for i in needs_previous if i not in self.ready]
        state = plain_state(policy)
        for key, value in self.weights.items():
            value.copy_(state[key])
        self.version.value = version

    def pending(self, after: int) -> dict[int, tuple[Batch, Any]]:
        """Every requested batch after iteration ``after`` with its extra, waiting for those still
        being sampled (what a checkpoint stores, so that a resumed run consumes the same batches)."""
        started = time.perf_counter()
        while any(i not in self.ready for i in range(after + 1, self.requested + 1)):
            self._receive("the batches a checkpoint holds", started)
        return {i: (b, self.extras[i]) for i, b in sorted(self.ready.items()) if i > after}

    def close(self) -> None:
        """Stop the worker (it is a daemon: it never outlives the trainer either way)."""
        if self.process.is_alive():
            self.requests.put(None)
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
