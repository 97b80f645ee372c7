"""One RL iteration of rlhf's PPO stage against one step of TRL's ``GRPOTrainer`` at equal work,
side by side in one run: the same tiny Llama (4 layers, hidden 256, 4 heads of 64, byte vocabulary
384, random weights), 4 prompts x 4 completions x 32 new tokens, a group baseline, k3 KL to a frozen
reference in the loss (beta 0.04), one epoch over one minibatch, AdamW, fp32 on CPU. rlhf runs its
own ``make_experience`` + ``update`` (on-policy: no separate old-log-prob forward) with the ``hf``
engine (Hugging Face ``generate``, and its own decode loop ``loop: rlhf``), with and without
fused-linear, and with the ``vllm`` engine where vLLM is installed. Median seconds per iteration after two warm-up ones.
Both sides keep every activation: TRL's gradient checkpointing (on by default in its configs) is turned
off, as rlhf's is off by default, so that both do the same arithmetic.
Used by ``benchmarks/bench_e2e.py --trl``.

The realistic shape (``--trl --shape realistic``, :func:`run_shapes`): Llama hidden 512, 4 layers, 8
heads of 64, MLP 1376 (8/3 x 512 rounded up to a multiple of 32, Llama's rule), vocabulary 128256
and 32000 (word-level tokenizers over ``t0 ... t{V-1}``), random weights saved once and loaded by
every configuration; 8 prompts of 32 tokens x 8 samples x 128 new tokens; DAPO's loss on both sides:
rlhf ``ppo_clip`` with ``clip_eps_low: 0.2, clip_eps_high: 0.28``, ``loss_agg: token_mean``,
``group_mean`` advantages with ``scale: std``, ``kl.coef: 0`` (no reference); TRL ``GRPOConfig(
loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, scale_rewards="group")``. One epoch
over one minibatch of 64 (both skip the old-log-prob forward), AdamW, grad-norm clip 1, fp32 on
CPU. Every response is exactly 128 tokens on both sides: the tokenizer's EOS is id V, outside the
model's vocabulary, so it is never sampled (nothing is masked or special-cased). Each configuration
runs in a fresh process: median seconds per iteration after warm-up, the split (rlhf: generate /
score / train from its own clocks; TRL: ``transformers.generate`` and ``_prepare_inputs`` from its
profiling contexts), and the peak resident memory (``VmHWM``: the high-water mark of the process's
own memory; ``ru_maxrss`` would also count the parent's, which a vfork-started child inherits).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_core import CheckedGenerator, ComponentSpec, GenerationConfig
from rlhf_core.plugin_system.manager import build_registry, get_plugin_manager
from rlhf_plugins.ppo.advantages import GroupMeanBaseline
from rlhf_plugins.ppo.config import KLConfig, PolicyOptimConfig, PPOConfig
from rlhf_plugins.ppo.run import PPORun
from rlhf_plugins.vllm_engine import VLLMGenerator, vllm_unavailable

from .measure import timed_iteration
from .memory_usage import word_tokenizer

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
    registry = build_registry(get_plugin_manager(entry_points=False))
    policy, tokenizer = _model()
    reference, _ = _model()
    reference.eval().requires_grad_(False)
    # the hf engine with Hugging Face generate, its own decode loop (loop: rlhf), or that loop compiled
    options = {"hf": {"loop": "generate"}, "hf-loop": {"loop": "rlhf", "compile": False},
               "hf-compiled": {"loop": "rlhf", "compile": True}}.get(engine, {})
    config = PPOConfig(prompts_per_batch=4, samples_per_prompt=4, ppo_epochs=1, minibatch_size=16,
                       optim=PolicyOptimConfig(lr=1e-5, weight_decay=0.01), loss=ComponentSpec("ppo_clip"),
                       generation=GenerationConfig(max_new_tokens=32), generator=ComponentSpec("hf", options),
                       kl=KLConfig(coef=0.04, estimator="k3", placement="loss"))
    generator = None
    if engine == "vllm":
        with tempfile.TemporaryDirectory() as tmp:
            ctx = types.SimpleNamespace(device=torch.device("cpu"), seed=0, stage_dir=Path(tmp), name="ppo")
            generator = CheckedGenerator(types.SimpleNamespace(kind="generator", name="vllm", plugin="bench"),
                                         VLLMGenerator(ctx, policy, tokenizer))
    run = PPORun.from_parts(registry, config, policy, tokenizer=tokenizer, reference=reference, generator=generator,
                            rewards=lambda p, r, rows: torch.tensor(reward(p, r)), estimator=GroupMeanBaseline(),
                            fused=fused)
    prompts = [run.prompt(text)[0] for text in PROMPTS]
    times = []
    torch.manual_seed(0)
    for _ in range(steps + 2):
        times.append(timed_iteration(run, prompts)[1]["seconds"])
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
                          dataloader_num_workers=0, seed=0, bf16=False, gradient_checkpointing=False)
        data = Dataset.from_list([{"prompt": p} for p in PROMPTS] * (4 * (steps + 2)))
        trainer = GRPOTrainer(model=str(Path(tmp) / "model"), reward_funcs=reward, args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[Stamp()])
        start = time.perf_counter()
        trainer.train()
    laps = [b - a for a, b in zip([start, *stamps], stamps)]
    return statistics.median(laps[2:])


def run(steps: int = 6, echo=print) -> dict:
    """rlhf (logits path and fused-linear) and TRL, side by side; returns seconds per iteration."""
    out = {"rlhf": rlhf_iteration_seconds(steps, fused=False), "rlhf_fused": rlhf_iteration_seconds(steps, fused=True),
           "rlhf_loop": rlhf_iteration_seconds(steps, fused=False, engine="hf-loop"),
           "rlhf_loop_fused": rlhf_iteration_seconds(steps, fused=True, engine="hf-loop"),
           "rlhf_compiled_fused": rlhf_iteration_seconds(steps, fused=True, engine="hf-compiled")}
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
             + f", {out['trl_grpo'] / out['rlhf_loop_fused']:.2f}x with loop: rlhf + fused-linear"
             + f", {out['trl_grpo'] / out['rlhf_compiled_fused']:.2f}x with the loop compiled + fused-linear"
             + (f", {out['trl_grpo'] / out['rlhf_vllm']:.2f}x with vllm" if "rlhf_vllm" in out else "") + ")")
    return out


# ---------------------------------------------------------------------- the realistic shape, one process each


@dataclass(frozen=True)
class Shape:
    """A Llama policy and one iteration's batch: ``prompts`` x ``samples`` responses of exactly
    ``new_tokens`` tokens after prompts of ``prompt_tokens`` tokens."""

    vocab: int
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    intermediate: int = 1376
    prompts: int = 8
    samples: int = 8
    new_tokens: int = 128
    prompt_tokens: int = 32

    def describe(self) -> str:
        return (f"Llama hidden {self.hidden}, {self.layers} layers, {self.heads} heads, MLP {self.intermediate}, "
                f"vocab {self.vocab}; {self.prompts} prompts of {self.prompt_tokens} tokens x {self.samples} samples "
                f"x {self.new_tokens} new tokens")


#: ``--shape`` of ``bench_e2e.py --trl``: ``small`` checks the script end to end in about a minute.
SHAPES = {
    "realistic": [Shape(vocab=128256), Shape(vocab=32000)],
    "small": [Shape(vocab=32000, prompts=2, samples=4, new_tokens=16, prompt_tokens=8)],
}
#: rlhf's configurations: the ``hf`` generator's loop and ``fused_linear``. ``loop+fused, one-sweep``
#: uses the symmetric clip (0.2) so that ``ppo_clip``'s one-sweep fused kernel runs: not DAPO's
#: loss, so not in the default set.
RLHF_CONFIGS = {
    "rlhf generate": {"loop": "generate", "fused": False, "clip": "dapo"},
    "rlhf generate+fused": {"loop": "generate", "fused": True, "clip": "dapo"},
    "rlhf loop": {"loop": "rlhf", "fused": False, "clip": "dapo"},
    "rlhf loop+fused": {"loop": "rlhf", "fused": True, "clip": "dapo"},
    "rlhf loop+fused, one-sweep": {"loop": "rlhf", "fused": True, "clip": "symmetric"},
    "rlhf compiled+fused": {"loop": "rlhf", "compile": True, "fused": True, "clip": "dapo"},
}
TRL = "trl GRPOTrainer"
DEFAULT_CONFIGS = ("rlhf generate", "rlhf generate+fused", "rlhf loop", "rlhf loop+fused", TRL)


def digit_reward(prompts, completions, **_) -> list[float]:
    """The same cheap rule for both sides: count of the digit 7 in the completion's text."""
    return [float(str(c).count("7")) for c in completions]


def shape_tokenizer(vocab: int):
    """:func:`rlhf_bench.memory_usage.word_tokenizer` (``t0 ... t{vocab-1}``, pad ``t0``) whose EOS
    is one more token, id ``vocab``: outside the model's vocabulary, so never sampled, and every
    response runs to ``max_new_tokens`` on both sides."""
    tokenizer = word_tokenizer(vocab)
    tokenizer.add_special_tokens({"eos_token": "<eos>"})
    assert tokenizer.eos_token_id == vocab
    return tokenizer


def save_llama(shape: Any, tokenizer: Any, directory: Path, max_positions: int = 1024) -> Path:
    """Random Llama weights (seed 0) of ``shape`` (``vocab``, ``hidden``, ``intermediate``,
    ``layers``, ``heads``) and ``tokenizer``, saved once for every configuration of a comparison."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.heads, max_position_embeddings=max_positions, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_policy(shape: Shape, directory: Path) -> Path:
    """:func:`save_llama` with :func:`shape_tokenizer` (EOS outside the vocabulary: never sampled)."""
    return save_llama(shape, shape_tokenizer(shape.vocab), directory)


def shape_prompts(shape: Shape, count: int) -> list[str]:
    """``count`` prompts of exactly ``prompt_tokens`` words (seeded), so no prompt is padded."""
    gen = torch.Generator().manual_seed(1)
    return [" ".join(f"t{i}" for i in torch.randint(3, shape.vocab, (shape.prompt_tokens,), generator=gen).tolist())
            for _ in range(count)]


def fresh_process(module: str, spec: dict) -> tuple[dict | None, str]:
    """``python -m <module> SPEC`` (a benchmark's worker, one configuration) in a fresh process:
    ``(its result, "")`` from the last line it prints, or ``(None, the end of its stderr)``."""
    done = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        return None, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


def process_memory() -> dict[str, int]:
    """This process's resident memory now and its high-water mark, bytes (``/proc/self/status``)."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}


def rlhf_shape_worker(shape: Shape, model_dir: str, setup: dict, warmup: int, steps: int) -> dict:
    """rlhf's ``make_experience`` + ``update`` on ``shape`` (one configuration, this process)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    options = {"clip_eps_low": 0.2, "clip_eps_high": 0.28} if setup["clip"] == "dapo" else {"clip_eps": 0.2}
    registry = build_registry(get_plugin_manager(entry_points=False))
    loss = ComponentSpec("ppo_clip", options)
    entry = registry.lookup("loss", loss, "policy")
    entry.obj.check_options(**entry.with_defaults(options))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = shape.prompts * shape.samples
    config = PPOConfig(prompts_per_batch=shape.prompts, samples_per_prompt=shape.samples, ppo_epochs=1,
                       minibatch_size=batch, optim=PolicyOptimConfig(lr=1e-5, max_grad_norm=1.0, mixed_precision="no"),
                       loss=loss, loss_agg="token_mean", advantage=ComponentSpec("group_mean", {"scale": "std"}),
                       generator=ComponentSpec("hf", {"loop": setup["loop"], "compile": setup.get("compile", False)}),
                       generation=GenerationConfig(max_new_tokens=shape.new_tokens), kl=KLConfig(coef=0.0))
    run = PPORun.from_parts(registry, config, policy, tokenizer=tokenizer, fused=setup["fused"],
                            rewards=lambda p, r, rows: torch.tensor(digit_reward(p, r)),
                            estimator=GroupMeanBaseline(scale="std"))
    prompts = [run.prompt(text)[0] for text in shape_prompts(shape, shape.prompts)]
    setup_rss = process_memory()["rss"]
    torch.manual_seed(0)
    rows = []
    for _ in range(warmup + steps):
        exp, split = timed_iteration(run, prompts)
        rows.append({**split, "tokens": int(exp.rollout.mask.sum())})
    return _summary(rows[warmup:], setup_rss, batch * shape.new_tokens)


def trl_shape_worker(shape: Shape, model_dir: str, warmup: int, steps: int) -> dict:
    """``steps + warmup`` steps of TRL's ``GRPOTrainer`` on ``shape`` (this process); its split from
    its own profiling contexts (``GRPOTrainer.transformers.generate``; ``GRPOTrainer._prepare_inputs``
    = generate + score; the rest of the step is train)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    timings: list[tuple[str, float]] = []
    logged = profiling.ProfilingContext._log_metrics

    def record(self, duration: float) -> None:
        timings.append((self.name, duration))
        logged(self, duration)

    profiling.ProfilingContext._log_metrics = record
    tokens: list[int] = []

    def counted_reward(prompts, completions, completion_ids, **_) -> list[float]:
        tokens.append(sum(len(ids) for ids in completion_ids))  # what the step trains on
        return digit_reward(prompts, completions)

    rows: list[dict] = []
    lap = [0.0]

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            generate = sum(d for name, d in timings if name.endswith(".transformers.generate"))
            prepare = sum(d for name, d in timings if name.endswith("._prepare_inputs"))
            rows.append({"seconds": now - lap[0], "generate": generate, "score": prepare - generate,
                         "train": now - lap[0] - prepare})
            timings.clear()
            lap[0] = now

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = shape.prompts * shape.samples
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(output_dir=tmp, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                          num_generations=shape.samples, max_completion_length=shape.new_tokens, loss_type="dapo",
                          epsilon=0.2, epsilon_high=0.28, beta=0.0, scale_rewards="group", num_iterations=1,
                          mask_truncated_completions=False, learning_rate=1e-5, weight_decay=0.0, max_grad_norm=1.0,
                          max_steps=warmup + steps, logging_steps=10**6, save_strategy="no", report_to=[],
                          use_cpu=True, bf16=False, temperature=1.0, top_p=1.0, top_k=0, dataloader_num_workers=0,
                          seed=0, disable_tqdm=True, gradient_checkpointing=False)
        data = Dataset.from_list([{"prompt": p} for p in shape_prompts(shape, shape.prompts * (warmup + steps))])
        trainer = GRPOTrainer(model=policy, reward_funcs=counted_reward, args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[Stamp()])
        setup_rss = process_memory()["rss"]
        timings.clear()
        lap[0] = time.perf_counter()
        trainer.train()
    for row, count in zip(rows, tokens):
        row["tokens"] = count
    return _summary(rows[warmup:], setup_rss, batch * shape.new_tokens)


def _summary(rows: list[dict], setup_rss: int, expected_tokens: int) -> dict:
    """Median seconds per iteration and split over ``rows`` (the measured iterations), memory and
    the versions of what ran."""
    short = [r["tokens"] for r in rows if r["tokens"] != expected_tokens]
    if short:  # unequal work: a response ended before max_new_tokens
        raise RuntimeError(f"expected {expected_tokens} response tokens per iteration, got {short}")
    return {"seconds_per_iteration": statistics.median(r["seconds"] for r in rows),
            "split": {k: statistics.median(r[k] for r in rows) for k in ("generate", "score", "train")},
            "iterations": rows, "setup_rss_bytes": setup_rss, "peak_rss_bytes": process_memory()["peak"],
            "versions": {name: sys.modules[name].__version__ for name in ("transformers", "trl")
                         if name in sys.modules}}


def _worker(spec: dict) -> dict:
    shape = Shape(**spec["shape"])
    if spec["config"] == TRL:
        return trl_shape_worker(shape, spec["model_dir"], spec["warmup"], spec["steps"])
    return rlhf_shape_worker(shape, spec["model_dir"], RLHF_CONFIGS[spec["config"]], spec["warmup"], spec["steps"])


def run_shapes(shapes: list[Shape], configs=DEFAULT_CONFIGS, warmup: int = 1, steps: int = 3,
               echo=print) -> list[dict]:
    """Each shape x configuration in a fresh process (``python -m rlhf_bench.vs_trl SPEC``), one
    after the other, TRL first; prints a row per configuration as it finishes, with ratios to TRL
    (TRL seconds / these, these peak / TRL peak), and returns the results (what ``bench_e2e.py``
    writes as JSON; a configuration that failed is under ``failed`` with the end of its stderr)."""
    out = []
    for shape in shapes:
        echo(shape.describe() + f"; fp32 on CPU, {torch.get_num_threads()} threads; median of {steps} "
             f"iteration(s) after {warmup} warm-up")
        echo(f"{'configuration':<28} {'s/iter':>8} {'generate':>9} {'score':>7} {'train':>7} {'setup GiB':>10} "
             f"{'peak GiB':>9} {'TRL s/this':>11} {'peak/TRL':>9}")
        results, failed = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = str(save_policy(shape, Path(tmp) / "policy"))
            for name in sorted(configs, key=lambda n: n != TRL):
                spec = {"shape": asdict(shape), "model_dir": model_dir, "config": name, "warmup": warmup,
                        "steps": steps}
                r, error = fresh_process("rlhf_bench.vs_trl", spec)
                if r is None:
                    failed[name] = error
                    echo(f"{name:<28} failed:\n{error}")
                    continue
                results[name] = r
                trl = results.get(TRL)
                ratios = f"{'-':>11} {'-':>9}"
                if trl is not None:
                    r["trl_seconds_over_this"] = trl["seconds_per_iteration"] / r["seconds_per_iteration"]
                    r["peak_over_trl"] = r["peak_rss_bytes"] / trl["peak_rss_bytes"]
                    ratios = f"{r['trl_seconds_over_this']:>10.2f}x {r['peak_over_trl']:>8.2f}x"
                split = r["split"]
                echo(f"{name:<28} {r['seconds_per_iteration']:>8.2f} {split['generate']:>9.2f} "
                     f"{split['score']:>7.2f} {split['train']:>7.2f} {r['setup_rss_bytes'] / 2**30:>10.2f} "
                     f"{r['peak_rss_bytes'] / 2**30:>9.2f} {ratios}")
        out.append({"shape": asdict(shape), "warmup": warmup, "steps": steps, "results": results, "failed": failed})
    return out


if __name__ == "__main__":  # no argument: the tiny comparison; a JSON spec: one configuration, JSON on the last line
    if len(sys.argv) > 1:
        print(json.dumps(_worker(json.loads(sys.argv[1]))))
    else:
        run()
