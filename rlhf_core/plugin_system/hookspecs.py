"""Every ``rlhf_*`` hook: what it receives and when it fires. What a hook registers follows the
contract written once on its Protocol or base class in :mod:`rlhf_core.contracts`.

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

    :param register: ``register(name, stage_class)``, ``stage_class`` a subclass of
        :class:`rlhf_core.contracts.Stage` (the contract); ``name`` is what a pipeline's ``stage:``
        key selects.
    """


@hookspec
def rlhf_register_losses(register):
    """Register losses.

    :param register: ``register(name, fn, *, family, needs=(), fused=None)``. ``family`` (``token``,
        ``score``, ``pairwise``, ``policy``, ``preference``, ``kto``) says which stages can call it
        and so its signature: :class:`~rlhf_core.contracts.TokenLoss`,
        :class:`~rlhf_core.contracts.ScoreLoss`, :class:`~rlhf_core.contracts.PairwiseLoss`,
        :class:`~rlhf_core.contracts.PolicyLoss` (with ``needs`` and a
        :class:`~rlhf_core.contracts.FusedPolicyLoss`), the preference families in
        :mod:`rlhf_plugins.preference.losses`; a token loss's ``fused`` is a
        :class:`~rlhf_core.contracts.FusedTokenLoss`. Its options and their check: see "Options" in
        the plugin guide.
    """


@hookspec
def rlhf_register_rewards(register):
    """Register rewards (``ppo.reward``, ``gold``, ``rlhf eval``).

    :param register: ``register(name, reward_class)`` following :class:`rlhf_core.contracts.Reward`.
    """


@hookspec
def rlhf_register_advantages(register):
    """Register advantage estimators (``ppo.advantage``).

    :param register: ``register(name, estimator_class)`` following
        :class:`rlhf_core.contracts.AdvantageEstimator`.
    """


@hookspec
def rlhf_register_generators(register):
    """Register rollout engines (``ppo.generator``; the built-in ``hf`` samples from the live policy).

    :param register: ``register(name, generator_class)`` following :class:`rlhf_core.contracts.Generator`.
    """


@hookspec
def rlhf_register_environments(register):
    """Register multi-turn environments (``ppo.environment``).

    :param register: ``register(name, environment_class)`` following
        :class:`rlhf_core.contracts.Environment` (built once per PPO stage as ``cls(ctx, **options)``).
    """


@hookspec
def rlhf_register_tools(register):
    """Register tools a policy may call in a multi-turn episode (``ppo.environment.tools``).

    :param register: ``register(name, fn, schema=None)``: ``fn(**arguments) -> str`` (the tool
        message the policy reads; anything else is turned into a string); ``schema``: the JSON
        schema passed to the chat template's ``tools`` (``{"type": "function", "function": {...}}``),
        by default derived from ``fn``'s type hints and its Google-style docstring
        (``transformers.utils.get_json_schema``). The schema's function name is the registered name.
    """


@hookspec
def rlhf_register_datasets(register):
    """Register built-in datasets, selectable in a config as ``builtin:NAME``.

    :param register: ``register(name, factory)`` with ``factory(kind, n, seed) -> list[dict]``,
        ``kind`` one of ``"sft"``, ``"reward"``, ``"pairwise"``, ``"unpaired"``, ``"prompts"``; the
        records use the fields of the JSONL formats of :mod:`rlhf_core.data`.
    """


@hookspec
def rlhf_register_trackers(register):
    """Register experiment trackers (the config's ``tracking: [NAME, {name: NAME, ...}]``).

    :param register: ``register(name, tracker_class)`` following
        :class:`rlhf_core.contracts.TrackerBackend`.
    """


@hookspec
def rlhf_register_commands(cli):
    """Add commands to the ``rlhf`` command line.

    :param cli: the root ``click.Group``; call ``cli.add_command(...)``. Fires when the ``rlhf``
        executable starts, before arguments are parsed (plugins disabled through
        ``RLHF_DISABLE_PLUGINS`` are not asked).
    :return: nothing.
    """
