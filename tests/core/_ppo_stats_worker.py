"""Run under torchrun: rank r takes its share of a fixed rollout batch and computes the PPO batch
statistics with the distributed reductions; rank 0 writes them as JSON to argv[1]."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the ppo_parts helper, also under torchrun
from ppo_parts import ppo_run  # noqa: E402

from rlhf_core import distributed as dist_utils
from rlhf_core import AdvantageInputs, ModelConfig
from rlhf_plugins.ppo.advantages import BatchMeanBaseline, EMABaseline, whiten
from rlhf_plugins.ppo.loss import KLController
from rlhf_core.sampling import Rollout
from rlhf_core.models import load_causal_lm
from rlhf_core.plugin_system.manager import build_registry, get_plugin_manager
from rlhf_plugins.ppo.config import KLConfig, PPOConfig
from rlhf_plugins.ppo.rollout import Experience
from rlhf_plugins.ppo.run import PolicyUpdate


def fixed_batch():
    """8 samples x 5 response tokens with ragged masks, rewards and KL: the same on every rank."""
    g = torch.Generator().manual_seed(123)
    lengths = torch.tensor([5, 3, 1, 4, 5, 2, 5, 3])
    mask = (torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)).float()
    rewards = torch.randn(8, generator=g)
    kl = torch.rand(8, 5, generator=g) * mask
    entropy = torch.rand(8, 5, generator=g) * mask
    return mask, rewards, kl, entropy


def statistics(mask, rewards, kl, entropy, rows):
    """Advantages (batch mean, EMA over two batches, whitened) and the logged batch statistics."""
    m, r, k, e = mask[rows], rewards[rows], kl[rows], entropy[rows]
    reduce = dist_utils.all_reduce_sum
    inputs = AdvantageInputs(r, torch.zeros_like(m), m, torch.arange(len(r)), None, all_reduce=reduce)
    batch_mean = BatchMeanBaseline()(inputs)
    ema = EMABaseline(decay=0.5)
    ema(inputs)
    ema_second = ema(AdvantageInputs(r * 2, torch.zeros_like(m), m, torch.arange(len(r)), None, all_reduce=reduce))
    white = whiten(batch_mean, m)
    roll = Rollout(torch.zeros(len(r), 1), torch.zeros(len(r), 1), 1, torch.zeros_like(m), m, [""] * len(r))
    exp = Experience(roll, r, torch.zeros_like(m), torch.zeros_like(m), e, k, white, None, None)
    run = ppo_run(build_registry(get_plugin_manager(entry_points=False)), PPOConfig(kl=KLConfig(coef=0.1)),
                  load_causal_lm(ModelConfig(), seed=0))
    stats = run.stats(exp, PolicyUpdate({}))
    kl_ctl = KLController(0.1, True, 0.5, 100)
    kl_ctl.update(stats["kl"], 8)
    return {"batch_mean": batch_mean.tolist(), "ema_baseline": ema.baseline, "ema_second": ema_second.tolist(),
            "whitened": white.tolist(), "stats": stats, "kl_coef": kl_ctl.value}


if __name__ == "__main__":
    dist_utils.init("cpu")
    mask, rewards, kl, entropy = fixed_batch()
    rows = dist_utils.shard(list(range(8)))
    mine = statistics(mask, rewards, kl, entropy, rows)
    gathered = dist_utils.all_gather_objects((rows, mine))
    if dist_utils.is_main_process():
        with open(sys.argv[1], "w") as fh:
            json.dump(gathered, fh)
    dist_utils.shutdown()
    sys.stdout.flush()
    os._exit(0)
