"""Memory benchmark: one PPO iteration and one SFT step on a realistic-shape model (Llama built from
a config with random weights; vocabulary 128256 through a word-level tokenizer built with the
``tokenizers`` library), for four set-ups side by side:

- ``plain``: full fine-tuning, a frozen reference copy, ``[B, T, V]`` logits (``fused_linear: false``)
- ``fused``: the same, but log-probs, entropy and losses from the hidden states and the LM head
- ``fused+lora``: LoRA adapters (peft); the reference is the policy with adapters disabled
- ``fused+lora+gc``: and gradient checkpointing

and, for PPO with a reward model and a GAE critic (``ppo+rm+critic``: all four models of
step 3 of the three-step recipe):

- ``plain``: policy, reference, reward model and critic each a full copy, logits materialised
- ``fused+lora``: LoRA policy (reference = adapters off), the reward model a frozen copy, the
  critic a LoRA copy of the reward model (``shared_backbone: false``)
- ``fused+lora+shared``: reward model and critic adapters + heads on the policy's frozen base
  (``shared_backbone: auto``): one copy of the base weights for all four

Each set-up runs in its own process (a clean peak), one warm-up and one measured iteration, with
the framework's own functions (``make_experience``/``update`` of the PPO stage, ``sft_loss_terms``).
Peak RSS is the process's own high-water mark (``VmHWM``): weights, optimizer state, activations,
everything. Used by ``rlhf bench memory`` and ``benchmarks/bench_memory.py``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

SETUPS = {
    "plain": {"fused": False, "lora": False, "gc": False},
    "fused": {"fused": True, "lora": False, "gc": False},
    "fused+lora": {"fused": True, "lora": True, "gc": False},
    "fused+lora+gc": {"fused": True, "lora": True, "gc": True},
}
CRITIC_SETUPS = {
    "plain": {"fused": False, "lora": False, "gc": False, "shared": False},
    "fused+lora": {"fused": True, "lora": True, "gc": False, "shared": False},
    "fused+lora+shared": {"fused": True, "lora": True, "gc": False, "shared": True},
}


def word_tokenizer(vocab: int):
    """A word-level fast tokenizer over ``t0 ... t{vocab-1}`` (id 0 pad, 1 eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t2")


def llama_config(args: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args["vocab"], hidden_size=args["hidden"], intermediate_size=args["hidden"] * 8 // 3,
                       num_hidden_layers=args["layers"], num_attention_heads=args["hidden"] // 64,
                       num_key_value_heads=args["hidden"] // 64, max_position_embeddings=512,
                       bos_token_id=None, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)


def save_reward_model(args: dict, directory: Path) -> Path:
    """A LoRA reward model on the random base (what ``sft -> reward`` with LoRA leaves): saved
    whole, with its adapter, so each set-up loads it the way the PPO stage would."""
    import torch
    from transformers import LlamaForCausalLM

    from rlhf_core.config import LoraConfig
    from rlhf_core.models import ScalarHeadModel, apply_lora

    torch.manual_seed(0)
    model = ScalarHeadModel.from_causal_lm(LlamaForCausalLM(llama_config(args)))
    model.backbone = apply_lora(model.backbone, LoraConfig(r=16, alpha=32), "random", causal_lm=False)
    return model.save_pretrained(directory, word_tokenizer(args["vocab"]))


def build(args: dict):
    """Policy (and reference) for one set-up, as the stages build them."""
    import torch
    from transformers import LlamaForCausalLM

    from rlhf_core.config import LoraConfig
    from rlhf_core.models import apply_lora

    config = llama_config(args)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    reference = None
    if args["lora"]:
        policy = apply_lora(policy, LoraConfig(r=16, alpha=32), "random")
    else:
        torch.manual_seed(0)
        reference = LlamaForCausalLM(config).eval().requires_grad_(False)
    if args["gc"]:
        policy.activation_checkpointing_enable({"use_reentrant": False}) if hasattr(policy, "activation_checkpointing_enable") \
            else policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy, reference


def run_one(args: dict) -> dict:
    """One set-up in this process: PPO iterations or SFT steps; time of the last, peak RSS."""
    import torch

    from rlhf_core import ComponentSpec, GenerationConfig, RewardSum, collate_sft
    from rlhf_core.distributed import peak_rss_mb
    from rlhf_core.plugin_system.manager import build_registry, get_plugin_manager
    from rlhf_plugins.ppo.advantages import GAE, BatchMeanBaseline
    from rlhf_plugins.ppo.config import CriticOptimConfig, PolicyOptimConfig, PPOConfig
    from rlhf_plugins.ppo.run import PPORun
    from rlhf_plugins.sft import sft_loss_terms

    registry = build_registry(get_plugin_manager(entry_points=False))

    torch.manual_seed(0)
    tokenizer = word_tokenizer(args["vocab"])
    policy, reference = build(args)
    gen = torch.Generator().manual_seed(1)
    # ppo: the reward model is not compared
    reward = RewardSum([("reward", 1.0, lambda p, r, rows: torch.randn(len(r), generator=gen))])
    estimator, critic, shared = BatchMeanBaseline(), None, None
    if args["what"] == "ppo+rm+critic":
        judge, critic, shared = scalar_models(args, policy, tokenizer)
        reward = RewardSum([("reward_model", 1.0, lambda p, r, rows: judge(p, r))])
        estimator = GAE()
    params = shared.parameters_of("default") if shared else [p for p in policy.parameters() if p.requires_grad]
    prompts = [" ".join(f"t{i}" for i in torch.randint(3, args["vocab"], (args["prompt"],), generator=gen).tolist())
               for _ in range(args["batch"])]
    times = []
    if args["what"].startswith("ppo"):
        config = PPOConfig(prompts_per_batch=args["batch"], minibatch_size=args["batch"], ppo_epochs=1,
                           optim=PolicyOptimConfig(lr=1e-5, weight_decay=0.01), critic_optim=CriticOptimConfig(lr=1e-5),
                           generation=GenerationConfig(max_new_tokens=args["response"]), loss=ComponentSpec("ppo_clip"))
        run = PPORun.from_parts(registry, config, policy, tokenizer=tokenizer, reference=reference, critic=critic,
                                rewards=reward, estimator=estimator, shared=shared, fused=args["fused"])
        samples = [run.prompt(text)[0] for text in prompts]
        for _ in range(2):
            t0 = time.perf_counter()
            exp = run.make_experience(samples)
            t1 = time.perf_counter()
            run.update(exp)
            times.append((time.perf_counter() - t0, exp.time_generate, t1 - t0 - exp.time_generate, time.perf_counter() - t1))
        assert int(exp.rollout.mask.sum()) >= args["batch"] * args["response"] * 0.9, "responses ended early"
    else:
        items = []
        for p in prompts:
            ids = tokenizer(p, add_special_tokens=False)["input_ids"]
            response = torch.randint(3, args["vocab"], (args["response"],), generator=gen).tolist()
            items.append({"input_ids": ids + response, "labels": [-100] * len(ids) + response})
        batch = collate_sft(items, 0)
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        cross_entropy = registry.lookup("loss", ComponentSpec("cross_entropy"), "token")
        policy.train()
        for _ in range(2):
            t0 = time.perf_counter()
            loss, _ = sft_loss_terms(policy, batch, cross_entropy, {}, None, args["fused"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append((time.perf_counter() - t0,))
    peak_mb = peak_rss_mb()
    out = {"peak_rss_mb": peak_mb, "seconds": times[-1][0],
           "trainable_params": sum(p.numel() for p in params), "params": sum(p.numel() for p in policy.parameters())}
    if args["what"].startswith("ppo"):
        out.update(generate_s=times[-1][1], score_s=times[-1][2], train_s=times[-1][3])
    return out


def scalar_models(args: dict, policy, tokenizer):
    """(reward, critic, shared) for ``ppo+rm+critic``, loaded from the saved LoRA reward model as the
    PPO stage loads them: whole copies (plain: a fully trained critic; fused+lora: a LoRA critic)
    or adapters + heads on the policy's base (shared)."""
    import torch

    from rlhf_core.config import LoraConfig
    from rlhf_core.models import ScalarHeadModel, SharedBackbone, apply_lora
    from rlhf_plugins.ppo.rewards import RewardModelReward

    source = args["reward_dir"]
    shared = SharedBackbone(policy, LoraConfig(r=16, alpha=32)) if args["shared"] else None
    if shared is not None:
        judge, critic = shared.add("reward", source, trainable=False), shared.add("critic", source, trainable=True)
        shared.seal()
    else:
        judge = ScalarHeadModel.from_pretrained(source).eval().requires_grad_(False)
        critic = ScalarHeadModel.from_pretrained(source)
        if args["lora"]:
            critic.backbone = apply_lora(critic.backbone, LoraConfig(r=16, alpha=32), source, causal_lm=False)
    reward = RewardModelReward.__new__(RewardModelReward)  # the plugin's scoring, without a stage context
    reward.model, reward.tokenizer, reward.device, reward.batch_size = judge, tokenizer, torch.device("cpu"), 64
    return reward, critic, shared


def run(*, hidden: int = 512, layers: int = 2, vocab: int = 128256, prompt: int = 64, response: int = 128,
        batch: int = 8, setups=tuple(SETUPS), critic_setups=tuple(CRITIC_SETUPS), out_dir: str | Path = "bench_out",
        echo=print) -> list[dict]:
    """Every set-up x (ppo, ppo+rm+critic, sft) in its own process; prints the table, writes
    memory.json/png."""
    from .measure import machine

    import tempfile

    rows = []
    echo(f"Llama hidden {hidden}, {layers} layers, vocab {vocab}; batch {batch}, prompts {prompt} + responses "
         f"{response} tokens; fp32 on CPU")
    echo(f"{'stage':<13} {'set-up':<17} {'peak RSS MB':>12} {'vs plain':>9} {'seconds':>8} {'vs plain':>9} "
         f"{'trainable':>11}  generate/score/train s")
    shape = {"hidden": hidden, "layers": layers, "vocab": vocab, "prompt": prompt, "response": response, "batch": batch}
    tmp = tempfile.TemporaryDirectory()
    reward_dir = str(save_reward_model(shape, Path(tmp.name) / "reward")) if critic_setups else ""
    plan = [("ppo", name, SETUPS[name]) for name in setups]
    plan += [("ppo+rm+critic", name, CRITIC_SETUPS[name]) for name in critic_setups]
    plan += [("sft", name, SETUPS[name]) for name in setups]
    base = {}
    for what, name, setup in plan:
        args = {**setup, **shape, "what": what, "reward_dir": reward_dir}
        done = subprocess.run([sys.executable, "-m", "rlhf_bench.memory_usage", json.dumps(args)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{what} {name} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        row = {"stage": what, "setup": name, **result}
        first = base.setdefault(what, row)  # the first set-up of each stage (plain) is the baseline
        row["memory_vs_plain"] = row["peak_rss_mb"] / first["peak_rss_mb"]
        row["time_vs_plain"] = row["seconds"] / first["seconds"]
        rows.append(row)
        split = (f"{row['generate_s']:.1f}/{row['score_s']:.1f}/{row['train_s']:.1f}" if what != "sft" else "")
        echo(f"{what:<13} {name:<17} {row['peak_rss_mb']:>12.0f} {row['memory_vs_plain']:>8.2f}x {row['seconds']:>8.2f} "
             f"{row['time_vs_plain']:>8.2f}x {row['trainable_params']:>11,}  {split}")
    tmp.cleanup()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"machine": machine(), "shape": shape, "rows": rows}, indent=2))
    _plot(rows, out / "memory.png")
    echo(f"wrote {out / 'memory.json'} and {out / 'memory.png'}")
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "peak_rss_mb", "peak RSS MB"), (axes[1], "seconds", "seconds per iteration/step")):
        setups = list(dict.fromkeys(r["setup"] for r in rows))
        stages = list(dict.fromkeys(r["stage"] for r in rows))
        width = 0.8 / len(stages)
        for k, what in enumerate(stages):
            values = [next((r[key] for r in rows if r["stage"] == what and r["setup"] == s), 0) for s in setups]
            ax.bar([i + width * k for i in range(len(setups))], values, width, label=what)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(setups))])
        ax.set_xticklabels(setups, fontsize=8)
        ax.set_ylabel(label + " (lower is better)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # one set-up, in a fresh process: JSON on the last line of stdout
    print(json.dumps(run_one(json.loads(sys.argv[1]))))
