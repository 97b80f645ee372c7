"""One RL iteration of rlhf's PPO stage against one step of TRL's ``GRPOTrainer`` at equal work,
side by side in one run: the same tiny Llama (4 layers, hidden 256, 4 heads of 64, byte vocabulary
384, random weights), 4 prompts x 4 completions x 32 new tokens, a group baseline, k3 KL to a frozen
reference in the loss (beta 0.04), one epoch over one minibatch, AdamW, fp32 on CPU. rlhf runs its
own ``make_experience`` + ``update`` (on-policy: no separate old-log-prob forward) with the ``hf``
engine (Hugging Face ``generate``, and its own decode loop ``loop: rlhf``), with and without
fused-linear, and with the ``vllm`` engine where vLLM is installed. Median seconds per iteration after two warm-up ones.
Used by ``benchmarks/bench_e2e.py --trl``.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = ["abc def", "hello the", "x y z", "letters a"]


def _model():
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tokenizer


def reward(prompts, completions, **_) -> list[float]:
    """The same cheap rule for both: count of 'a' in the completion."""
    return [float(str(c).count("a")) for c in completions]


def rlhf_iteration_seconds(steps: int, fused: bool, engine: str = "hf") -> float:
    from rlhf_core.config import ComponentSpec
    from rlhf_plugins.ppo.advantages import GroupMeanBaseline
    from rlhf_core.plugins import build_registry, get_plugin_manager
    from rlhf_plugins.ppo.loss import KLController

    ppo_clip = build_registry(get_plugin_manager(entry_points=False)).lookup("loss", ComponentSpec("ppo_clip"), "policy")
    from rlhf_plugins.ppo.stage import GenerationConfig, KLConfig, PPOConfig, PPOModels, make_experience, update

    policy, tokenizer = _model()
    reference, _ = _model()
    reference.eval().requires_grad_(False)
    config = PPOConfig(prompts_per_batch=4, samples_per_prompt=4, ppo_epochs=1, minibatch_size=16, lr=1e-5,
                       loss=ComponentSpec("ppo_clip"), generation=GenerationConfig(max_new_tokens=32),
                       kl=KLConfig(coef=0.04, estimator="k3", placement="loss"))
    models = PPOModels(policy, reference, torch.optim.AdamW(policy.parameters(), lr=1e-5),
                       KLController(0.04, False, 6.0, 10000), fused=fused)
    score = lambda p, r: torch.tensor(reward(p, r))  # noqa: E731
    generator = None
    if engine == "hf-loop":  # the hf engine with its own decode loop (loop: rlhf)
        import types

        from rlhf_plugins.ppo.generators import HFGenerator
        from rlhf_plugins.ppo.stage import Rollouts

        ctx = types.SimpleNamespace(device=torch.device("cpu"), seed=0, name="ppo")
        generator = Rollouts(types.SimpleNamespace(kind="generator", name="hf", plugin="bench"),
                             HFGenerator(ctx, policy, tokenizer, loop="rlhf"))
    if engine == "vllm":
        import types

        from rlhf_plugins.ppo.stage import Rollouts
        from rlhf_plugins.vllm_engine import VLLMGenerator

        with tempfile.TemporaryDirectory() as tmp:
            ctx = types.SimpleNamespace(device=torch.device("cpu"), seed=0, stage_dir=Path(tmp), name="ppo")
            generator = Rollouts(types.SimpleNamespace(kind="generator", name="vllm", plugin="bench"),
                                 VLLMGenerator(ctx, policy, tokenizer))
    times = []
    torch.manual_seed(0)
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        exp = make_experience(models, PROMPTS, tokenizer, score, GroupMeanBaseline(), config, torch.device("cpu"), None,
                              generator)
        update(models, exp, ppo_clip, config, None)
        if generator is not None:
            generator.update_weights(models.policy)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def trl_step_seconds(steps: int) -> float:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    policy, tokenizer = _model()
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        policy.save_pretrained(Path(tmp) / "model")  # TRL loads its reference copy from the model's path
        tokenizer.save_pretrained(Path(tmp) / "model")
        args = GRPOConfig(output_dir=tmp, per_device_train_batch_size=16, num_generations=4, max_completion_length=32,
                          beta=0.04, num_iterations=1, learning_rate=1e-5, max_steps=steps + 2, logging_steps=10_000,
                          save_strategy="no", report_to=[], use_cpu=True, temperature=1.0, top_p=1.0, top_k=0,
                          dataloader_num_workers=0, seed=0, bf16=False)
        data = Dataset.from_list([{"prompt": p} for p in PROMPTS] * (4 * (steps + 2)))
        trainer = GRPOTrainer(model=str(Path(tmp) / "model"), reward_funcs=reward, args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[Stamp()])
        start = time.perf_counter()
        trainer.train()
    laps = [b - a for a, b in zip([start, *stamps], stamps)]
    return statistics.median(laps[2:])


def run(steps: int = 6, echo=print) -> dict:
    """rlhf (logits path and fused-linear) and TRL, side by side; returns seconds per iteration."""
    from rlhf_plugins.vllm_engine import vllm_unavailable

    out = {"rlhf": rlhf_iteration_seconds(steps, fused=False), "rlhf_fused": rlhf_iteration_seconds(steps, fused=True),
           "rlhf_loop": rlhf_iteration_seconds(steps, fused=False, engine="hf-loop")}
    if not vllm_unavailable():
        out["rlhf_vllm"] = rlhf_iteration_seconds(steps, fused=True, engine="vllm")
    try:
        out["trl_grpo"] = trl_step_seconds(steps)
    except ImportError as exc:
        echo(f"TRL not installed ({exc}); pip install trl to compare")
    echo(f"seconds per iteration (median of {steps} after 2 warm-up): " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()))
    if "trl_grpo" in out:
        echo(f"rlhf is {out['trl_grpo'] / out['rlhf']:.2f}x the speed of TRL's GRPOTrainer "
             f"({out['trl_grpo'] / out['rlhf_fused']:.2f}x with fused-linear"
             + f", {out['trl_grpo'] / out['rlhf_loop']:.2f}x with loop: rlhf"
             + (f", {out['trl_grpo'] / out['rlhf_vllm']:.2f}x with vllm" if "rlhf_vllm" in out else "") + ")")
    return out


if __name__ == "__main__":
    run()
