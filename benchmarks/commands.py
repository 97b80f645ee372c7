"""The built-in ``bench`` plugin: adds ``rlhf bench ...`` through the project's own
``rlhf_register_commands`` hook (``rlhf --disable bench`` leaves it out)."""
from __future__ import annotations

import click

from rlhf_core import hookimpl


@click.group()
def bench() -> None:
    """Benchmarks (never part of the test suite): table, JSON and PNG under --out."""


@bench.command("kernels")
@click.option("--shape", "shapes", multiple=True, metavar="NxV",
              help="Logits shape (repeatable). Default: 4096x32000, 2048x128256, 1024x151936.")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float32", "bfloat16"]), help="Default: both.")
@click.option("--op", "ops", multiple=True, type=click.Choice(["token_logprobs", "cross_entropy", "ppo_clip_loss"]))
@click.option("--backend", "backends", multiple=True, type=click.Choice(["triton", "cpp"]))
@click.option("--repeats", default=5, show_default=True)
@click.option("--no-compile", is_flag=True, help="Skip the torch.compile baseline (slow to compile on CPU).")
@click.option("--device", default=None, help="cuda when available, else cpu.")
@click.option("--out", default="bench_out", show_default=True, type=click.Path(file_okay=False))
def bench_kernels(shapes, dtypes, ops, backends, repeats, no_compile, device, out) -> None:
    """Time every op x backend against PyTorch eager and torch.compile; table, JSON and PNG."""
    import torch

    from . import kernel_timing as kbench

    try:
        parsed = [tuple(int(x) for x in s.lower().split("x")) for s in shapes] or [(4096, 32000), (2048, 128256), (1024, 151936)]
    except ValueError:
        raise click.BadParameter("shapes look like 4096x32000", param_hint="--shape") from None
    torch_dtypes = [getattr(torch, d) for d in (dtypes or ("float32", "bfloat16"))]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    click.echo(kbench.header())
    kbench.run(parsed, torch_dtypes, ops=ops or kbench.OPS, backends=backends or None, repeats=repeats,
               compile_baseline=not no_compile, device=device, out_dir=out, echo=click.echo)


@bench.command("memory")
@click.option("--hidden", default=512, show_default=True, help="Hidden size of the Llama config.")
@click.option("--layers", default=2, show_default=True)
@click.option("--vocab", default=128256, show_default=True)
@click.option("--prompt", default=64, show_default=True, help="Prompt tokens.")
@click.option("--response", default=128, show_default=True, help="Response tokens.")
@click.option("--batch", default=8, show_default=True)
@click.option("--setup", "setups", multiple=True, type=click.Choice(["plain", "fused", "fused+lora", "fused+lora+gc"]),
              help="Default: all four.")
@click.option("--critic-setup", "critic_setups", multiple=True,
              type=click.Choice(["plain", "fused+lora", "fused+lora+shared", "none"]),
              help="PPO with a reward model and a GAE critic; default: all three ('none' skips it).")
@click.option("--out", default="bench_out", show_default=True, type=click.Path(file_okay=False))
def bench_memory(hidden, layers, vocab, prompt, response, batch, setups, critic_setups, out) -> None:
    """Peak RSS and time of one PPO iteration and one SFT step: plain vs fused-linear vs + LoRA vs
    + gradient checkpointing; and of a PPO iteration with reward model and critic: plain vs
    fused + LoRA (own copies) vs + one shared frozen base. Each in its own process; table, JSON, PNG."""
    from . import memory_usage as memory

    memory.run(hidden=hidden, layers=layers, vocab=vocab, prompt=prompt, response=response, batch=batch,
               setups=setups or tuple(memory.SETUPS),
               critic_setups=tuple(c for c in critic_setups if c != "none") if critic_setups else tuple(memory.CRITIC_SETUPS),
               out_dir=out, echo=click.echo)


@bench.command("rollout")
@click.option("--small-only", "--tiny-only", "small_only", is_flag=True,
              help="Skip the larger model (hidden 512, 4 layers, vocab 32000).")
@click.option("--engine", "engines", multiple=True, type=click.Choice(["hf", "hf-forward", "hf-loop", "hf-compiled", "vllm"]),
              help="Engines to compare (repeatable; the first is the 'vs hf' base). Default: all.")
@click.option("--out", default="bench_out", show_default=True, type=click.Path(file_okay=False))
def bench_rollout(small_only, engines, out) -> None:
    """Generated tokens/s of the hf engine's decode loops and the vllm engine, each beside its floor
    (FLOPs per step over the matrix-product rate measured now), and one PPO iteration's split."""
    from . import rollout_speed as rollout

    rollout.run(out_dir=out, echo=click.echo, larger=not small_only, **({"engines": engines} if engines else {}))


@bench.command("algorithms")
@click.option("--algorithm", "algorithms", multiple=True, metavar="NAME[=YAML]",
              help="A built-in recipe (grpo, dr_grpo, dapo, gspo, cispo, rloo, reinforce_pp, ppo_gae) or NAME={ppo "
                   "stage keys} for a plugin's loss or estimator (repeatable). Default: every built-in.")
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(min=1), help="Seeds 0..N-1 per algorithm.")
@click.option("--iterations", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--samples", "samples_per_iteration", default=256, show_default=True, type=click.IntRange(min=8),
              help="Responses sampled per iteration (a multiple of 8), the same for every algorithm.")
@click.option("--eval-every", default=25, show_default=True, type=click.IntRange(min=1))
@click.option("--out", default="bench_out", show_default=True, type=click.Path(file_okay=False))
def bench_algorithms(algorithms, seeds, iterations, samples_per_iteration, eval_every, out) -> None:
    """Every RL algorithm on builtin:arith: the same sample budget, seeds and SFT warm-up; held-out
    accuracy (mean +- std over seeds), reward, KL, response length and wall time; JSON and PNG."""
    from . import algorithms as algos

    try:
        algos.run(list(algorithms or algos.BUILT_IN), list(range(seeds)), iterations=iterations,
                  samples_per_iteration=samples_per_iteration, eval_every=eval_every, out_dir=out, echo=click.echo)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@bench.command("packing")
@click.option("--examples", default=160, show_default=True, type=click.IntRange(min=16),
              help="Examples in the epoch each configuration trains on.")
@click.option("--vocab", default=384, show_default=True, type=click.IntRange(min=16))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Examples per padded (and per packed) step.")
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(min=1),
              help="Rounds over the configurations; the fastest epoch of each counts.")
@click.option("--config", "configs", multiple=True, type=click.Choice(["rlhf padded", "rlhf packed",
              "rlhf packed+budget", "trl padded", "trl packed"]), help="Default: all (the trl ones need `pip install trl`).")
@click.option("--out", default="bench_out", show_default=True, type=click.Path(file_okay=False))
def bench_packing(examples, vocab, batch_size, repeats, configs, out) -> None:
    """SFT on long-tailed lengths (log-normal, median 64, p99 1024, cap 2048): padded vs packed vs
    packed with token-budget batches, and TRL's SFTTrainer padded and packed; tokens/s, peak memory
    and ratios, each configuration in its own process; table, JSON and PNG."""
    from . import packing as bench_packing_
    from .measure import machine

    shape = bench_packing_.PackingShape(vocab=vocab, examples=examples, batch_size=batch_size)
    result = bench_packing_.run(shape, configs or bench_packing_.CONFIGS, repeats, echo=click.echo)
    written = bench_packing_.save(result, {"machine": machine()}, out)
    click.echo(f"wrote {', '.join(str(p) for p in written)}")


@hookimpl
def rlhf_register_commands(cli):
    cli.add_command(bench)
