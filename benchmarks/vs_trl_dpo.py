"""One DPO step of rlhf's ``dpo`` stage against one step of TRL's ``DPOTrainer``, side by side in one
run, each configuration in a fresh process: a Llama of hidden 512, 2 layers, 8 heads of 64, MLP
1376, vocabulary 128256 (a word-level tokenizer over ``t0 ... t{V-1}``), random weights saved once;
8 pairs whose prompt is 64 tokens and whose chosen and rejected responses are 191 tokens plus EOS
(256 tokens a sequence); the sigmoid (DPO) loss with beta 0.1; the reference log-probs precomputed
before training on both sides (TRL ``precompute_ref_log_probs=True``; rlhf's default without
LoRA), so neither keeps a reference model in memory; no gradient checkpointing on either side (TRL's
configs turn it on by default; off here, as in rlhf); AdamW at lr 1e-6, grad-norm clip 1; fp32 on
CPU. Median seconds per optimizer step after warm-up, and the peak resident memory of the steps
(``VmHWM`` after the set-up and the reference pass, reset through ``/proc/self/clear_refs``).

    python benchmarks/bench_dpo.py [--steps 3] [--warmup 1] [--config NAME ...]   (TRL: pip install trl)
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import rlhf_core  # noqa: F401  (first: from a source checkout, keeps Hugging Face's `kernels` importable)

from .memory_usage import word_tokenizer
from .vs_trl import fresh_process, process_memory, save_llama


@dataclass
class DPOShape:
    """A Llama policy and one step's batch: ``pairs`` x (prompt ``prompt_tokens`` + response ``response_tokens``)."""

    vocab: int = 128256
    hidden: int = 512
    layers: int = 2
    heads: int = 8
    intermediate: int = 1376
    pairs: int = 8
    prompt_tokens: int = 64
    response_tokens: int = 192  # EOS included

    def describe(self) -> str:
        return (f"Llama hidden {self.hidden}, {self.layers} layers, vocab {self.vocab}; {self.pairs} pairs x "
                f"{self.prompt_tokens + self.response_tokens} tokens (prompt {self.prompt_tokens})")


RLHF = {"rlhf dpo (fused)": True, "rlhf dpo (logits)": False}
TRL = "trl DPOTrainer"
CONFIGS = (TRL, *RLHF)


def save_policy(shape: DPOShape, directory: Path) -> Path:
    """:func:`rlhf_bench.vs_trl.save_llama` with the word tokenizer (EOS ``t1``)."""
    return save_llama(shape, word_tokenizer(shape.vocab), directory)


def pairs(shape: DPOShape, count: int) -> list[dict]:
    """``count`` records of exact lengths (seeded words, none special): prompt, chosen, rejected."""
    gen = torch.Generator().manual_seed(1)

    def words(n: int) -> str:
        return " ".join(f"t{i}" for i in torch.randint(3, shape.vocab, (n,), generator=gen).tolist())

    body = shape.response_tokens - 1  # + EOS
    return [{"prompt": words(shape.prompt_tokens), "chosen": words(body), "rejected": words(body)} for _ in range(count)]


def reset_peak() -> None:
    """Start the peak resident memory (``VmHWM``) again from the current size."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def rlhf_worker(shape: DPOShape, model_dir: str, fused: bool, warmup: int, steps: int) -> dict:
    """The ``dpo`` stage's own pieces: tokenising, the precomputed reference (a frozen copy, freed),
    one forward for both sides, the registered ``sigmoid`` loss, AdamW (this process)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from rlhf_core.data import Record, tokenize_scored
    from rlhf_plugins.preference.losses import dpo_loss
    from rlhf_plugins.preference.stage import SIDES, collate_pairs, pair_logprobs, precompute_reference, preference_inputs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    records = [Record(f"pair {i}", r) for i, r in enumerate(pairs(shape, shape.pairs * (warmup + steps)))]
    items, _ = tokenize_scored(records, tokenizer, shape.prompt_tokens + shape.response_tokens, None, SIDES)
    assert all(len(it["chosen_ids"]) == shape.prompt_tokens + shape.response_tokens for it in items)
    reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    started = time.perf_counter()
    precompute_reference(reference, [items], tokenizer.pad_token_id, shape.pairs, None, fused)
    reference_seconds = time.perf_counter() - started
    del reference
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.0)
    policy.train()
    setup_rss = process_memory()["rss"]
    reset_peak()
    rows = []
    for step in range(warmup + steps):
        batch = collate_pairs(items[step * shape.pairs:(step + 1) * shape.pairs], tokenizer.pad_token_id)
        t0 = time.perf_counter()
        logps, tokens = pair_logprobs(policy, batch, None, fused)
        loss, _ = dpo_loss(preference_inputs(logps, tokens, batch["ref_logps"]), beta=0.1)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rows.append(time.perf_counter() - t0)
    return {"seconds_per_step": statistics.median(rows[warmup:]), "steps": rows, "setup_rss_bytes": setup_rss,
            "peak_rss_bytes": process_memory()["peak"], "reference_seconds": reference_seconds}


def trl_worker(shape: DPOShape, model_dir: str, warmup: int, steps: int) -> dict:
    """TRL's ``DPOTrainer`` on the same data (this process): seconds per optimizer step from a
    callback, after its own reference pass."""
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows: list[float] = []
    lap = [0.0]

    class Stamp(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # after the reference pass
            reset_peak()
            lap[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            rows.append(now - lap[0])
            lap[0] = now

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=shape.pairs, gradient_accumulation_steps=1,
                         loss_type=["sigmoid"], beta=0.1, precompute_ref_log_probs=True,
                         max_length=shape.prompt_tokens + shape.response_tokens, learning_rate=1e-6,
                         weight_decay=0.0, max_grad_norm=1.0, max_steps=warmup + steps, logging_steps=10**6,
                         save_strategy="no", report_to=[], use_cpu=True, bf16=False, dataloader_num_workers=0,
                         seed=0, disable_tqdm=True, disable_dropout=True, gradient_checkpointing=False)
        data = Dataset.from_list(pairs(shape, shape.pairs * (warmup + steps)))
        trainer = DPOTrainer(model=policy, args=args, train_dataset=data, processing_class=tokenizer,
                             callbacks=[Stamp()])
        setup_rss = process_memory()["rss"]
        trainer.train()
    import trl
    import transformers

    return {"seconds_per_step": statistics.median(rows[warmup:]), "steps": rows, "setup_rss_bytes": setup_rss,
            "peak_rss_bytes": process_memory()["peak"], "versions": {"trl": trl.__version__,
                                                              "transformers": transformers.__version__}}


def _worker(spec: dict) -> dict:
    shape = DPOShape(**spec["shape"])
    if spec["config"] == TRL:
        return trl_worker(shape, spec["model_dir"], spec["warmup"], spec["steps"])
    return rlhf_worker(shape, spec["model_dir"], RLHF[spec["config"]], spec["warmup"], spec["steps"])


def run(shape: DPOShape = DPOShape(), configs=CONFIGS, warmup: int = 1, steps: int = 3, echo=print) -> dict:
    """Each configuration in a fresh process (``python -m rlhf_bench.vs_trl_dpo SPEC``), TRL first;
    prints one row each with the ratios to TRL (TRL seconds / these; these peak / TRL peak)."""
    echo(shape.describe() + f"; fp32 on CPU, {torch.get_num_threads()} threads; median of {steps} step(s) after "
         f"{warmup} warm-up")
    echo(f"{'configuration':<20} {'s/step':>8} {'setup GiB':>10} {'peak GiB':>9} {'TRL s/this':>11} {'peak/TRL':>9}")
    results, failed = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(save_policy(shape, Path(tmp) / "policy"))
        for name in sorted(configs, key=lambda n: n != TRL):
            spec = {"shape": asdict(shape), "model_dir": model_dir, "config": name, "warmup": warmup, "steps": steps}
            r, error = fresh_process("rlhf_bench.vs_trl_dpo", spec)
            if r is None:
                failed[name] = error
                echo(f"{name:<20} failed:\n{error}")
                continue
            results[name] = r
            trl = results.get(TRL)
            ratios = f"{'-':>11} {'-':>9}"
            if trl is not None and name != TRL:
                r["trl_seconds_over_this"] = trl["seconds_per_step"] / r["seconds_per_step"]
                r["peak_over_trl"] = r["peak_rss_bytes"] / trl["peak_rss_bytes"]
                ratios = f"{r['trl_seconds_over_this']:>10.2f}x {r['peak_over_trl']:>8.2f}x"
            echo(f"{name:<20} {r['seconds_per_step']:>8.2f} {r['setup_rss_bytes'] / 2**30:>10.2f} "
                 f"{r['peak_rss_bytes'] / 2**30:>9.2f} {ratios}")
    return {"shape": asdict(shape), "warmup": warmup, "steps": steps, "results": results, "failed": failed}


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
