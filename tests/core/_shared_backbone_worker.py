"""Run under torchrun (1 or 2 processes): a LoRA policy whose reward model and critic are adapters +
heads on its frozen base, FSDP2-sharded over the processes; a few policy (fused-linear log-probs,
inside the sharded forward) and critic steps on a fixed batch, each rank taking its share. Rank 0 writes the rewards, the critic's values and every
trained tensor to argv[2] (a torch file), so that 2 processes can be compared with 1."""
from __future__ import annotations

import os
import sys

import torch

import rlhf_kernels
from rlhf_core import distributed as dist_utils
from rlhf_core.config import DistributedConfig, LoraConfig, ModelConfig
from rlhf_core.models import SharedBackbone, apply_lora, load_causal_lm, with_last_hidden

if __name__ == "__main__":
    dist_utils.init("cpu")
    lora = LoraConfig(r=4, alpha=8.0)
    policy = apply_lora(load_causal_lm(ModelConfig(), seed=0), lora, "builtin:tiny")
    shared = SharedBackbone(policy, lora)
    reward = shared.add("reward", sys.argv[1], trainable=False)
    critic = shared.add("critic", sys.argv[1], trainable=True)
    shared.seal()
    policy = dist_utils.wrap(policy, DistributedConfig(strategy="fsdp"), torch.device("cpu"))
    opt = torch.optim.AdamW(shared.parameters_of("default"), lr=1e-2)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 200, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    targets = torch.randn(4, 10, generator=g)
    rows = dist_utils.shard(list(range(4)))
    tokens = float(mask.sum())  # the global token count: each rank's loss is its share of the global mean
    for _ in range(2):
        policy.train()
        # the policy's token log-probs through the fused-linear kernel, inside the sharded forward
        logp = with_last_hidden(policy, lambda hidden, weight: rlhf_kernels.linear_token_logprobs(
            hidden[:, :-1].reshape(-1, hidden.shape[-1]), weight, ids[rows, 1:].reshape(-1)).view(len(rows), -1),
            ids[rows], mask[rows])
        loss = -(logp * mask[rows, 1:]).sum() / tokens * dist_utils.world_size()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with critic.scope():
            values = critic(ids[rows], mask[rows])
            v_loss = (((values - targets[rows]) ** 2) * mask[rows]).sum() / tokens * dist_utils.world_size()
            critic_opt.zero_grad(set_to_none=True)
            v_loss.backward()
        critic_opt.step()
    policy.eval()
    with torch.no_grad():
        out = {"reward": reward(ids[rows], mask[rows], score=True), "values": critic(ids[rows], mask[rows])}
    gathered = dist_utils.all_gather_objects(out)
    state = dist_utils.full_state_dict(policy)
    if dist_utils.rank() == 0:
        result = {k: torch.cat([part[k] for part in gathered]) for k in out}
        result["trained"] = {k: v for k, v in state.items() if ".lora_" in k or "rlhf_heads" in k}
        torch.save(result, sys.argv[2])
    dist_utils.shutdown()
    sys.stdout.flush()
    os._exit(0)
