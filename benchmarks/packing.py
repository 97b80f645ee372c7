"""SFT on long-tailed lengths, padded against packed, and against TRL's ``SFTTrainer``: one epoch of
the same examples in each configuration, each in a fresh process, side by side in one run.

The data: ``examples`` prompt/completion records whose total lengths follow a log-normal
distribution (median 64 tokens, 99th percentile 1024, capped at 2048; seeded), a quarter of each
the prompt (word tokens ``t3 ...`` of a word-level tokenizer, so lengths are exact); the loss is
on the completion. The model: a random Llama (seed 0, fp32) of hidden 256, 4 layers, 4 heads,
vocabulary 384 by default (``--vocab``). Configurations:

- ``rlhf padded``: the ``sft`` stage's pieces (tokenising, the seeded loader, ``Trainer``, the
  fused-linear loss), ``batch_size`` examples a step, each padded to the batch's longest;
- ``rlhf packed``: the same steps with ``data.packing`` (same examples per step, no pads);
- ``rlhf packed+budget``: ``data.packing`` and ``train.max_tokens_per_batch`` = ``max_length``;
- ``trl padded``: ``SFTTrainer`` with ``batch_size`` examples a step;
- ``trl packed``: ``SFTTrainer`` with ``packing=True`` (best-fit decreasing into ``max_length``-token
  rows, padding-free position ids), one row a step.

Both sides keep every activation (TRL's configs turn gradient checkpointing on by default; it is
off here, as in rlhf, so that both do the same arithmetic).

Tokens per second count real tokens (prompt and completion, no pads) over the whole epoch, from
the first step's start to the last step's end; the peak is the resident memory's high-water mark
during training (``VmHWM`` reset after set-up).

    python benchmarks/bench_packing.py [--examples 160] [--vocab 384] [--config NAME ...]
    rlhf bench packing ...
"""
from __future__ import annotations

import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import rlhf_core  # noqa: F401  (first: from a source checkout, keeps Hugging Face's `kernels` importable)

from .memory_usage import word_tokenizer
from .vs_trl import fresh_process, process_memory, save_llama
from .vs_trl_dpo import reset_peak


@dataclass
class PackingShape:
    """The model and the data of the comparison."""

    vocab: int = 384
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 688
    examples: int = 160
    median: int = 64
    p99: int = 1024
    max_length: int = 2048
    batch_size: int = 16

    def lengths(self) -> list[int]:
        """Seeded log-normal example lengths (at least 4 tokens, at most ``max_length``)."""
        rng = random.Random(0)
        sigma = math.log(self.p99 / self.median) / 2.3263  # the normal's 99th percentile is 2.3263 sigma
        return [max(4, min(self.max_length, round(self.median * math.exp(sigma * rng.gauss(0.0, 1.0)))))
                for _ in range(self.examples)]

    def describe(self) -> str:
        lengths = sorted(self.lengths())
        return (f"Llama hidden {self.hidden}, {self.layers} layers, vocab {self.vocab}; {self.examples} examples, "
                f"{sum(lengths)} tokens (median {lengths[len(lengths) // 2]}, max {lengths[-1]}); "
                f"padded batches of {self.batch_size}")


CONFIGS = ("rlhf padded", "rlhf packed", "rlhf packed+budget", "trl padded", "trl packed")
BASELINE = "rlhf padded"


def records(shape: PackingShape) -> list[dict]:
    """Prompt/completion records of :meth:`PackingShape.lengths` tokens each (EOS included)."""
    gen = torch.Generator().manual_seed(1)
    # Words that do not start with a special token's text (t0 pad, t1 EOS, t2 unknown): the tokenizer
    # would split "t15" into "t1" and an unknown "5".
    plain = torch.tensor([i for i in range(3, shape.vocab) if str(i)[0] not in "012"])

    def words(n: int) -> str:
        return " ".join(f"t{i}" for i in plain[torch.randint(0, len(plain), (n,), generator=gen)].tolist())

    out = []
    for n in shape.lengths():
        prompt = max(1, n // 4)
        out.append({"prompt": words(prompt), "completion": words(n - prompt - 1)})
    return out


class _Stamps:
    """A tracker for ``Trainer``: the time of every logged step."""

    def __init__(self):
        self.times: list[float] = []

    def log(self, step: int, metrics: dict) -> None:
        self.times.append(time.perf_counter())


def rlhf_worker(shape: PackingShape, model_dir: str, packing: bool, budget: bool) -> dict:
    """The ``sft`` stage's pieces for one epoch (this process)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from rlhf_core.config import TrainConfig
    from rlhf_core.data import Record, collate_sft, tokenize_sft
    from rlhf_core.data.collate import shift_labels
    from rlhf_core.training import Trainer, make_loader, total_steps
    from rlhf_core.plugin_system.manager import build_registry, get_plugin_manager
    from rlhf_plugins.sft import sft_loss_terms

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    recs = [Record(f"example {i}", r) for i, r in enumerate(records(shape))]
    items, _ = tokenize_sft(recs, tokenizer, shape.max_length, shape.max_length - 1)
    assert [len(it["input_ids"]) for it in items] == shape.lengths()
    cfg = TrainConfig(lr=1e-4, batch_size=shape.batch_size, epochs=1.0, log_every=1, mixed_precision="no",
                      max_tokens_per_batch=shape.max_length if budget else None)
    loader = make_loader(items, cfg.batch_size, lambda b: collate_sft(b, tokenizer.pad_token_id), 0,
                         max_tokens=cfg.max_tokens_per_batch)
    steps = total_steps(cfg, loader)
    stamps = _Stamps()
    trainer = Trainer(model, cfg, torch.device("cpu"), stamps, "sft", packing=packing)

    cross_entropy = build_registry(get_plugin_manager(entry_points=False)).get("loss", "cross_entropy")

    def compute_loss(batch):
        return sft_loss_terms(model, batch, cross_entropy, {}, None, True, packing)

    def count(batch):
        return float((shift_labels(batch["labels"]) != -100).sum())

    reset_peak()
    started = time.perf_counter()
    summary = trainer.fit(loader, compute_loss, None, steps, count)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "steps": steps, "tokens": sum(shape.lengths()), "peak_rss_bytes": process_memory()["peak"],
            "loss": summary["train_loss"], "packing_efficiency": summary.get("train_packing_efficiency")}


def trl_worker(shape: PackingShape, model_dir: str, packing: bool) -> dict:
    """TRL's ``SFTTrainer`` for one epoch (this process)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    span = [0.0, 0.0]

    class Stamp(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            reset_peak()
            span[0] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            span[1] = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, per_device_train_batch_size=1 if packing else shape.batch_size,
                         gradient_accumulation_steps=1, max_length=shape.max_length, packing=packing,
                         learning_rate=1e-4, max_grad_norm=1.0, num_train_epochs=1, logging_steps=10**6,
                         save_strategy="no", report_to=[], use_cpu=True, bf16=False, dataloader_num_workers=0,
                         seed=0, disable_tqdm=True, gradient_checkpointing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records(shape)),
                             processing_class=tokenizer, callbacks=[Stamp()])
        out = trainer.train()
        steps = trainer.state.global_step
    import transformers
    import trl

    return {"seconds": span[1] - span[0], "steps": steps, "tokens": sum(shape.lengths()),
            "peak_rss_bytes": process_memory()["peak"], "loss": out.training_loss,
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__}}


def _worker(spec: dict) -> dict:
    shape, config, model_dir = PackingShape(**spec["shape"]), spec["config"], spec["model_dir"]
    if config.startswith("trl"):
        return trl_worker(shape, model_dir, config == "trl packed")
    return rlhf_worker(shape, model_dir, config != "rlhf padded", config == "rlhf packed+budget")


def run(shape: PackingShape = PackingShape(), configs=CONFIGS, repeats: int = 2, echo=print) -> dict:
    """Each configuration in a fresh process (``python -m rlhf_bench.packing SPEC``), ``repeats``
    rounds over all of them (the fastest epoch of each counts: a process started right after one that
    freed gigabytes can run a third slower), then one row each with tokens per second and its ratios
    to ``rlhf padded`` and to ``trl packed``."""
    echo(shape.describe() + f"; fp32 on CPU, {torch.get_num_threads()} threads; one epoch each, the fastest of "
         f"{repeats}")
    runs: dict[str, list[dict]] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(save_llama(shape, word_tokenizer(shape.vocab), Path(tmp) / "model",
                                   max_positions=shape.max_length))
        for round_ in range(repeats):
            for name in configs:
                if name in failed:
                    continue
                echo(f"round {round_ + 1}: {name} ...")
                r, error = fresh_process("rlhf_bench.packing", {"shape": asdict(shape), "model_dir": model_dir,
                                                                "config": name})
                if r is None:
                    failed[name] = error
                    echo(f"{name} failed:\n{error}")
                    continue
                runs.setdefault(name, []).append(r)
    results = {}
    for name, rs in runs.items():  # the fastest epoch counts; every epoch's seconds are kept
        results[name] = {**min(rs, key=lambda r: r["seconds"]), "all_seconds": [r["seconds"] for r in rs]}
        results[name]["tokens_per_s"] = results[name]["tokens"] / results[name]["seconds"]
    echo(f"{'configuration':<20} {'steps':>5} {'seconds':>8} {'tokens/s':>9} {'peak GiB':>9} {'vs padded':>10} "
         f"{'vs trl packed':>14}")
    for name, r in results.items():
        ratios = []
        for other in (BASELINE, "trl packed"):
            key = f"over_{other.replace(' ', '_')}"
            if other in results and other != name:
                r[key] = r["tokens_per_s"] / results[other]["tokens_per_s"]
            ratios.append(f"{r[key]:.2f}x" if key in r else "-")
        echo(f"{name:<20} {r['steps']:>5} {r['seconds']:>8.1f} {r['tokens_per_s']:>9.0f} "
             f"{r['peak_rss_bytes'] / 2**30:>9.2f} {ratios[0]:>10} {ratios[1]:>14}")
    return {"shape": asdict(shape), "repeats": repeats, "results": results, "failed": failed}


def save(result: dict, extra: dict, out: str | Path) -> list[Path]:
    """``packing.json`` and ``packing.png`` (tokens per second per configuration) under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "packing.json"
    path.write_text(json.dumps({**extra, **result}, indent=2))
    names = list(result["results"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(names, [result["results"][n]["tokens_per_s"] for n in names], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("real tokens per second (higher is better)")
    ax.set_title("SFT on long-tailed lengths: padded vs packed", fontsize=10)
    fig.tight_layout()
    png = out / "packing.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [path, png]


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
