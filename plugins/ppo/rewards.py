"""Built-in PPO rewards: ``reward_model`` (the trained R_phi) and ``length`` (rule-based)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from rlhf_core import distributed as dist_utils
from rlhf_core import hookimpl
from rlhf_core.data import encode_prompt, encode_response, pad
from rlhf_core import StageError, StageInput
from rlhf_core.models import REWARD_MARKER, is_reward_model_dir, load_tokenizer
from rlhf_core import is_main_process


class RewardModelReward:
    """Scores ``(prompt, response)`` text with a reward model saved by the ``reward`` stage.

    ``path``: ``auto`` (the latest earlier ``reward`` stage), ``@STAGE`` or a directory. Text is
    tokenised exactly as reward training data was (``[bos] prompt response eos``).
    """

    def __init__(self, ctx, *, path: str = "auto", batch_size: int = 64):
        self.check_options(path=path, batch_size=batch_size)
        source = ctx.init_source(path, "reward")
        if not is_reward_model_dir(source):  # the base model with a fresh head would score noise
            raise StageError(f"stage {ctx.name!r}: reward_model: path {path!r} resolves to {source}, which is not a "
                             f"trained reward model (no {REWARD_MARKER}); train one with a reward stage first, or "
                             "point path at a reward stage's output directory")
        if is_main_process():  # on stderr: `rlhf eval --json` keeps stdout for its JSON
            print(f"{ctx.name}: reward = the reward model in {source}", file=sys.stderr)
        # its own frozen copy, or (LoRA PPO sharing the policy's base) an adapter + head on the policy
        self.model = ctx.load_scalar_model(source, name="reward", trainable=False)
        self.tokenizer = load_tokenizer(ctx.run_config.model, source)
        self.device, self.batch_size = ctx.device, batch_size

    @staticmethod
    def check_options(*, path: str, batch_size: int) -> None:
        """Called before anything trains: a directory ``path`` must hold a saved reward model."""
        if batch_size < 1:
            raise ValueError(f"reward_model: batch_size must be at least 1, got {batch_size}")
        if path != "auto" and not path.startswith("@") and not is_reward_model_dir(path):
            what = "no such directory" if not Path(path).exists() else f"not a saved reward model (no {REWARD_MARKER})"
            raise ValueError(f"reward_model: path {path!r}: {what}; use auto, @STAGE or a reward stage's output directory")

    @staticmethod
    def inputs(*, path: str = "auto", batch_size: int = 64) -> list[StageInput]:
        """What it reads, checked before anything trains: a trained reward model (``auto`` needs an
        earlier stage that trains one)."""
        return [StageInput("path", "reward_model", path)]

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """``[B]`` reward-model scores."""
        seqs = [encode_prompt(self.tokenizer, p) + encode_response(self.tokenizer, r) for p, r in zip(prompts, responses)]
        out = [torch.zeros(0)]
        for rows, real in dist_utils.lockstep_chunks(seqs, self.batch_size, self.device, [self.tokenizer.eos_token_id]):
            ids = pad(rows, self.tokenizer.pad_token_id).to(self.device)
            mask = pad([[1] * len(s) for s in rows], 0).to(self.device)
            scores = self.model(ids, mask, score=True).float().cpu()
            if real:
                out.append(scores)
        return torch.cat(out)


class LengthReward:
    """Rule-based: ``-scale * |len(response) - target| / target`` (characters); 0 at the target length."""

    def __init__(self, ctx=None, *, target: int = 64, scale: float = 1.0):
        self.check_options(target=target, scale=scale)
        self.target, self.scale = target, scale

    @staticmethod
    def check_options(*, target: int, scale: float) -> None:
        """``target`` > 0 characters, a finite ``scale``."""
        if target <= 0:
            raise ValueError(f"length reward: target must be > 0, got {target}")
        if not math.isfinite(scale):
            raise ValueError(f"length reward: scale must be finite, got {scale}")

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """``[B]`` length rewards."""
        return torch.tensor([-self.scale * abs(len(r) - self.target) / self.target for r in responses], dtype=torch.float32)


@hookimpl
def rlhf_register_rewards(register):
    register("reward_model", RewardModelReward)
    register("length", LengthReward)
