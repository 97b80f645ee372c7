"""Policy losses on per-token log-probs: each built-in against a float64 reference written here from
its paper's equation (values and gradients), the host's aggregation modes by hand, the same gradient
whatever the micro-batch split, every loss on the fused-linear path equal to the logits path, a
third-party loss that runs fused without naming anything, and the config errors."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from rlhf_core.config import ComponentSpec, ConfigError, ModelConfig, load_raw, resolve
from rlhf_core import PolicyLossInputs, RewardSum
from rlhf_core.models import load_causal_lm
from rlhf_core.plugin_system.manager import build_registry, get_plugin_manager
from rlhf_plugins.ppo.advantages import GroupMeanBaseline
from rlhf_plugins.ppo.loss import aggregate, cispo, gspo, kl_k2, local_normaliser, ppo_clip, reinforce
from ppo_parts import ppo_run, prompts
from rlhf_plugins.ppo import run as run_module
from rlhf_plugins.ppo.config import KLConfig, PolicyOptimConfig, PPOConfig
from rlhf_core import GenerationConfig

# Two responses of 3 and 1 tokens (position 3 of row 0 and 1..3 of row 1 are padding); the ratios
# r = exp(logp - old) = 1.5, 0.7, 1.1 | 0.5 fall on both sides of a 0.2 clip.
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
RATIOS = torch.tensor([[1.5, 0.7, 1.1, 9.0], [0.5, 3.0, 3.0, 3.0]], dtype=torch.float64)
ADV = torch.tensor([[1.0, -2.0, 0.5, 7.0], [-1.5, 4.0, 4.0, 4.0]], dtype=torch.float64)
OLD = torch.tensor([[-1.0, -2.0, -0.5, -1.0], [-3.0, -1.0, -1.0, -1.0]], dtype=torch.float64)


def inputs(**extra) -> tuple[PolicyLossInputs, torch.Tensor]:
    logp = (OLD + RATIOS.log()).clone().requires_grad_(True)
    return PolicyLossInputs(logp, OLD, ADV, MASK, **extra), logp


def token_mean(terms):
    return aggregate(terms, MASK, "token_mean", float(MASK.sum()))


def grad_of(loss, logp):
    (g,) = torch.autograd.grad(loss, logp)
    return g


def test_ppo_clip_asymmetric_and_dual_clip_against_the_equation():
    x, logp = inputs()
    terms, metrics = ppo_clip(x, clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0)
    # Longhand, per valid token (r, A): min(rA, clip(r, 0.8, 1.28)A), dual clip max(., cA) for A<0.
    expected = []
    for r, a in [(1.5, 1.0), (0.7, -2.0), (1.1, 0.5), (0.5, -1.5)]:
        objective = min(r * a, min(max(r, 0.8), 1.28) * a)
        if a < 0:
            objective = max(objective, 3.0 * a)
        expected.append(-objective)
    # (1.5, 1): clipped at 1.28 -> -1.28; (0.7, -2): min(-1.4, -1.6) = -1.6, dual max(-1.6, -6) -> 1.6
    # (1.1, 0.5): -0.55; (0.5, -1.5): min(-0.75, -1.2) = -1.2 -> 1.2
    assert expected == pytest.approx([-1.28, 1.6, -0.55, 1.2])
    got = terms[MASK > 0]
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert token_mean(terms).item() == pytest.approx(sum(expected) / 4)
    # Gradient: d/dlogp of -r A where the unclipped branch is active, 0 where a clip holds. Only
    # (1.1, 0.5) is inside the range: d(-rA)/dlogp = -rA; the other three are clipped.
    g = grad_of(token_mean(terms), logp)
    want = torch.zeros_like(g)
    want[0, 2] = -(0.5 * 1.1) / 4
    torch.testing.assert_close(g, want)
    assert float((metrics["clip_frac"] * MASK).sum()) == 3.0
    # The bound of the dual clip: a huge ratio with a negative advantage costs at most c|A|.
    big = PolicyLossInputs(OLD + 5.0, OLD, -torch.ones_like(ADV), MASK)
    assert ppo_clip(big, dual_clip=3.0)[0][MASK > 0].max().item() == pytest.approx(3.0)
    assert ppo_clip(big)[0][MASK > 0].max().item() == pytest.approx(math.exp(5.0))


def test_gspo_sequence_and_token_variants_against_the_equation():
    x, logp = inputs()
    terms, _ = gspo(x, clip_eps_low=0.1, clip_eps_high=0.2)
    # Row 0: s = exp(mean(log 1.5, log 0.7, log 1.1)) = (1.155)^(1/3) = 1.0492; A = mean(1, -2, 0.5) = -0.1667.
    s0 = (1.5 * 0.7 * 1.1) ** (1 / 3)
    a0 = (1.0 - 2.0 + 0.5) / 3
    # Row 1: one token, s = 0.5 clipped to 0.9, A = -1.5: min(-0.75, -1.35) = -1.35.
    row0 = -min(s0 * a0, min(max(s0, 0.9), 1.2) * a0)
    assert terms[0, :3].tolist() == pytest.approx([row0] * 3) and terms[1, 0].item() == pytest.approx(1.35)
    loss = aggregate(terms, MASK, "seq_mean_token_mean", 2.0)
    assert loss.item() == pytest.approx((row0 + 1.35) / 2)  # the paper's mean over sequences
    # d/dlogp_t of -s A with s = exp(mean_t log r_t): -s A / |y| on each of the row's tokens (unclipped).
    g = grad_of(loss, logp)
    torch.testing.assert_close(g[0, :3], torch.full((3,), -s0 * a0 / 3 / 2, dtype=torch.float64))
    assert g[1].abs().sum() == 0  # clipped
    # GSPO-token: the same value, and with equal advantages per sequence the same gradient.
    equal = ADV.clone()
    equal[0, :3] = a0
    tok, logp_t = inputs()
    tok.advantages = equal
    t_terms, _ = gspo(tok, clip_eps_low=0.1, clip_eps_high=0.2, variant="token")
    torch.testing.assert_close(t_terms * MASK, terms * MASK)
    g_t = grad_of(aggregate(t_terms, MASK, "seq_mean_token_mean", 2.0), logp_t)
    # Token variant: d/dlogp_t of -(sg[s] pi_t/sg[pi_t]) A / |y| = -s A / |y| per token, then the seq mean.
    torch.testing.assert_close(g_t[0, :3], g[0, :3])


def test_cispo_detached_clipped_weight_against_the_equation():
    x, logp = inputs()
    terms, metrics = cispo(x, clip_eps_low=1.0, clip_eps_high=0.28)
    weights = torch.tensor([[1.28, 0.7, 1.1, 0], [0.5, 0, 0, 0]], dtype=torch.float64)
    expected = -weights * ADV * logp.detach()
    torch.testing.assert_close(terms * MASK, expected * MASK)
    # The weight is a constant: d/dlogp = -w A on every token, clipped or not (CISPO keeps them all).
    g = grad_of(token_mean(terms), logp)
    torch.testing.assert_close(g, -weights * ADV * MASK / 4)
    assert float((metrics["clip_frac"] * MASK).sum()) == 1.0  # only 1.5 > 1.28


def test_reinforce_is_minus_advantage_times_logprob():
    x, logp = inputs()
    terms, _ = reinforce(x)
    torch.testing.assert_close(terms, -ADV * logp.detach())
    torch.testing.assert_close(grad_of(token_mean(terms), logp), -ADV * MASK / 4)


def test_k2_is_half_the_squared_log_ratio():
    assert kl_k2(torch.tensor([0.5]), torch.tensor([-0.5])).item() == pytest.approx(0.5)


def test_aggregation_modes_by_hand():
    terms = torch.tensor([[1.0, 2.0, 0.0, 9.0], [3.0, 9.0, 9.0, 9.0]], dtype=torch.float64)
    # Valid: row 0 -> 1, 2, 0 (sum 3, 3 tokens); row 1 -> 3 (sum 3, 1 token); padding never counts.
    cases = {"token_mean": (6 / 4, 4.0), "seq_mean_token_mean": ((1.0 + 3.0) / 2, 2.0),
             "seq_mean_token_sum": ((3 + 3) / 2, 2.0), "token_sum_norm": (6 / (2 * 5), 10.0)}
    for mode, (want, norm) in cases.items():
        assert float(local_normaliser(mode, MASK, 5)) == norm, mode
        assert aggregate(terms, MASK, mode, norm).item() == pytest.approx(want), mode
    # Split the rows in two micro-batches: their shares add up to the whole.
    for mode, (want, norm) in cases.items():
        parts = sum(aggregate(terms[i:i + 1], MASK[i:i + 1], mode, norm).item() for i in range(2))
        assert parts == pytest.approx(want), mode


CFG = ModelConfig()


def reward(prompts, responses, rows=None):
    return torch.tensor([float(r.count("a")) - 0.1 * len(r) for r in responses])


REWARD = RewardSum([("reward", 1.0, reward)])


@pytest.fixture(scope="module")
def rollout():
    """One experience of 4 prompts x 2 samples from the tiny policy (reference: another seed)."""
    torch.manual_seed(0)
    policy = load_causal_lm(CFG, seed=0)
    reference = load_causal_lm(CFG, seed=1).eval().requires_grad_(False)
    config = PPOConfig(prompts_per_batch=4, samples_per_prompt=2, ppo_epochs=1, minibatch_size=8,
                       optim=PolicyOptimConfig(max_grad_norm=0.0), generation=GenerationConfig(max_new_tokens=32),
                       kl=KLConfig(coef=0.05, estimator="k3", placement="reward"))
    registry = build_registry(get_plugin_manager(entry_points=False))
    run = ppo_run(registry, config, policy, reference=reference, rewards=REWARD, estimator=GroupMeanBaseline())
    torch.manual_seed(1)
    exp = run.make_experience(prompts(run, ["abc", "hello there", "x", "aaaa b"]))
    # Responses of different lengths, as EOS would end them (the untrained policy rarely samples EOS):
    # the aggregation modes weigh them differently.
    roll, prompt_len = exp.rollout, exp.rollout.prompt_len
    for row, length in enumerate([32, 5, 17, 1, 32, 9, 3, 20]):
        roll.mask[row, length:] = 0
        roll.labels[row, length:] = -100
        roll.attention_mask[row, prompt_len + length:] = 0
    keep = roll.mask.float()
    exp.old_logprobs, exp.ref_logprobs, exp.advantages = exp.old_logprobs * keep, exp.ref_logprobs * keep, exp.advantages * keep
    # Engine-style log-probs a little off the trainer's, so losses that read them see a real gap.
    exp.rollout.logprobs = (exp.old_logprobs - 0.05 * torch.rand_like(exp.old_logprobs)) * exp.rollout.mask
    return policy, reference, exp, config


def gradient(registry, rollout, loss: ComponentSpec, fused: bool, micro: int | None, agg: str, **options):
    """The policy's gradient after one update (lr 0: the weights stay, the gradient is kept)."""
    policy, reference, exp, config = rollout
    policy = copy.deepcopy(policy)
    cfg = dataclasses.replace(config, loss=loss, loss_agg=agg, micro_batch_size=micro, entropy_coef=0.01, **options)
    stats = ppo_run(registry, cfg, policy, reference=reference, fused=fused).update(copy.deepcopy(exp)).metrics
    return torch.cat([p.grad.reshape(-1) for p in policy.parameters()]), stats


LOSSES = [ComponentSpec("ppo_clip", {"clip_eps_low": 0.2, "clip_eps_high": 0.28}), ComponentSpec("ppo_clip"),
          ComponentSpec("gspo", {"clip_eps_low": 0.05, "clip_eps_high": 0.05}), ComponentSpec("gspo", {"variant": "token"}),
          ComponentSpec("cispo"), ComponentSpec("reinforce")]


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"])
def test_the_gradient_does_not_depend_on_the_micro_batch_split(registry, rollout, agg):
    for loss in LOSSES:
        whole, _ = gradient(registry, rollout, loss, False, None, agg)
        assert whole.abs().sum() > 0, loss
        for micro in (4, 2):
            split, _ = gradient(registry, rollout, loss, False, micro, agg)
            # fp32 sums in another order: equal to rounding, relative to the gradient's size
            assert float((split - whole).norm() / whole.norm()) <= 1e-6, (loss, agg, micro)
            assert float((split - whole).abs().max() / whole.abs().max()) <= 1e-6, (loss, agg, micro)


def test_aggregation_modes_weigh_tokens_differently(registry, rollout):
    """The modes are passed through: on responses of different lengths they give different gradients."""
    grads = [gradient(registry, rollout, ComponentSpec("reinforce"), False, None, agg)[0]
             for agg in ("token_mean", "seq_mean_token_mean", "token_sum_norm")]
    assert not torch.allclose(grads[0], grads[1]) and not torch.allclose(grads[0], grads[2])


@pytest.mark.parametrize("loss", LOSSES, ids=lambda s: f"{s.name}{s.options or ''}")
def test_every_loss_runs_fused_and_equals_the_logits_path(registry, rollout, loss):
    a, stats_a = gradient(registry, rollout, loss, False, None, "seq_mean_token_mean")
    b, stats_b = gradient(registry, rollout, loss, True, None, "seq_mean_token_mean")
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for key in stats_a:
        assert stats_b[key] == pytest.approx(stats_a[key], rel=1e-4, abs=1e-6), key


def test_a_third_party_loss_runs_fused_without_naming_anything(registry, rollout):
    def tapered_pg(inputs: PolicyLossInputs, *, cap: float = 2.0):
        """A ten-line plugin loss: the policy gradient with the ratio capped, using the engine's log-probs."""
        ratio = torch.exp(inputs.logprobs - inputs.old_logprobs).clamp(max=cap)
        engine_gap = (inputs.old_logprobs - inputs.engine_logprobs).abs()
        return -inputs.advantages * ratio, {"engine_gap": engine_gap}

    registry.add("loss", "tapered_pg", tapered_pg, "test-plugin", family="policy", needs=("engine_logprobs",))
    spec = ComponentSpec("tapered_pg", {"cap": 1.5})
    a, stats_a = gradient(registry, rollout, spec, False, None, "token_mean")
    b, stats_b = gradient(registry, rollout, spec, True, 2, "token_mean")
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert stats_a["engine_gap"] > 0 and stats_b["engine_gap"] == pytest.approx(stats_a["engine_gap"], rel=1e-4)
    # With the hf generator (no engine log-probs) the config is refused before anything trains.
    with pytest.raises(ConfigError, match="policy loss 'tapered_pg' needs the engine's sampling log-probs, which "
                                          "generator 'hf' does not report"):
        resolve(load_raw(None, ["stages.ppo.loss=tapered_pg"]), registry)


@pytest.mark.parametrize("override, message", [
    ("stages.ppo.loss_agg=token_average", "stages[2].loss_agg: expected one of 'token_mean', 'seq_mean_token_mean'"),
    ("stages.ppo.loss={name: ppo_clip, clip_eps_low: 1.5}", "stages[2].loss: ppo_clip: the clip range needs 0 < clip_eps_low < 1"),
    ("stages.ppo.loss={name: gspo, clip_eps_low: -3.0e-4}", "stages[2].loss: gspo: the clip range needs 0 < clip_eps_low < 1"),
    ("stages.ppo.loss={name: gspo, variant: tokens}", "stages[2].loss: gspo: variant must be 'sequence' or 'token'"),
    ("stages.ppo.loss={name: ppo_clip, dual_clip: 0.5}", "stages[2].loss: ppo_clip: dual_clip must be > 1"),
    ("stages.ppo.micro_batch_size=0", "stages[2].micro_batch_size: must be"),
    ("stages.ppo.max_tokens_per_micro_batch=0", "stages[2].max_tokens_per_micro_batch: must be at least 1, got 0"),
    ("stages.ppo.kl={coef: 0, adaptive: true}", "stages[2].kl.adaptive: an adaptive KL coefficient"),
])
def test_bad_policy_loss_options_are_config_errors(registry, override, message):
    with pytest.raises(ConfigError) as info:
        resolve(load_raw(None, [override]), registry)
    assert any(p.startswith(message) for p in info.value.problems), info.value.problems


def test_a_loss_written_for_the_logits_contract_is_refused_with_the_new_one(registry):
    def old_style(logits, labels, old_logprobs, advantages, *, backend=None):
        return logits.sum(), {}

    registry.add("loss", "old_style", old_style, "old-plugin", family="policy")
    with pytest.raises(ConfigError, match="policy loss 'old_style' of plugin 'old-plugin' takes logits"):
        resolve(load_raw(None, ["stages.ppo.loss=old_style"]), registry)


@pytest.mark.parametrize("budget", [40, 25, 1])
def test_token_budget_micro_batches_give_the_same_gradient(registry, rollout, budget):
    """max_tokens_per_micro_batch cuts each minibatch into runs of rows within the token budget (a row
    over it alone: budget 1 is one row per micro-batch): the gradient and the stats of the whole
    minibatch, for a token-mean and a sequence-mean aggregation; the runs are maximal and in order."""
    from rlhf_plugins.ppo.run import token_runs

    loss = ComponentSpec("ppo_clip", {"clip_eps_low": 0.2, "clip_eps_high": 0.28})
    tokens = rollout[2].rollout.attention_mask.sum(1).tolist()
    rows = torch.tensor([3, 0, 7, 1, 5, 2, 6, 4])
    runs = token_runs(rows, tokens, budget)
    assert torch.equal(torch.cat(runs), rows)
    for run, after in zip(runs, runs[1:]):
        assert sum(tokens[r] for r in run.tolist()) <= budget or len(run) == 1
        assert sum(tokens[r] for r in run.tolist()) + tokens[int(after[0])] > budget  # maximal
    for agg in ("token_mean", "seq_mean_token_mean"):
        whole, whole_stats = gradient(registry, rollout, loss, False, None, agg)
        split, stats = gradient(registry, rollout, loss, False, None, agg, max_tokens_per_micro_batch=budget)
        assert float((split - whole).norm() / whole.norm()) <= 1e-6, (agg, budget)
        assert stats["policy_loss"] == pytest.approx(whole_stats["policy_loss"], rel=1e-5, abs=1e-7)


def test_the_critic_step_does_not_depend_on_the_micro_batch_split(registry):
    """micro_batch_size applies to the critic's forward too, with the same gradient."""
    from rlhf_core.models import ScalarHeadModel
    from rlhf_plugins.ppo.advantages import GAE

    torch.manual_seed(0)
    policy = load_causal_lm(CFG, seed=0)
    critic = ScalarHeadModel.from_causal_lm(load_causal_lm(CFG, seed=2))
    config = PPOConfig(prompts_per_batch=4, samples_per_prompt=2, ppo_epochs=1, minibatch_size=8,
                       optim=PolicyOptimConfig(max_grad_norm=0.0), generation=GenerationConfig(max_new_tokens=12),
                       kl=KLConfig(coef=0.0))
    run = ppo_run(registry, config, policy, critic=critic, rewards=REWARD, estimator=GAE())
    torch.manual_seed(1)
    exp = run.make_experience(prompts(run, ["abc", "hello there", "x", "aaaa b"]))
    grads, losses, forwards = [], [], []
    hook = critic.register_forward_hook(lambda *_: forwards.append(1))
    for micro in (None, 2):
        forwards.clear()
        run.config = dataclasses.replace(config, micro_batch_size=micro)
        stats = run.update(copy.deepcopy(exp)).metrics
        grads.append(torch.cat([p.grad.reshape(-1) for p in critic.parameters() if p.grad is not None]))
        losses.append(stats["value_loss"])
        assert len(forwards) == (1 if micro is None else 4)  # 8 rows: one forward, or four of 2 rows
    hook.remove()
    assert grads[0].abs().sum() > 0
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) <= 1e-6
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_a_loss_needing_the_reference_or_an_unknown_input_is_refused(registry):
    registry.add("loss", "needs_ref", reinforce, "ref-plugin", family="policy", needs=("ref_logprobs",))
    registry.add("loss", "needs_odd", reinforce, "odd-plugin", family="policy", needs=("values",))
    with pytest.raises(ConfigError, match="kl.coef: policy loss 'needs_ref' needs the reference's log-probs, and "
                                          "kl.coef: 0 means no reference; set kl.coef > 0"):
        resolve(load_raw(None, ["stages.ppo.loss=needs_ref", "stages.ppo.kl.coef=0"]), registry)
    resolve(load_raw(None, ["stages.ppo.loss=needs_ref"]), registry)  # with a reference: fine
    with pytest.raises(ConfigError, match=r"policy loss 'needs_odd' declares needs \['values'\]; accepted: "
                                          "ref_logprobs, engine_logprobs, entropy"):
        resolve(load_raw(None, ["stages.ppo.loss=needs_odd"]), registry)


@pytest.mark.parametrize("loss", [ComponentSpec("cispo"), ComponentSpec("ppo_clip", {"clip_eps_high": 0.28})],
                         ids=lambda s: s.name)
def test_on_policy_fused_update_equals_the_logits_path_in_one_pass(registry, rollout, loss, monkeypatch):
    """On-policy (one epoch, one minibatch, no reference): the update fills the old log-probs and the
    logged entropy itself; fused, one pass over the LM head's chunks gives both with the loss's
    log-probs, and gradients, old log-probs and entropy equal the logits path's."""
    policy, _, exp, config = rollout
    cfg = dataclasses.replace(config, loss=loss, kl=KLConfig(coef=0.0), ppo_epochs=1, minibatch_size=8)
    results = []
    for fused in (False, True):
        model = copy.deepcopy(policy)
        run = ppo_run(registry, cfg, model, fused=fused)
        on_policy_exp = dataclasses.replace(copy.deepcopy(exp), old_logprobs=None, entropy=None, ref_logprobs=None)
        scoring_passes = []
        real = run_module.token_scores
        monkeypatch.setattr(run_module, "token_scores", lambda *a, **k: scoring_passes.append(1) or real(*a, **k))
        update = run.update(on_policy_exp)
        assert len(scoring_passes) == (0 if fused else 1)  # fused: no scoring pass of its own
        assert on_policy_exp.old_logprobs is None  # the Experience is not rewritten: the update holds them
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        results.append((grad, update.old_logprobs, update.entropy))
    (g_logits, old_logits, ent_logits), (g_fused, old_fused, ent_fused) = results
    assert g_logits.abs().sum() > 0 and ent_fused.abs().sum() > 0
    torch.testing.assert_close(g_fused, g_logits, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(old_fused, old_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ent_fused, ent_logits, rtol=1e-4, atol=1e-5)
