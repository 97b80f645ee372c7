"""Run under torchrun (or imported by the test for one process): each rank takes its share of one
fixed experience (8 responses of different lengths, 4 prompts x 2 samples), computes REINFORCE++ and
group advantages with the distributed reductions, then the policy gradient of one update for every
``loss_agg`` mode and several losses, averaged over ranks as DDP averages it; rank 0 writes them to
argv[1] (safetensors)."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the ppo_parts helper, also under torchrun
from ppo_parts import ppo_run  # noqa: E402

from rlhf_core import distributed as dist_utils
from rlhf_core.config import ComponentSpec, GenerationConfig, ModelConfig
from rlhf_core import AdvantageInputs
from rlhf_core.models import load_causal_lm
from rlhf_core.plugin_system.manager import build_registry, get_plugin_manager
from rlhf_core.sampling import Rollout, concat_rollouts
from rlhf_plugins.ppo.advantages import GroupMeanBaseline, ReinforcePP
from rlhf_plugins.ppo.config import KLConfig, PolicyOptimConfig, PPOConfig
from rlhf_plugins.ppo.rollout import Experience, score_tokens

MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm")
LOSSES = (ComponentSpec("ppo_clip", {"clip_eps_low": 0.2, "clip_eps_high": 0.28}), ComponentSpec("gspo", {"variant": "token"}),
          ComponentSpec("cispo"))
PAD = 0


def fixed_experience():
    """The policy and the full experience: the same on every rank."""
    g = torch.Generator().manual_seed(5)
    policy = load_causal_lm(ModelConfig(), seed=0)
    batch, prompt_len, width = 8, 3, 6
    lengths = torch.tensor([6, 2, 5, 1, 6, 3, 4, 6])
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    response = torch.randint(3, 250, (batch, width), generator=g).masked_fill(mask == 0, PAD)
    sequences = torch.cat([torch.randint(3, 250, (batch, prompt_len), generator=g), response], dim=1)
    attention = torch.cat([torch.ones(batch, prompt_len, dtype=torch.long), mask], dim=1)
    roll = Rollout(sequences, attention, prompt_len, response.masked_fill(mask == 0, -100), mask, [""] * batch)
    with torch.no_grad():
        old = (score_tokens(policy, roll, "reference")[0] + 0.2 * torch.randn(batch, width, generator=g)) * mask
    rewards = torch.randn(batch, generator=g)
    return policy, roll, old, rewards


def gradients(rows: list[int]) -> dict[str, torch.Tensor]:
    """This rank's advantages and gradients on ``rows`` of the fixed experience (all rows in one process)."""
    policy, roll, old, rewards = fixed_experience()
    index = torch.tensor(rows)
    mine = concat_rollouts([roll], PAD, index)
    mask = mine.mask.float()
    token_rewards = torch.zeros_like(mask)
    token_rewards[torch.arange(len(rows)), mask.sum(1).long() - 1] = rewards[index]
    inputs = AdvantageInputs(rewards[index], token_rewards, mask, torch.tensor(rows) // 2, None,
                             all_reduce=dist_utils.all_reduce_sum)
    out = {"adv_reinforce_pp": ReinforcePP(baseline="group")(inputs), "adv_group_std": GroupMeanBaseline(scale="std")(inputs)}
    registry = build_registry(get_plugin_manager(entry_points=False))
    for loss in LOSSES:
        for mode in MODES:
            model = copy.deepcopy(policy)
            config = PPOConfig(prompts_per_batch=4, samples_per_prompt=2, ppo_epochs=1, minibatch_size=8,
                               micro_batch_size=2, optim=PolicyOptimConfig(max_grad_norm=0.0), loss=loss, loss_agg=mode,
                               kl=KLConfig(coef=0.0), generation=GenerationConfig(max_new_tokens=6))
            exp = Experience(mine, rewards[index], old[index], None, torch.zeros_like(mask), torch.zeros_like(mask),
                             out["adv_reinforce_pp"], None, None)
            ppo_run(registry, config, model, backend="reference").update(exp)
            grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            out[f"{loss.name}-{mode}"] = dist_utils.all_reduce_sum(grad) / dist_utils.world_size()  # DDP's average
    return out


if __name__ == "__main__":
    dist_utils.init("cpu")
    rows = dist_utils.shard(list(range(8)))
    mine = gradients(rows)
    gathered = dist_utils.all_gather_objects({k: v.tolist() for k, v in mine.items() if k.startswith("adv_")})
    if dist_utils.is_main_process():
        out = {k: v.contiguous() for k, v in mine.items() if not k.startswith("adv_")}
        for key in ("adv_reinforce_pp", "adv_group_std"):
            out[key] = torch.tensor([row for part in gathered for row in part[key]])
        save_file(out, sys.argv[1])
    dist_utils.shutdown()
    sys.stdout.flush()
    os._exit(0)
