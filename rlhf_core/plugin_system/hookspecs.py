"""Every ``rlhf_*`` hook. Each docstring is the contract a plugin implements.

Registration hooks receive a host-built ``register`` callback, so the host owns validation,
duplicate detection and error messages. They all fire once, when the registry is built (at the
start of ``rlhf run``, ``rlhf plugins`` and friends), in plugin registration order: built-ins
first, then entry points, then ``plugins:`` modules from the config. Plugins load once per command.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("rlhf")
hookimpl = pluggy.HookimplMarker("rlhf")


@hookspec
def rlhf_register_stages(register):
    """Register pipeline stages.

    :param register: ``register(name, stage_class)``. ``stage_class`` follows
        :class:`rlhf_core.contracts.Stage`: a ``config_class`` dataclass for its options (an
        optional ``problems()`` method checks values), ``components(config)``, optional
        ``validate(config, registry)`` and ``inputs(config, registry)`` (data and models the host
        checks before the first stage trains), and ``run(ctx, config) -> StageResult``. The name is
        what a pipeline's ``stage:`` key selects.
    :return: nothing; call ``register`` once per stage.
    """


@hookspec
def rlhf_register_losses(register):
    """Register losses.

    :param register: ``register(name, fn, *, family)`` where ``family`` says which stages can use
        it and therefore its call signature (see :mod:`rlhf_core.contracts`): ``"token"``
        (``fn(logits [B,T,V], labels [B,T], *, backend, **options)``), ``"score"``
        (``fn(pred [B], target [B], **options)``), ``"pairwise"`` (``fn(chosen [B], rejected [B],
        **options)``) or ``"policy"`` (``fn(inputs: PolicyLossInputs, **options)`` on per-token
        log-probs, returning ``(per-token terms [B, T], metrics)`` that the host aggregates with
        ``loss_agg``; registered with optional ``needs=(...)`` and ``fused=`` — see
        :class:`rlhf_core.contracts.PolicyLoss`). The other families return ``(scalar loss, dict of
        float metrics)``. Keyword-only
        parameters with defaults are its options, settable from the config; a
        ``fn.check_options(**options)`` attribute that raises ``ValueError`` validates their values
        before anything trains.
    :return: nothing.
    """


@hookspec
def rlhf_register_rewards(register):
    """Register rewards used by the PPO stage (and ``rlhf eval``).

    :param register: ``register(name, reward_class)``; the class follows
        :class:`rlhf_core.contracts.Reward` (the contract: construction, the call, the optional
        ``fields`` it reads from the data and ``inputs`` it loads). A static
        ``check_options(**options)`` that raises ``ValueError`` validates option values before
        anything trains (the constructor needs ``ctx``, so the host cannot simply build one).
    :return: nothing.
    """


@hookspec
def rlhf_register_advantages(register):
    """Register advantage estimators used by the PPO stage.

    :param register: ``register(name, estimator_class)``; the class follows
        :class:`rlhf_core.contracts.AdvantageEstimator`: built as ``estimator_class(**options)``,
        then called with :class:`rlhf_core.contracts.AdvantageInputs` and returning
        advantages of exactly ``[B, T]`` (checked). ``needs_values = True`` asks the stage for a
        value model. The host builds one from the config's options before anything trains, so
        ``__init__`` raising ``ValueError`` is how an estimator rejects a bad option.
    :return: nothing.
    """


@hookspec
def rlhf_register_generators(register):
    """Register rollout engines for the PPO stage, selected with ``ppo.generator`` (default ``hf``,
    Hugging Face ``generate`` on the live policy).

    :param register: ``register(name, generator_class)``; the class follows
        :class:`rlhf_core.contracts.Generator`: built once per PPO stage as
        ``generator_class(ctx, policy, tokenizer, **options)`` (``policy``: the trained model as the
        stage holds it, possibly sharded or with LoRA adapters), then for every rollout batch
        ``generate(prompt_ids, *, max_new_tokens, temperature, top_p) -> Rollout``: one sampled
        response per row of ``prompt_ids`` (token ids, BOS included; the stage repeats a prompt K
        times for K samples), stopped at EOS, as :class:`rlhf_core.sampling.Rollout` (left-padded
        prompts, response mask and labels; ``logprobs [B, R]``: the engine's own log-probs of the
        sampled tokens, or None). ``update_weights(policy)`` is called after every optimizer phase,
        when the policy's weights have changed (an engine holding its own copy reloads them);
        optional ``sleep()`` (called before the update) and ``wake()`` (before the next
        ``generate``) let an engine give its memory back while the trainer needs it. Every call
        runs on every process. A static ``check_options(**options)`` raising ``ValueError`` checks
        option values before anything trains; the rollout's shapes are checked at run time.
    :return: nothing.
    """


@hookspec
def rlhf_register_datasets(register):
    """Register built-in datasets, selectable in a config as ``builtin:NAME``.

    :param register: ``register(name, factory)`` with ``factory(kind, n, seed) -> list[dict]``,
        ``kind`` one of ``"sft"``, ``"reward"``, ``"pairwise"``, ``"unpaired"``, ``"prompts"``; the records use the
        same fields as the JSONL formats of :mod:`rlhf_core.data`.
    :return: nothing.
    """


@hookspec
def rlhf_register_trackers(register):
    """Register experiment trackers, selected with the config's ``tracking: [NAME, {name: NAME, ...}]``.

    :param register: ``register(name, tracker_class)``; the class follows
        :class:`rlhf_core.contracts.TrackerBackend`: built on the main process at the start of a
        run as ``tracker_class(run_dir, config, **options)`` (``config``: the resolved run config
        as plain data, for the tool's hyper-parameters), then ``log(stage, step, metrics)`` for
        every logged row and ``finish(summary)`` once when the run ends (``summary["status"]``:
        ``finished``, ``interrupted`` or ``failed: ...``). Optional ``resume(stage, step)``, on
        ``--resume`` before the stage logs again: drop what was received for ``stage`` at ``step``
        or later (it is logged again). A static ``check_options(**options)`` raising ``ValueError``
        (say, a missing package) is called before anything trains. A tracker whose constructor or
        method raises is dropped with one warning, and ``summary.json``'s ``trackers_failed`` says
        where and why; the run goes on. ``metrics.jsonl`` and the plots are written whatever
        trackers are chosen.
    :return: nothing.
    """


@hookspec
def rlhf_register_commands(cli):
    """Add commands to the ``rlhf`` command line.

    :param cli: the root ``click.Group``; call ``cli.add_command(...)``. Fires when the ``rlhf``
        executable starts, before arguments are parsed (plugins disabled through
        ``RLHF_DISABLE_PLUGINS`` are not asked).
    :return: nothing.
    """
