"""The ``rlhf`` command line: ``rlhf run``, ``rlhf plugins`` and plugin-contributed commands."""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import click
import yaml

from . import distributed as dist_utils
from .config import ComponentSpec, ModelConfig, RunConfig, check_options, coerce, to_plain
from .contracts import build_rewards, reward_fields
from .data import CHAT_TEMPLATE_MODES, Rendering, encode_prompt, load_records, render_prompt
from .doctor import checks, table
from .errors import ConfigError, ModelLoadError, RegistryError, UserError
from .models import check_model_source, is_reward_model_dir, load_causal_lm, load_tokenizer
from .plugin_system.manager import (
    add_modules, build_registry, disabled_from_env, get_plugin_manager, locate_modules, registered_by,
)
from .runtime.context import StageContext
from .runtime.pipeline import plan, preflight, prepare, run_pipeline
from .runtime.resume import check_resumable, refuse_changes
from .runtime.run_dir import RunDir, read_summary
from .runtime.signals import signals_interrupt
from .runtime.tracking import write_summary
from .sampling import evaluate_samples, generate
from .version import __version__

#: Errors a user can fix; shown as one message, not a traceback (RLHF_DEBUG=1 shows the traceback).
USER_ERRORS = (UserError,)


def _user_error(exc: Exception) -> click.ClickException:
    if os.environ.get("RLHF_DEBUG"):
        raise exc
    return click.ClickException(str(exc))


def _plugin_manager(ctx: click.Context, local: tuple[str, ...] = ()):
    """The command's one plugin manager: the one ``main`` built (honouring ``--disable``), else a new
    one; ``local`` (``--plugins``) adds plugin modules or ``.py`` files (relative to the current directory)."""
    if ctx.obj.get("pm") is None:
        ctx.obj["pm"] = get_plugin_manager(disabled=ctx.obj["disabled"])
    return add_modules(ctx.obj["pm"], locate_modules(list(local), Path.cwd())) if local else ctx.obj["pm"]


def _plugins_option(fn):
    """``--plugins``: local plugin modules for a command that has no config (as a config's ``plugins:``)."""
    return click.option("--plugins", "local_plugins", multiple=True, metavar="MODULE_OR_FILE.py",
                        help="Load a local plugin: a module name or a .py file (repeatable), as a config's "
                             "plugins:.")(fn)


def _warn_conflicts(registry) -> None:
    for line in registry.conflicts():
        click.echo(f"rlhf: warning: {line}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rlhf")
@click.option("--disable", "disabled", multiple=True, metavar="NAME",
              help="Disable a plugin by name (repeatable); adds to RLHF_DISABLE_PLUGINS.")
@click.pass_context
def cli(ctx: click.Context, disabled: tuple[str, ...]) -> None:
    """Instruction tuning: SFT -> reward regression -> PPO, with pluggable stages, losses, rewards
    and advantage estimators."""
    ctx.ensure_object(dict)
    ctx.obj["disabled"] = set(disabled) | ctx.obj.get("disabled", set())


@cli.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a config value, e.g. --set stages.sft.train.lr=3e-4 (stages by name or index).")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (default runs/<timestamp>-<suffix>).")
@click.option("--overwrite", is_flag=True,
              help="Replace a previous run in --out: its contents are deleted once validation has passed.")
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")
@click.option("--dry-run", is_flag=True,
              help="Resolve and validate everything (config, plugins, data, models) and print the plan: stages, "
                   "models, data sizes, steps, estimated tokens; nothing trains and no run directory is touched.")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Run on N local processes (launched with torch's own launcher, as torchrun would).")
@click.option("--resume", "resume", type=click.Path(file_okay=False), default=None, metavar="RUN_DIR",
              help="Continue an interrupted run in RUN_DIR from its newest checkpoint (its own config.yaml).")
@click.pass_context
def run(ctx: click.Context, config: str | None, overrides: tuple[str, ...], out: str | None, overwrite: bool,
        print_config: bool, dry_run: bool, nproc: int | None, resume: str | None) -> None:
    """Run the pipeline in CONFIG (YAML); without CONFIG, the embedded default
    (SFT -> reward -> PPO on the builtin letters task with the builtin tiny model).

    Under torchrun (or with --nproc N) every process runs this command; batch sizes stay global.
    --resume RUN_DIR continues a run: finished stages are reused, the interrupted one continues from
    its newest checkpoint, and the final weights are those an uninterrupted run would have."""
    if resume is not None and (out is not None or overwrite):
        raise click.UsageError("--resume continues RUN_DIR in place; do not combine it with --out or --overwrite")
    if nproc is not None and nproc > 1 and not dist_utils.launched_distributed() and not (print_config or dry_run):
        _launch_local(ctx, nproc, config, overrides, out, overwrite, resume)
        return
    if dry_run:
        _dry_run(ctx, config, overrides)
        return
    if not dist_utils.launched_distributed() or print_config:
        _run(ctx, config, overrides, out, overwrite, print_config, resume)
        return
    # One of several processes: errors carry the rank, a failing rank tells the others and exits at
    # once (the launcher then stops the rest), and a clean end leaves the process group together.
    try:
        _run(ctx, config, overrides, out, overwrite, print_config, resume)
    except click.ClickException as exc:
        elsewhere = dist_utils.failure_elsewhere()
        if elsewhere:
            _exit_rank(f"stopped because {elsewhere}", _BYSTANDER_EXIT)
        _exit_rank(exc.format_message(), exc.exit_code)
    except BaseException as exc:
        elsewhere = dist_utils.failure_elsewhere()
        if elsewhere:  # a collective broke because another rank stopped: that rank's error is the cause
            _exit_rank(f"stopped because {elsewhere}", _BYSTANDER_EXIT)
        import traceback  # a bug here: the traceback matters, and the other ranks must not hang

        traceback.print_exc()
        _exit_rank(f"{type(exc).__name__}: {exc}", 1)
    dist_utils.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skips C++ static destructors that can abort after the process group is gone


#: Exit status of a rank that stopped only because another one failed. With one launcher for every
#: rank, 0: the launcher (and a scheduler reading its exit codes) then names the rank that caused the
#: failure, not the ones it took down. With a launcher per node, 1: a node whose ranks all exited 0
#: would count as finished, and its launcher would wait minutes for the lost node at its exit barrier.
_BYSTANDER_EXIT = 0 if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) == dist_utils.planned_world_size() else 1


def _exit_rank(message: str, code: int) -> None:
    """Print this rank's error and leave at once. The first rank to fail reports its error to the
    others (a rank that only stopped because of it exits with ``_BYSTANDER_EXIT``)."""
    text = f"[rank {dist_utils.rank()}] {message}"
    if code != 0:
        dist_utils.report_failure(text)
    click.echo(f"Error: {text}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _dry_run(ctx: click.Context, config, overrides) -> None:
    """``rlhf run --dry-run``: every check ``rlhf run`` makes before training, then the plan."""
    try:
        prepared = prepare(config, list(overrides), pm=_plugin_manager(ctx))
        _warn_conflicts(prepared.registry)
        sizes = preflight(prepared, echo=lambda line: click.echo(line, err=True))
    except USER_ERRORS as exc:
        raise _user_error(exc) from None
    click.echo(plan(prepared, sizes))


def _run(ctx: click.Context, config, overrides, out, overwrite, print_config, resume=None) -> None:
    main_rank = dist_utils.is_main_process()
    echo = click.echo if main_rank else (lambda *a, **k: None)
    try:
        if resume is not None:
            finished = check_resumable(Path(resume))
            if finished:
                echo(finished)
                return
            prepared = prepare(config or str(Path(resume) / "config.yaml"), list(overrides), pm=_plugin_manager(ctx))
            refuse_changes(Path(resume), prepared)
            out = resume
        else:
            prepared = prepare(config, list(overrides), pm=_plugin_manager(ctx))
        if main_rank:
            _warn_conflicts(prepared.registry)
        if print_config:
            click.echo(yaml.safe_dump(to_plain(prepared.config), sort_keys=False), nl=False)
            return
        if dist_utils.launched_distributed():
            dist_utils.init(dist_utils.resolve_device(prepared.config.model.device).type)
            if not main_rank:
                sys.stdout = open(os.devnull, "w")  # one progress log per job: rank 0's
        with signals_interrupt():
            preflight(prepared, echo=lambda line: echo(line, err=True))
            with RunDir(out, overwrite, resume=resume is not None) as run_dir:
                try:
                    run_pipeline(prepared, run_dir.path, echo=echo, resume=resume is not None)
                except KeyboardInterrupt as exc:
                    raise click.ClickException(
                        f"interrupted by {getattr(exc, 'signame', 'SIGINT')}; completed stages, checkpoints and metrics "
                        f"so far are in {run_dir.path} (summary.json status: interrupted); continue with: "
                        f"{resume_command(run_dir.path)}") from None
    except KeyboardInterrupt as exc:
        raise click.ClickException(f"interrupted by {getattr(exc, 'signame', 'SIGINT')} before training started") from None
    except USER_ERRORS as exc:
        raise _user_error(exc) from None


def resume_command(run_dir: Path) -> str:
    """The exact command that continues ``run_dir`` (with ``--nproc N`` when N processes ran it)."""
    world = dist_utils.world_size()
    return f"rlhf run --resume {shlex.quote(str(run_dir))}" + (f" --nproc {world}" if world > 1 else "")


def _launch_local(ctx: click.Context, nproc: int, config, overrides, out, overwrite, resume=None) -> None:
    """``rlhf run ... --nproc N``: the same command on N local processes through torch's launcher."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    args = ["--standalone", "--nnodes", "1", "--nproc_per_node", str(nproc), "--module", "rlhf_core.cli"]
    for name in sorted(ctx.obj.get("disabled", ())):
        args += ["--disable", name]
    args += ["run", *([config] if config else [])]
    for item in overrides:
        args += ["--set", item]
    args += [*(["--out", out] if out else []), *(["--overwrite"] if overwrite else []),
             *(["--resume", resume] if resume else [])]
    try:
        torchrun(parse_args(args))
    except ChildFailedError as exc:
        first, failure = exc.get_first_failure()
        if failure.exitcode < 0:  # ended by a signal before it could say anything (SIGKILL, out of memory)
            killed = f"killed by {failure.signal_name()} (exit code {failure.exitcode})"
            _record_lost_writer(Path(resume or out) if resume or out else None, failure.pid, f"[rank {first}] {killed}")
            raise click.ClickException(f"rank {first} was {killed} and the launcher stopped the other "
                                       "processes") from None
        raise click.ClickException(f"rank {first} failed (exit code {failure.exitcode}) and the launcher stopped the "
                                   f"other processes; its error is printed above") from None


def _record_lost_writer(run_dir: Path | None, pid: int, reason: str) -> None:
    """Rank 0 writes ``summary.json``; when it was the process killed, the summary still says
    ``running`` with its pid: the launcher, which saw it die, records why."""
    summary = read_summary(run_dir) if run_dir is not None else {}
    if summary.get("status") == "running" and summary.get("pid") == pid:
        summary["status"] = f"failed: {reason}"
        write_summary(run_dir, summary)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_plugins_option
@click.pass_context
def plugins(ctx: click.Context, as_json: bool, local_plugins: tuple[str, ...]) -> None:
    """List loaded plugins (name, version, source) and what each registered."""
    try:
        pm = _plugin_manager(ctx, local_plugins)
        registry = build_registry(pm)
    except USER_ERRORS as exc:
        raise _user_error(exc) from None
    _warn_conflicts(registry)
    rows = []
    for name, info in pm.rlhf_info.items():
        row = {"name": name, "version": info.version, "source": info.source}
        if info.error:
            row["error"] = info.error
        else:
            row["registered"] = {k: v for k, v in registered_by(registry, name).items() if v}
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']} {row['version']} ({row['source']})")
        if "error" in row:
            click.echo(f"    FAILED: {row['error']}")
        for kind, names in row.get("registered", {}).items():
            click.echo(f"    {kind}: {', '.join(names)}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool) -> None:
    """What is installed and usable here (torch and CUDA, the Triton and C++ kernels, peft, vLLM,
    datasets, the trackers) and what each missing piece costs."""
    rows = checks()
    if as_json:
        click.echo(json.dumps([row.as_dict() for row in rows], indent=2))
        return
    click.echo(table(rows))


def _sampling_options(fn):
    """The sampling flags ``generate`` and ``eval`` share."""
    for option in reversed([
        click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True)),
        click.option("--top-p", "top_p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True)),
        click.option("--max-new-tokens", "max_new_tokens", default=64, show_default=True, type=click.IntRange(min=1)),
        click.option("--seed", default=0, show_default=True, help="Sampling seed (the same seed gives the same samples)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
    ]):
        fn = option(fn)
    return fn


def _parse_fields(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, str]:
    """``--fields prompt=question,answer=solution`` as ``{"prompt": "question", "answer": "solution"}``."""
    out: dict[str, str] = {}
    if not value:
        return out
    for pair in value.split(","):
        ours, sep, theirs = (part.strip() for part in pair.partition("="))
        if not (sep and ours and theirs):
            raise click.BadParameter(f"expected FIELD=COLUMN pairs separated by commas (e.g. "
                                     f"prompt=question,answer=solution), got {pair.strip()!r}")
        out[ours] = theirs
    return out


def _format_options(fn):
    """The prompt-format flags ``generate`` and ``eval`` share (a stage's ``data.chat_template`` and ``data.fields``)."""
    for option in reversed([
        click.option("--chat-template", "chat_template", type=click.Choice(CHAT_TEMPLATE_MODES), default="auto",
                     show_default=True,
                     help="The tokenizer's chat template: auto = for message-list prompts only (plain text as written, "
                          "with a notice when the model has a template); always = plain text too, as one user message "
                          "(an error for a model without a template); never = no template."),
        click.option("--fields", "fields", callback=_parse_fields, metavar="FIELD=COLUMN,...",
                     help="The prompts file's columns for our fields, e.g. prompt=question,answer=solution (as a "
                          "stage's data.fields)."),
    ]):
        fn = option(fn)
    return fn


def _prompts(texts: tuple[str, ...], path: str | None, registry, tokenizer, seed: int, limit: int | None,
             rendering: Rendering, extra: dict[str, str] | None = None,
             fields: dict[str, str] | None = None) -> tuple[list[str], list[dict]]:
    """The prompts of ``--prompt`` and a prompts file (its columns renamed by ``fields``), rendered as
    ``rendering`` says, and each one's data record (``extra``: the fields a reward reads, which the
    file's records must have)."""
    prompts = [render_prompt(tokenizer, {"prompt": text}, rendering, "--prompt") for text in texts]
    rows: list[dict] = [{} for _ in texts]
    if path:
        records = load_records(path, "prompts", registry, seed=seed, builtin_size=limit or 64, extra=extra,
                               fields=fields)
        prompts += [render_prompt(tokenizer, r.fields, rendering, r.source) for r in records]
        rows += [r.fields for r in records]
    if not prompts:
        raise click.UsageError("give at least one --prompt TEXT or a prompts file")
    return (prompts[:limit], rows[:limit]) if limit else (prompts, rows)


@cli.command("generate")
@click.argument("model_dir")
@click.option("--prompt", "texts", multiple=True, metavar="TEXT", help="A prompt (repeatable).")
@click.option("--file", "path", metavar="FILE", help="Prompts: a .jsonl/.json/.csv/.parquet file of prompt records, or builtin:NAME.")
@click.option("--n", "n", default=1, show_default=True, type=click.IntRange(min=1), help="Samples per prompt.")
@click.option("--limit", type=click.IntRange(min=1), help="Use at most this many prompts.")
@_format_options
@_sampling_options
@_plugins_option
@click.pass_context
def generate_command(ctx: click.Context, model_dir, texts, path, n, limit, chat_template, fields, temperature, top_p,
                     max_new_tokens, seed, device, as_json, local_plugins) -> None:
    """Sample responses from a trained policy (any sft or ppo stage output, or a model directory)."""
    import torch

    try:
        registry = build_registry(_plugin_manager(ctx, local_plugins))
        tokenizer, model, dev = load_policy(model_dir, device)
        rendering = _rendering(chat_template, "rlhf generate", model_dir)
        prompts, _ = _prompts(texts, path, registry, tokenizer, seed, limit, rendering, fields=fields)
        torch.manual_seed(seed)
        roll = generate(model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts for _ in range(n)],
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, device=dev)
    except USER_ERRORS as exc:
        raise _user_error(exc) from None
    rows = [{"prompt": p, "samples": roll.responses[i * n:(i + 1) * n]} for i, p in enumerate(prompts)]
    for row in rows:
        if as_json:
            click.echo(json.dumps(row, ensure_ascii=False))
            continue
        click.echo(f"### {row['prompt']}")
        for sample in row["samples"]:
            click.echo(f"  -> {sample}")


@cli.command("eval")
@click.argument("model_dir")
@click.option("--prompts", "path", required=True, metavar="FILE",
              help="Prompts: a prompt-records file, or builtin:NAME.")
@click.option("--reward", "reward", required=True, metavar="SPEC",
              help="A registered reward: a name, or YAML such as '{name: reward_model, path: runs/x/reward}'.")
@click.option("--gold", "gold", metavar="SPEC", help="A second judge reported beside the reward (e.g. letters_gold).")
@click.option("--limit", type=click.IntRange(min=1), help="Use at most this many prompts.")
@_format_options
@_sampling_options
@_plugins_option
@click.pass_context
def eval_command(ctx: click.Context, model_dir, path, reward, gold, limit, chat_template, fields, temperature, top_p,
                 max_new_tokens, seed, device, as_json, local_plugins) -> None:
    """Mean reward (and gold score) of one sample per prompt: the numbers PPO's evaluation reports
    (the same function, the same seed gives the same samples)."""
    try:
        registry = build_registry(_plugin_manager(ctx, local_plugins))
        problems: list[str] = []
        specs = {}
        for name, text in (("reward", reward), ("gold", gold)):
            if text is None:
                continue
            spec = coerce(ComponentSpec, yaml.safe_load(text), f"--{name}", problems)
            if spec is not None:
                try:
                    check_options(registry.lookup("reward", spec), spec, f"--{name}", problems)
                    specs[name] = spec
                except RegistryError as exc:
                    problems.append(f"--{name}: {exc}")
        if problems:
            raise ConfigError(problems, "command line")
        tokenizer, model, dev = load_policy(model_dir, device)
        stage_ctx = StageContext(name="eval", stage_dir=Path(model_dir), registry=registry, tracker=None, device=dev,
                                 run_config=RunConfig(model=ModelConfig(name_or_path=model_dir, device=device)),
                                 seed=seed, results={})
        entries = {name: registry.lookup("reward", spec) for name, spec in specs.items()}
        extra = {field: f"--{name} {spec.name!r}" for name, spec in specs.items()
                 for field in reward_fields(entries[name], spec.options)}
        prompts, rows = _prompts((), path, registry, tokenizer, seed, limit, _rendering(chat_template, "rlhf eval", model_dir),
                                 extra, fields)
        judges = {name: build_rewards(stage_ctx, spec) for name, spec in specs.items()}
        result = evaluate_samples(model, tokenizer, prompts, judges, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, device=dev, seed=seed, rows=rows)
    except (USER_ERRORS + (yaml.YAMLError,)) as exc:
        raise _user_error(exc) from None
    result["prompts"] = len(prompts)
    if as_json:
        click.echo(json.dumps(result))
        return
    for key, value in result.items():
        click.echo(f"{key:<10} {value:.4f}" if isinstance(value, float) else f"{key:<10} {value}")


def _rendering(chat_template: str, where: str, model_dir: str) -> Rendering:
    """How ``generate`` / ``eval`` render prompts: ``--chat-template``, its notice on stderr."""
    return Rendering(chat_template, where, model_dir, option="--chat-template", echo=lambda line: click.echo(line, err=True))


def load_policy(model_dir: str, device: str):
    """``(tokenizer, causal LM in eval mode, device)`` for a policy directory (or builtin:tiny)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    problem = check_model_source(model_dir)
    if problem:
        raise ModelLoadError(problem)
    if is_reward_model_dir(model_dir):
        raise ModelLoadError(f"{model_dir} is a reward model; sample from a policy (an sft or ppo stage output)")
    dev = dist_utils.resolve_device(device)
    cfg = ModelConfig(name_or_path=model_dir, device=device)
    return load_tokenizer(cfg), load_causal_lm(cfg).to(dev).eval(), dev


def disabled_from_argv(argv: list[str]) -> set[str]:
    """The ``--disable NAME`` / ``--disable=NAME`` options given before the subcommand."""
    out: set[str] = set()
    for i, arg in enumerate(argv):
        if arg == "--disable" and i + 1 < len(argv):
            out.add(argv[i + 1])
        elif arg.startswith("--disable="):
            out.add(arg.split("=", 1)[1])
        elif not arg.startswith("-") and (i == 0 or argv[i - 1] != "--disable"):
            break  # the subcommand: later options are its own
    return out


def main() -> None:
    """Console entry point: loads plugins once (honouring ``--disable``), lets them add commands,
    and hands the same manager to the command that runs."""
    disabled = disabled_from_env() | disabled_from_argv(sys.argv[1:])
    try:
        pm = get_plugin_manager(disabled=disabled)
        pm.hook.rlhf_register_commands(cli=cli)
    except USER_ERRORS as exc:
        click.echo(f"rlhf: error: {exc}", err=True)
        sys.exit(1)
    cli(obj={"pm": pm, "disabled": disabled})


if __name__ == "__main__":
    main()
