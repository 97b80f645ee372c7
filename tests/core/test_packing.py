"""Padding-free training (``data.packing``): the row plan, pack/unpack, attention that never crosses a
sequence boundary, packed forwards equal to padded ones (logits, losses, gradients, scores, DPO
log-probs, LoRA), decoding never packed, the stats, and token-budget batches."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlhf_core import distributed as dist_utils
from rlhf_core.config import ConfigError, DataConfig, LoraConfig, TrainConfig, resolve
from rlhf_core.data import collate_sft
from rlhf_core.errors import UserError
from rlhf_core.models import ScalarHeadModel, apply_lora
from rlhf_core.packing import PackingStats, PackPlan, attention_path, decoders, padding_free, plan_rows
from rlhf_core.training import Batches, Trainer, budget_problems, example_tokens, token_share, total_steps
from rlhf_plugins.preference.losses import dpo_loss
from rlhf_plugins.preference.stage import collate_pairs, pair_logprobs, preference_inputs
from rlhf_core.plugin_system.manager import build_registry, get_plugin_manager
from rlhf_plugins.sft import sft_loss_terms

VOCAB = 80
BACKEND = "reference"

CROSS_ENTROPY = build_registry(get_plugin_manager(entry_points=False)).get("loss", "cross_entropy")


def tiny_lm(seed: int = 0):
    """A tiny fp32 Llama (sdpa attention), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


def masks(lengths: list[int], width: int | None = None, left: bool = False) -> torch.Tensor:
    width = width or max(lengths)
    cols = torch.arange(width)[None]
    n = torch.tensor(lengths)[:, None]
    return (cols >= width - n if left else cols < n).long()


def random_ids(mask: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, mask.shape, generator=g) * mask  # pad id 0


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, expected: dict, rtol: float = 1e-5):
    assert got.keys() == expected.keys() and expected
    for name in expected:
        scale = expected[name].norm()
        assert scale > 0, f"{name}: no gradient, the comparison would be vacuous"
        err = float((got[name] - expected[name]).norm() / scale)
        assert err <= rtol, f"{name}: relative gradient error {err:.2e}"


class ShapeSpy:
    """Records the input_ids shape each forward of a causal LM's embedding sees."""

    def __init__(self, lm):
        self.shapes = []
        lm.get_input_embeddings().register_forward_hook(lambda m, a, o: self.shapes.append(tuple(a[0].shape)))


# ----------------------------------------------------------------------------- plan_rows


def test_plan_rows_is_best_fit_decreasing_on_hand_worked_examples():
    # capacity 8; longest first: 7 -> new row (room 1); 5 -> new (3); 4 -> new (4); 3 -> the fullest
    # row it fits (room 3, not 4); 2 -> row of 4; 1 -> the row with room 1.
    assert plan_rows([5, 2, 7, 3, 1, 4], 8) == [[2, 4], [0, 3], [5, 1]]
    # capacity 12: 5,5 share row 0 (room 2), 5 opens row 1 (7), 3 and 3 go there (room 1: 3 > 2);
    # the 1 then goes to the fullest row it fits (row 1, room 1), where first-fit would pick row 0.
    assert plan_rows([3, 5, 1, 5, 3, 5], 12) == [[1, 3], [5, 0, 4, 2]]
    # ties by index; an item as long as the capacity fills a row alone
    assert plan_rows([4, 4, 4], 4) == [[0], [1], [2]]
    assert plan_rows([2, 2, 2, 2], 4) == [[0, 1], [2, 3]]
    assert plan_rows([], 5) == []


def test_plan_rows_places_every_index_once_within_capacity_deterministically():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(1, 30, (1,), generator=g))
        lengths = torch.randint(0, 17, (n,), generator=g).tolist()
        capacity = max(max(lengths), 1)
        rows = plan_rows(lengths, capacity)
        flat = [i for row in rows for i in row]
        assert sorted(flat) == list(range(n))
        assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
        assert plan_rows(list(lengths), capacity) == rows
        # best fit never leaves two rows that could be merged
        sums = sorted(sum(lengths[i] for i in row) for row in rows)
        assert len(sums) < 2 or sums[0] + sums[1] > capacity


# ----------------------------------------------------------------------------- PackPlan


def test_pack_plan_of_a_right_padded_mask_hand_example():
    mask = masks([2, 4, 1])  # [3, 4]; rows by best fit: [1], [0, 2]
    plan = PackPlan.from_mask(mask)
    assert (plan.batch, plan.length, plan.rows, plan.width, plan.real) == (3, 4, 2, 4, 7)
    assert plan.source.tolist() == [4, 5, 6, 7, 0, 1, 8]
    assert plan.target.tolist() == [0, 1, 2, 3, 4, 5, 6]
    # positions restart at 0 for each sequence; the row's tail is its own segment from 0
    assert plan.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    ids = torch.tensor([[11, 12, 0, 0], [21, 22, 23, 24], [31, 0, 0, 0]])
    assert plan.pack(ids).tolist() == [[21, 22, 23, 24], [11, 12, 31, 0]]
    assert plan.pack(ids, fill=-1).tolist() == [[21, 22, 23, 24], [11, 12, 31, -1]]
    assert torch.equal(plan.unpack(plan.pack(ids)), ids)


def test_pack_plan_of_a_left_padded_mask_keeps_token_order():
    mask = masks([2, 4, 1], left=True)
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]
    plan = PackPlan.from_mask(mask)
    assert (plan.rows, plan.width) == (2, 4)
    assert plan.source.tolist() == [4, 5, 6, 7, 2, 3, 11]
    assert plan.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    ids = torch.tensor([[0, 0, 11, 12], [21, 22, 23, 24], [0, 0, 0, 31]])
    assert plan.pack(ids).tolist() == [[21, 22, 23, 24], [11, 12, 31, 0]]


@pytest.mark.parametrize("left", [False, True])
def test_pack_unpack_round_trip_is_the_original_on_real_tokens_and_zero_on_padding(left):
    lengths = [5, 1, 7, 3, 0, 6, 2]
    mask = masks(lengths, width=9, left=left)
    plan = PackPlan.from_mask(mask)
    x = torch.randn(len(lengths), 9, 3, generator=torch.Generator().manual_seed(0))
    packed = plan.pack(x)
    assert packed.shape == (plan.rows, plan.width, 3) and plan.width == 7
    assert plan.real == sum(lengths) and plan.rows * plan.width >= plan.real
    assert torch.equal(plan.unpack(packed), x * mask[..., None])
    # every sequence sits contiguously in one row, its positions 0..n-1
    pos = plan.unpack(plan.position_ids)
    for b, n in enumerate(lengths):
        assert pos[b][mask[b].bool()].tolist() == list(range(n))
    # unpack is differentiable: gradient 1 where a real token sits, 0 on the rows' tails
    p = packed.clone().requires_grad_(True)
    plan.unpack(p).sum().backward()
    assert float(p.grad.sum()) == 3 * sum(lengths)
    assert float(p.grad.reshape(-1, 3)[plan.target].min()) == 1.0


# ----------------------------------------------------------------------------- attention


def test_no_attention_across_sequence_boundaries():
    lm = tiny_lm(0).eval()
    mask = masks([8, 3, 5])
    ids = random_ids(mask)
    assert plan_rows([8, 3, 5], 8) == [[0], [2, 1]]  # the 3 sits after the 5 in row 1
    spy = ShapeSpy(lm)
    with torch.no_grad():
        with padding_free(lm):
            packed = lm(input_ids=ids, attention_mask=mask).logits
            other = ids.clone()
            other[2, :5] = (other[2, :5] + 7) % (VOCAB - 2) + 2  # change the sequence packed before it
            packed_other = lm(input_ids=other, attention_mask=mask).logits
        alone = lm(input_ids=ids[1:2, :3]).logits[0]  # unpadded, no packing
    assert spy.shapes[:2] == [(2, 8), (2, 8)]  # packed: 2 rows of 8, not 3 padded rows
    assert torch.allclose(packed[1, :3], alone, atol=1e-6, rtol=0)
    assert torch.allclose(packed_other[1, :3], alone, atol=1e-6, rtol=0)
    assert not torch.allclose(packed_other[2, :5], packed[2, :5], atol=1e-3)  # the change did matter there
    assert torch.equal(packed[1, 3:], torch.zeros_like(packed[1, 3:]))  # zeros on padding (bias-free head)
    assert "block-diagonal causal mask" in attention_path(lm) and "sdpa" in attention_path(lm)


# ----------------------------------------------------------------------------- packed == padded


@pytest.mark.parametrize("left", [False, True])
def test_packed_logits_equal_padded_logits(left):
    lm = tiny_lm(1).eval()
    mask = masks([6, 2, 9, 4, 1], left=left)
    ids = random_ids(mask, seed=2)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0) if left else None
    with torch.no_grad():
        padded = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        with padding_free(lm) as stats:
            packed = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert stats.real == 22 and stats.slots == 3 * 9 and stats.padded == 5 * 9
    assert torch.allclose(packed[real], padded[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(packed[~real], torch.zeros_like(packed[~real]))


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_other_model_families_pack_too(family):
    """GPT-2 (absolute positions; its LM head passes input_ids to the decoder by position) and Qwen2
    (grouped-query attention): packed logits equal padded ones and the forward was really packed."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    if family == "gpt2":
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                                        eos_token_id=1))
    else:
        lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2))
    lm.eval()
    mask = masks([7, 3, 4, 2])
    ids = random_ids(mask, seed=4)
    with torch.no_grad():
        padded = lm(input_ids=ids, attention_mask=mask).logits
        with padding_free(lm) as stats:
            packed = lm(input_ids=ids, attention_mask=mask).logits
    assert (stats.real, stats.slots) == (16, 3 * 7)  # rows [7], [4, 3], [2]
    assert torch.allclose(packed[mask.bool()], padded[mask.bool()], atol=1e-5, rtol=1e-5)


def test_packed_gradients_of_a_masked_loss_equal_padded():
    lm = tiny_lm(2)
    mask = masks([7, 3, 5, 2])
    ids = random_ids(mask, seed=3)
    weights = torch.randn(*mask.shape, VOCAB, generator=torch.Generator().manual_seed(4))

    def run():
        lm.zero_grad()
        logits = lm(input_ids=ids, attention_mask=mask).logits
        loss = (logits * weights * mask[..., None]).sum() / mask.sum()
        loss.backward()
        return loss.detach(), grads(lm)

    loss_padded, g_padded = run()
    with padding_free(lm):
        loss_packed, g_packed = run()
    assert torch.allclose(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_packed, g_padded)


def sft_batch(lengths: list[int], prompts: list[int], seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    items = []
    for n, p in zip(lengths, prompts):
        ids = torch.randint(2, VOCAB, (n,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return collate_sft(items, 0)


@pytest.mark.parametrize("fused", [True, False])
def test_sft_loss_terms_packed_equal_padded(fused):
    lm = tiny_lm(3)
    batch = sft_batch([9, 4, 6, 3, 7], [3, 1, 2, 1, 4])

    def run(targets_only):
        lm.zero_grad()
        loss, metrics = sft_loss_terms(lm, batch, CROSS_ENTROPY, {}, BACKEND, fused, targets_only)
        loss.backward()
        return float(loss.detach()), metrics, grads(lm)

    with padding_free(lm) as stats:  # packed first: see test_with_last_hidden_sees_unpacked_hidden_states_whatever_ran_first
        loss_packed, m_packed, g_packed = run(targets_only=True)
    loss_padded, m_padded, g_padded = run(targets_only=False)
    assert stats.real == 29 and stats.slots == 4 * 9  # rows [0], [4, 3] ... packed, not 5 x 9
    assert m_padded["tokens_per_batch"] == m_packed["tokens_per_batch"] == 29 - 11
    assert math.isclose(loss_packed, loss_padded, rel_tol=1e-5)
    assert_grads_close(g_packed, g_padded)


def test_with_last_hidden_sees_unpacked_hidden_states_whatever_ran_first():
    from rlhf_core.models import with_last_hidden

    lm = tiny_lm(11).eval()
    mask = masks([4, 5, 4])  # 3 rows of 5 when packed, the longest (sequence 1) in row 0
    ids = random_ids(mask, seed=13)
    grab = lambda hidden, weight: hidden.detach().clone()  # noqa: E731
    with torch.no_grad():
        padded = with_last_hidden(lm, grab, ids, mask)  # a with_last_hidden before any padding_free block
        with padding_free(lm):
            packed = with_last_hidden(lm, grab, ids, mask)
    real = mask.bool()
    assert torch.allclose(packed[real], padded[real], atol=1e-5, rtol=1e-5)


def test_scalar_head_scores_and_gradients_packed_equal_padded():
    rm = ScalarHeadModel.from_causal_lm(tiny_lm(4))
    mask = masks([5, 8, 2, 6])
    ids = random_ids(mask, seed=6)
    target = torch.tensor([0.5, -1.0, 2.0, 0.0])

    def run():
        rm.zero_grad()
        scores = rm(ids, mask, score=True)
        ((scores - target) ** 2).mean().backward()
        return scores.detach(), grads(rm)

    s_padded, g_padded = run()
    with padding_free(rm) as stats:
        s_packed, g_packed = run()
    assert stats.real == 21 and stats.slots == 3 * 8
    # the score is read at each sequence's last token, where it was before packing
    assert torch.allclose(s_packed, s_padded, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_packed, g_padded)


def pair_items(seed: int = 7) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 2, 5), (1, 6, 1), (4, 1, 3), (2, 4, 4)]  # prompt, chosen, rejected lengths
    items = []
    for prompt, chosen, rejected in shapes:
        p = torch.randint(2, VOCAB, (prompt,), generator=g).tolist()
        c = p + torch.randint(2, VOCAB, (chosen,), generator=g).tolist()
        r = p + torch.randint(2, VOCAB, (rejected,), generator=g).tolist()
        items.append({"chosen_ids": c, "chosen_labels": [-100] * prompt + c[prompt:],
                      "rejected_ids": r, "rejected_labels": [-100] * prompt + r[prompt:]})
    return items


@pytest.mark.parametrize("fused", [True, False])
def test_pair_logprobs_and_dpo_gradients_packed_equal_padded(fused):
    lm = tiny_lm(5)
    batch = collate_pairs(pair_items(), 0)
    assert batch["attention_mask"].sum(1).tolist() == [5, 7, 5, 6, 8, 2, 7, 6]

    def run():
        lm.zero_grad()
        logps, tokens = pair_logprobs(lm, batch, BACKEND, fused)
        loss, _ = dpo_loss(preference_inputs(logps, tokens, torch.zeros_like(logps)), beta=0.5)
        loss.mean().backward()
        return logps.detach(), tokens, grads(lm)

    with padding_free(lm) as stats:  # packed first (see test_with_last_hidden_sees_unpacked_hidden_states_whatever_ran_first)
        lp_packed, t_packed, g_packed = run()
    lp_padded, t_padded, g_padded = run()
    assert stats.real == 46 and stats.slots == 7 * 8
    assert t_packed.tolist() == t_padded.tolist() == [2, 6, 1, 4, 5, 1, 3, 4]
    assert torch.allclose(lp_packed, lp_padded, rtol=1e-5, atol=1e-5)
    assert_grads_close(g_packed, g_padded)


def test_lora_model_packed_equals_padded():
    pytest.importorskip("peft")
    policy = apply_lora(tiny_lm(6), LoraConfig(r=4, alpha=8), "tiny")
    with torch.no_grad():  # adapters that change the output
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(8))
    assert len(decoders(policy)) == 1
    mask = masks([6, 2, 5, 3])
    ids = random_ids(mask, seed=9)

    def run():
        policy.zero_grad()
        logits = policy(input_ids=ids, attention_mask=mask).logits
        (logits.logsumexp(-1) * mask).sum().backward()
        return logits.detach(), grads(policy)

    l_padded, g_padded = run()
    with padding_free(policy) as stats:
        l_packed, g_packed = run()
    assert stats.real == 16 and stats.slots == 3 * 6
    assert g_padded and all("lora_" in n for n in g_padded)  # only the adapters train
    real = mask.bool()
    assert torch.allclose(l_packed[real], l_padded[real], atol=1e-5, rtol=1e-5)
    assert_grads_close(g_packed, g_padded)


# ----------------------------------------------------------------------------- decoding


def test_generation_with_a_kv_cache_is_never_packed():
    lm = tiny_lm(7).eval()
    mask = masks([3, 6, 1], left=True)
    ids = random_ids(mask, seed=10)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = lm.generate(input_ids=ids, attention_mask=mask, **kwargs)
        with padding_free(lm) as stats:
            got = lm.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert got.shape == (3, 10)
    assert torch.equal(got, expected)
    assert (stats.real, stats.slots, stats.padded) == (0, 0, 0)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_a_forward_with_past_key_values_is_never_packed():
    from transformers import DynamicCache

    lm = tiny_lm(8).eval()
    mask = masks([4, 2, 5])
    ids = random_ids(mask, seed=11)
    step_ids = torch.tensor([[5], [6], [7]])
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    position = mask.sum(1, keepdim=True)
    spy = ShapeSpy(lm)

    def decode():
        cache = DynamicCache(config=lm.config)
        lm(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        out = lm(input_ids=step_ids, attention_mask=step_mask, position_ids=position, past_key_values=cache,
                 use_cache=True)
        return out.logits, out.past_key_values

    with torch.no_grad():
        expected, _ = decode()
        with padding_free(lm) as stats:
            got, cache = decode()
    assert torch.equal(got, expected)
    assert cache.get_seq_length() == 6
    assert spy.shapes == [(3, 5), (3, 1)] * 2  # never packed rows
    assert (stats.real, stats.slots) == (0, 0)


# ----------------------------------------------------------------------------- PackingStats and the block


def test_packing_stats_hand_example():
    stats = PackingStats()
    assert stats.efficiency == 1.0
    stats.add(PackPlan.from_mask(masks([2, 4, 1])))  # 7 tokens in 2 rows of 4, padded 3 x 4
    assert (stats.real, stats.slots, stats.padded) == (7, 8, 12)
    assert stats.efficiency == 7 / 8
    stats.add(PackPlan.from_mask(masks([3, 1, 1])))  # rows [0], [1, 2] of width 3
    assert (stats.real, stats.slots, stats.padded) == (12, 14, 21)
    assert stats.efficiency == 12 / 14


def test_padding_free_blocks_nest_and_restore_the_previous_state():
    lm = tiny_lm(9).eval()
    mask = masks([2, 4, 1])
    ids = random_ids(mask)
    spy = ShapeSpy(lm)

    def forward():
        with torch.no_grad():
            lm(input_ids=ids, attention_mask=mask)

    outer, inner = PackingStats(), PackingStats()
    with padding_free(lm, stats=outer) as yielded:
        assert yielded is outer
        forward()
        with padding_free(None, lm, stats=inner):
            forward()
            forward()
        forward()
    forward()
    assert (outer.real, outer.slots, outer.padded) == (14, 16, 24)
    assert (inner.real, inner.slots, inner.padded) == (14, 16, 24)
    assert spy.shapes == [(2, 4)] * 4 + [(3, 4)]
    with pytest.raises(RuntimeError):  # an exception inside the block still restores
        with padding_free(lm, stats=outer):
            raise RuntimeError("boom")
    forward()
    assert outer.real == 14 and spy.shapes[-1] == (3, 4)


def test_padding_free_refuses_a_module_without_a_transformer_decoder():
    with pytest.raises(UserError, match="Linear holds no Hugging Face transformer decoder"):
        with padding_free(torch.nn.Linear(2, 2)):
            pass


def test_trainer_with_packing_logs_packing_efficiency():
    lm = tiny_lm(10)
    g = torch.Generator().manual_seed(12)
    items = []
    for n in [6, 4, 3, 1]:
        ids = torch.randint(2, VOCAB, (n,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": ids})

    class Tracker:
        def __init__(self):
            self.rows = []

        def log(self, step, metrics):
            self.rows.append((step, dict(metrics)))

    tracker = Tracker()
    cfg = TrainConfig(steps=1, batch_size=2, grad_accum=2, log_every=1, mixed_precision="no", lr=1e-3)
    loader = Batches(items, 2, lambda b: collate_sft(b, 0), seed=0, shuffle=False)
    trainer = Trainer(lm, cfg, torch.device("cpu"), tracker, "sft", packing=True)
    summary = trainer.fit(loader, lambda b: sft_loss_terms(lm, b, CROSS_ENTROPY, {}, BACKEND, False), None, 1)
    # micro-batch [6, 4]: 10 tokens in 2 rows of 6; [3, 1]: 4 tokens in 2 rows of 3 -> 14 / 18 over the step
    assert tracker.rows[0][0] == 1
    assert tracker.rows[0][1]["packing_efficiency"] == pytest.approx(14 / 18)
    assert summary["train_packing_efficiency"] == pytest.approx(14 / 18)


# ----------------------------------------------------------------------------- token-budget batches


def budget_items(lengths: list[int]) -> list[dict]:
    return [{"i": i, "input_ids": [3] * n} for i, n in enumerate(lengths)]


def collate_index(batch: list[dict]) -> dict[str, torch.Tensor]:
    return {"i": torch.tensor([it["i"] for it in batch]), "n": torch.tensor([len(it["input_ids"]) for it in batch])}


def indices(batches) -> list[list[int]]:
    return [b["i"].tolist() for b in batches]


def greedy_cut(order: list[int], tokens: list[int], budget: int) -> list[list[int]]:
    out, used = [], 0
    for i in order:
        if not out or used + tokens[i] > budget:
            out.append([])
            used = 0
        out[-1].append(i)
        used += tokens[i]
    return out


def test_example_tokens_counts_every_sequence_list():
    assert example_tokens({"input_ids": [1, 2, 3], "labels": [1, 2, 3]}) == 3
    pair = {"chosen_ids": [1] * 4, "rejected_ids": [1] * 6, "chosen_labels": [1] * 4, "score": 1.0}
    assert example_tokens(pair) == 10
    assert example_tokens({"completion_ids": [1, 2], "mismatched_ids": [3], "desirable": True}) == 3


def test_token_budget_batches_are_maximal_consecutive_runs():
    lengths = [3, 4, 2, 6, 9, 1, 1, 5]
    loader = Batches(budget_items(lengths), batch_size=2, collate=collate_index, seed=0, shuffle=False, max_tokens=7)
    # 3+4=7 | 2 (2+6 > 7) | 6 | 9 alone (over the budget) | 1+1+5=7
    expected = [[0, 1], [2], [3], [4], [5, 6, 7]]
    assert len(loader) == 5
    assert indices(loader) == expected
    assert indices(loader.batch(p) for p in range(10)) == expected * 2  # the next epoch, in order again
    assert all(float(b["is_real"]) == 1.0 for b in loader)
    cfg = TrainConfig(epochs=2, grad_accum=2, batch_size=100)
    assert total_steps(cfg, loader) == 6  # 2 epochs x ceil(5 / 2), not from 8 items in batches of 100
    assert total_steps(cfg, 8) == 2
    assert total_steps(TrainConfig(steps=4), loader) == 4


@pytest.mark.parametrize("shuffle", [False, True])
def test_token_budget_batch_is_a_pure_function_of_its_position(shuffle):
    lengths = [5, 1, 7, 3, 2, 8, 4, 4, 6, 1, 2, 3, 9, 5]

    def make():
        return Batches(budget_items(lengths), 4, collate_index, seed=3, shuffle=shuffle, max_tokens=10)

    a, b = make(), make()
    total = 3 * len(a) + 2
    stream = indices(itertools.islice(a.stream(0), total))
    for k in (1, len(a) - 1, len(a), len(a) + 2, 2 * len(a) + 1):
        assert indices(itertools.islice(b.stream(k), total - k)) == stream[k:]
    # position order is free: a fresh object asked backwards gives the same batches
    c = make()
    assert [c.batch(p)["i"].tolist() for p in reversed(range(total))] == stream[::-1]
    # every epoch visits each item once, in the seeded order, cut greedily within the budget
    start = 0
    for epoch in range(3):
        order = (torch.randperm(len(lengths), generator=torch.Generator().manual_seed(3 + epoch)).tolist()
                 if shuffle else list(range(len(lengths))))
        cut = greedy_cut(order, lengths, 10)
        assert stream[start:start + len(cut)] == cut
        if epoch == 0:
            assert len(a) == len(cut)
        start += len(cut)
    assert all(sum(lengths[i] for i in batch) <= 10 for batch in stream)


def test_without_a_budget_batches_are_chunks_of_the_seeded_order():
    items = [{"i": i} for i in range(8)]  # no token lists needed
    loader = Batches(items, 3, collate_index_plain, seed=5, shuffle=True)
    assert loader.tokens is None and len(loader) == 3
    expected = []
    for epoch in range(2):
        order = torch.randperm(8, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        expected += [order[0:3], order[3:6], order[6:8]]
    assert indices(loader.batch(p) for p in range(6)) == expected
    assert indices(itertools.islice(loader.stream(4), 2)) == expected[4:]
    assert total_steps(TrainConfig(epochs=1, batch_size=3), loader) == 3


def collate_index_plain(batch: list[dict]) -> dict[str, torch.Tensor]:
    return {"i": torch.tensor([it["i"] for it in batch])}


def with_ranks(monkeypatch, world: int, rank: int):
    monkeypatch.setattr(dist_utils, "world_size", lambda: world)
    monkeypatch.setattr(dist_utils, "rank", lambda: rank)


def test_token_share_is_contiguous_covering_and_balanced_by_tokens(monkeypatch):
    tokens = [10, 2, 2, 2, 2, 6]  # 24 tokens; by items 3 + 3 would be 14 + 10 tokens
    shares = {}
    for world in (1, 2, 3):
        shares[world] = []
        for r in range(world):
            with_ranks(monkeypatch, world, r)
            shares[world].append(token_share(tokens))
    assert shares[1] == [(0, 6)]
    assert shares[2] == [(0, 2), (2, 6)]  # 12 + 12 tokens
    assert shares[3] == [(0, 1), (1, 4), (4, 6)]  # item i goes where its first token falls (x 3 // 24)
    with_ranks(monkeypatch, 3, 0)
    assert token_share([4] * 6) == (0, 2)
    for world in (2, 3, 4):  # contiguous, every item once, on random batches
        g = torch.Generator().manual_seed(world)
        for _ in range(10):
            toks = torch.randint(1, 20, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
            spans = []
            for r in range(world):
                with_ranks(monkeypatch, world, r)
                spans.append(token_share(toks))
            owned = [i for start, stop in spans for i in range(start, stop)]
            assert owned == list(range(len(toks)))


def test_a_rank_with_no_share_collates_a_stand_in_marked_not_real(monkeypatch):
    loader = Batches(budget_items([10, 1]), 2, collate_index, seed=0, shuffle=False, max_tokens=11)
    got = []
    for r in range(3):
        with_ranks(monkeypatch, 3, r)
        batch = loader.batch(0)
        got.append((batch["i"].tolist(), float(batch["is_real"])))
    # item 1's first token is token 10 of 11: 10 * 3 // 11 = 2, so rank 1 has nothing
    assert got == [([0], 1.0), ([0], 0.0), ([1], 1.0)]


# ----------------------------------------------------------------------------- budget checks


def test_budget_problems_name_the_settings_and_the_number():
    data = DataConfig(max_length=64)
    problems = budget_problems(TrainConfig(max_tokens_per_batch=63), data)
    assert len(problems) == 1
    assert "train.max_tokens_per_batch" in problems[0] and "data.max_length (64)" in problems[0]
    assert problems[0].endswith("got 63")
    pairs = budget_problems(TrainConfig(max_tokens_per_batch=100), data, sequences_per_example=2)
    assert len(pairs) == 1 and "2 x data.max_length (128)" in pairs[0] and "got 100" in pairs[0]
    assert budget_problems(TrainConfig(max_tokens_per_batch=64), data) == []
    assert budget_problems(TrainConfig(max_tokens_per_batch=128), data, sequences_per_example=2) == []
    assert budget_problems(TrainConfig(max_tokens_per_batch=None), data) == []


def resolve_problems(stage: dict, registry) -> list[str]:
    with pytest.raises(ConfigError) as info:
        resolve({"stages": [stage]}, registry)
    return info.value.problems


def test_config_rejects_a_zero_or_too_small_token_budget(registry):
    assert resolve_problems({"stage": "sft", "train": {"max_tokens_per_batch": 0}}, registry) == [
        "stages[0].train.max_tokens_per_batch: must be at least 1, got 0"]
    small = resolve_problems({"stage": "sft", "data": {"max_length": 32}, "train": {"max_tokens_per_batch": 16}},
                             registry)
    assert len(small) == 1 and small[0].startswith("stages[0].train.max_tokens_per_batch: must be at least "
                                                   "data.max_length (32)")
    dpo = resolve_problems({"stage": "dpo", "data": {"max_length": 32}, "train": {"max_tokens_per_batch": 40}},
                           registry)
    assert len(dpo) == 1 and "2 x data.max_length (64)" in dpo[0] and dpo[0].endswith("got 40")
    resolve({"stages": [{"stage": "sft", "data": {"max_length": 32, "packing": True},
                         "train": {"max_tokens_per_batch": 32}}]}, registry)  # no problem


def test_model_attn_implementation_is_applied_and_eager_attention_packs_too(registry):
    """``model.attn_implementation: eager`` reaches the loaded model (and the stage's line names it);
    packed equals padded with eager attention's additive masks; an unknown kernel is refused by the
    schema with the accepted values."""
    from rlhf_core.config import ModelConfig
    from rlhf_core.models import load_causal_lm

    lm = load_causal_lm(ModelConfig(attn_implementation="eager")).eval()
    assert lm.config._attn_implementation == "eager"
    assert attention_path(lm) == "PyTorch attention (eager) with a block-diagonal causal mask"
    mask = masks([9, 4, 3, 6])
    ids = random_ids(mask, seed=6) % lm.config.vocab_size
    with torch.no_grad():
        padded = lm(input_ids=ids, attention_mask=mask).logits
        with padding_free(lm) as stats:
            packed = lm(input_ids=ids, attention_mask=mask).logits
    assert stats.slots == 3 * 9  # rows [9], [6, 3], [4]
    assert torch.allclose(packed[mask.bool()], padded[mask.bool()], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError) as info:
        resolve({"model": {"attn_implementation": "fastest"}, "stages": [{"stage": "sft"}]}, registry)
    assert info.value.problems == ["model.attn_implementation: expected one of 'sdpa', 'eager', 'flash_attention_2', "
                                   "'flash_attention_3', 'flex_attention' or null, got 'fastest'"]


def test_attention_kernels_that_cannot_run_here_are_a_clear_error():
    """flash_attention_2 without the flash-attn package: the setting and why, not a traceback."""
    import importlib.util

    from rlhf_core.config import ModelConfig
    from rlhf_core.models import load_causal_lm

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(UserError, match=r"^model\.attn_implementation: 'flash_attention_2' cannot be used here: .*"
                                        r"FlashAttention2"):
        load_causal_lm(ModelConfig(attn_implementation="flash_attention_2"))


def test_a_transformers_without_packed_sequence_masks_is_refused_with_what_to_do(monkeypatch, registry):
    import transformers.masking_utils

    monkeypatch.delattr(transformers.masking_utils, "find_packed_sequence_indices")
    import transformers

    expected = (f"data.packing needs transformers' packed-sequence attention masks (transformers >= 4.56); this is "
                f"transformers {transformers.__version__}: upgrade it or set data.packing: false")
    assert resolve_problems({"stage": "sft", "data": {"packing": True}}, registry) == [f"stages[0].{expected}"]
    with pytest.raises(UserError) as info:
        with padding_free(tiny_lm()):
            pass
    assert str(info.value) == expected
