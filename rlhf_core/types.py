"""Plain data passed between the parts of rlhf: what a stage declares and returns, what the host
hands a policy loss or an advantage estimator, one batch of sampled sequences. Imports nothing of
rlhf's own, so every other module can use it.

Shapes use ``B`` = batch (sequences), ``T`` = tokens per sequence (shifted: position ``t`` holds
the prediction of token ``t + 1``), ``R`` = response tokens, ``V`` = vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["StageInput", "StageResult", "Uses", "PolicyLossInputs", "AdvantageInputs", "Rollout", "Observation"]


@dataclass
class StageInput:
    """Something a stage will read, checked by the host before the first stage trains.

    ``path``: where it is set in the stage's config (``data.train``, ``init``); ``kind``:
    ``"data"`` (``value`` is a data file or ``builtin:NAME``, read and validated as ``data_kind``
    records, ``builtin_size`` of them for a builtin, columns renamed by ``fields``, 🤗 ``split``;
    ``extra``: the fields a component reads beside the kind's own, ``{field: who reads it}``, e.g.
    ``{"answer": "reward 'math'"}``), ``"model"`` (``value`` is an init source: ``auto``,
    ``base``, ``@STAGE`` naming an earlier stage, or a directory / hub id) or ``"reward_model"``
    (``value`` is where a trained reward model comes from: ``auto`` needs an earlier stage that
    trains one, ``@STAGE`` must name one, a directory must hold one).
    """

    path: str
    kind: str
    value: str
    data_kind: str | None = None
    builtin_size: int = 0
    fields: dict[str, str] | None = None
    split: str = "train"
    extra: dict[str, str] | None = None


@dataclass
class StageResult:
    """What a stage leaves behind for later stages and the run summary.

    ``model_dir``: a ``save_pretrained`` directory (policy or reward model) or None;
    ``kind``: ``"policy"`` or ``"reward"``; ``summary``: final metrics (floats) for summary.json
    under ``stages.<name>``; ``headline``: numbers promoted to the top level of summary.json
    (e.g. ``gold_score_ppo``).
    """

    model_dir: Path | None
    kind: str
    summary: dict[str, float] = field(default_factory=dict)
    headline: dict[str, float] = field(default_factory=dict)


@dataclass
class Uses:
    """A component a stage will look up, declared once in :meth:`rlhf_core.Stage.uses` so that an
    unknown name or a bad option is reported before anything trains.

    ``kind``: ``loss``, ``reward``, ``advantage``, ``generator``, ``dataset`` ...; ``spec``: the
    config's :class:`~rlhf_core.config.ComponentSpec` (None: nothing configured, skipped);
    ``path``: where it is set, relative to the stage (``loss``, ``reward[1]``); ``families``: for
    a loss, the families this stage can call (``("token",)``)."""

    kind: str
    spec: Any
    path: str
    families: tuple[str, ...] | None = None


@dataclass
class PolicyLossInputs:
    """What a policy loss (family ``"policy"``) sees for one micro-batch, all ``[B, T]`` over the
    response positions (0 off ``mask``):

    ``logprobs``: log pi_theta of the sampled tokens, **differentiable** (the stage computes them
    with the fused-linear kernels from the last hidden states and the LM head when
    ``fused_linear`` is on, else from the logits: a loss never sees ``[B, T, V]``);
    ``old_logprobs``: under the policy that sampled them, before this update (detached);
    ``advantages``; ``mask``: 1.0 on response tokens; ``ref_logprobs``: under the frozen reference
    (None when ``kl.coef`` is 0 and no reference exists); ``engine_logprobs``: the generator's own
    sampling log-probs (None for an engine that reports none, e.g. ``hf``); ``entropy``: the
    policy's per-token entropy, differentiable, computed only for a loss registered with
    ``needs=("entropy",)`` (else None); ``max_new_tokens``: the sampling budget per response.
    """

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    engine_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    max_new_tokens: int = 0


@dataclass
class AdvantageInputs:
    """What an advantage estimator sees for one rollout batch.

    ``rewards [B]``: sequence reward (reward minus the KL penalty when it is in the reward);
    ``token_rewards [B, T]``: the same reward spread per token (KL penalty per token, the
    sequence reward on the last response token); ``mask [B, T]``: 1 on response tokens;
    ``group_ids [B]``: which prompt each sample came from; ``values [B, T]`` or None: critic values.

    With several processes each rank holds its share of the rollout batch (a prompt's samples stay
    on one rank, so per-group statistics are local). A statistic over the *batch* must use
    ``all_reduce(tensor)``, the sum over ranks (the identity in a single process): e.g. the batch
    mean is ``all_reduce(rewards.sum()) / all_reduce(count)``.
    """

    rewards: torch.Tensor
    token_rewards: torch.Tensor
    mask: torch.Tensor
    group_ids: torch.Tensor
    values: torch.Tensor | None = None
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t, repr=False)

    def batch_mean(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """Mean of a ``[B]`` tensor over the whole (global) rollout batch."""
        both = self.all_reduce(torch.stack([per_sequence.double().sum(),
                                            torch.tensor(float(per_sequence.numel()), dtype=torch.float64,
                                                         device=per_sequence.device)]))
        return (both[0] / both[1].clamp(min=1)).to(per_sequence.dtype)


@dataclass
class Rollout:
    """One batch of sampled sequences.

    ``sequences [B, P+R]`` (left-padded prompt, then response, pad after EOS), ``attention_mask``
    ``[B, P+R]``, ``prompt_len`` = P, ``labels [B, R]`` (response ids, -100 after EOS),
    ``mask [B, R]`` (1 on response tokens up to and including EOS), ``responses`` (decoded text),
    ``logprobs [B, R]``: the sampling engine's own log-probs of the response tokens (0 off the
    mask), when it reports them (None for ``hf``).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    labels: torch.Tensor
    mask: torch.Tensor
    responses: list[str]
    logprobs: torch.Tensor | None = None


@dataclass
class Observation:
    """What an environment says at the start of an episode and after each assistant turn.

    ``messages``: chat messages ``{"role": ..., "content": ...}`` appended to the conversation (at
    the start, the opening: a system and/or user message; after a turn, e.g. a user turn); they are
    rendered with the chat template and appended as tokens; ``reward``: this turn's reward (an
    episode's rewards add up); ``done``: the episode is over (the messages of a final observation
    are not shown to the policy); ``state``: the episode's state, handed back to the next ``step``
    (any object; a function of the row and the seed, so a resumed run repeats the episode);
    ``info``: numbers to log, averaged over the batch's episodes as ``env_<key>`` (each episode's
    values summed over its turns)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    state: Any = None
    info: dict[str, float] = field(default_factory=dict)
