"""The ``dpo`` stage: one forward for both sides, fused equals unfused, the precomputed reference
equals a live one, the LoRA reference equals the base model, and DPO / SimPO raise the letters
task's gold score over SFT at the stage's default learning rate without collapsing."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from rlhf_core.cli import cli
from rlhf_core.config import LoraConfig, ModelConfig, load_raw, resolve
from rlhf_core.data import load_records, tokenize_scored
from rlhf_core.models import apply_lora, load_causal_lm, load_tokenizer, lora_scope
from rlhf_plugins.preference.losses import dpo_loss
from rlhf_plugins.preference.stage import SIDES, collate_pairs, pair_logprobs, precompute_reference, preference_inputs

CFG = ModelConfig()


@pytest.fixture(scope="module")
def pairs(registry_module):
    tokenizer = load_tokenizer(CFG)
    records = load_records("builtin:letters", "pairwise", registry_module, seed=0, builtin_size=12)
    items, _ = tokenize_scored(records, tokenizer, 24, None, SIDES)
    return tokenizer, items


@pytest.fixture(scope="module")
def registry_module():
    from rlhf_core.plugin_system.manager import build_registry, get_plugin_manager

    return build_registry(get_plugin_manager(entry_points=False))


def test_a_batch_is_both_sides_in_one_forward_chosen_first(pairs):
    tokenizer, items = pairs
    batch = collate_pairs(items[:3], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    assert batch["input_ids"][0, : len(items[0]["chosen_ids"])].tolist() == items[0]["chosen_ids"]
    assert batch["input_ids"][3, : len(items[0]["rejected_ids"])].tolist() == items[0]["rejected_ids"]
    assert torch.isnan(batch["ref_logps"]).all()  # not yet precomputed


def test_fused_sequence_logprobs_and_gradients_equal_the_logits_path(pairs):
    tokenizer, items = pairs
    batch = collate_pairs(items[:4], tokenizer.pad_token_id)
    model = load_causal_lm(CFG, seed=0)
    grads, values = [], []
    for fused in (False, True):
        model.zero_grad()
        logps, tokens = pair_logprobs(model, batch, "cpp", fused)
        ref = torch.zeros_like(logps)
        loss, _ = dpo_loss(preference_inputs(logps, tokens, ref), beta=0.5)
        loss.mean().backward()
        values.append(logps.detach())
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert torch.allclose(values[0], values[1], rtol=1e-5, atol=1e-4)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    # The sum is over response tokens only: a response's count of labelled tokens, EOS included.
    assert tokens[:4].tolist() == [sum(t != -100 for t in it["chosen_labels"]) for it in items[:4]]


def test_the_precomputed_reference_equals_a_live_one(pairs):
    tokenizer, items = pairs
    items = copy.deepcopy(items)
    reference = load_causal_lm(CFG, seed=3).eval()
    precompute_reference(reference, [items[:5], items[5:]], tokenizer.pad_token_id, batch_size=3, backend="cpp",
                         fused=True)
    batch = collate_pairs(items, tokenizer.pad_token_id)
    with torch.no_grad():
        live = pair_logprobs(reference, batch, "cpp", False)[0]
    assert torch.allclose(batch["ref_logps"], live, rtol=1e-5, atol=1e-4)


def test_the_lora_reference_is_the_base_model(pairs):
    pytest.importorskip("peft")
    tokenizer, items = pairs
    batch = collate_pairs(items[:4], tokenizer.pad_token_id)
    base = load_causal_lm(CFG, seed=0)
    with torch.no_grad():
        expected = pair_logprobs(base, batch, "cpp", True)[0]
    policy = apply_lora(load_causal_lm(CFG, seed=0), LoraConfig(r=4, alpha=8), "builtin:tiny")  # the same weights
    with torch.no_grad():  # adapters that change the output
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        moved = pair_logprobs(policy, batch, "cpp", True)[0]
        with lora_scope(policy, None):
            off = pair_logprobs(policy, batch, "cpp", True)[0]
    assert not torch.allclose(moved, expected, atol=1e-3)
    assert torch.allclose(off, expected, rtol=1e-5, atol=1e-5)


def test_options_and_reference_choice_are_checked_before_anything_trains(registry_module):
    raw = load_raw(None)
    raw["stages"] = [{"stage": "dpo", "loss": {"name": "sigmoid", "beta": 0}, "reference": "adapters_off"},
                     {"stage": "dpo", "name": "d2", "loss": "bradley_terry"}]
    with pytest.raises(Exception) as err:
        resolve(raw, registry_module)
    text = str(err.value)
    assert "stages[0].loss: sigmoid: beta must be a finite number > 0, got 0" in text
    assert ("stages[0].reference: adapters_off is the policy with its LoRA adapters disabled, and model.lora is not "
            "set; use precomputed (or auto)") in text
    assert "stages[1].loss: loss 'bradley_terry' is a 'pairwise' loss, but this stage needs" in text


def dpo_run(tmp_path, loss: str) -> dict:
    """SFT on the letters task, then the dpo stage with ``loss`` at the stage's default learning rate."""
    stages = ("stages=[{stage: sft, data: {train: 'builtin:letters', builtin_size: 1200, max_length: 32}, "
              "train: {steps: 80, batch_size: 32, lr: 3.0e-3, warmup_steps: 10}}, "
              "{stage: dpo, data: {train: 'builtin:letters', builtin_size: 600, max_length: 32}, "
              f"loss: {loss}, gold: letters_gold, generation: {{max_new_tokens: 12}}, eval_prompts: 48, "
              "train: {steps: 40, batch_size: 16, log_every: 5}}]")
    result = CliRunner().invoke(cli, ["run", "--out", str(tmp_path / loss.split(",")[0].strip("{ ")), "--set", stages],
                                obj={})
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / loss.split(",")[0].strip("{ ") / "summary.json").read_text())["stages"]["dpo"]


@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])
def test_dpo_and_simpo_raise_the_gold_score_over_sft(tmp_path, loss):
    dpo = dpo_run(tmp_path, loss)
    assert dpo["eval_accuracy"] > 0.8  # held-out pairs ranked like the rater ranks them
    assert dpo["train_margin"] > 0
    assert dpo["eval_gold_end"] > dpo["eval_gold_start"], dpo


def test_kto_examples_pair_each_completion_with_the_next_ones_as_its_mismatched_pair(registry_module):
    from rlhf_core.data import Rendering
    from rlhf_plugins.preference.stage import unpaired_examples

    tokenizer = load_tokenizer(CFG)
    records = load_records("builtin:letters", "unpaired", registry_module, seed=0, builtin_size=5)
    items, _ = unpaired_examples(records, tokenizer, DataConfigForTest(), Rendering("auto", "kto", "builtin:tiny"))
    for i, item in enumerate(items):
        nxt = items[(i + 1) % len(items)]
        start = sum(t == -100 for t in item["completion_labels"])
        nxt_start = sum(t == -100 for t in nxt["completion_labels"])
        assert item["mismatched_ids"][:start] == item["completion_ids"][:start]  # its own prompt
        assert item["mismatched_ids"][start:] == nxt["completion_ids"][nxt_start:][: len(item["mismatched_ids"]) - start]
        assert item["mismatched_labels"][:start] == [-100] * start
    assert {it["desirable"] for it in items} <= {True, False}


class DataConfigForTest:
    max_length, max_prompt_length = 24, None


def test_kto_learns_and_wrong_data_kinds_are_file_line_errors(tmp_path):
    """kto on the letters task's unpaired data after SFT: desirable completions end with a higher
    implicit reward than undesirable ones, and the gold score does not fall; dpo given unpaired data
    and kto given pairwise data are refused before anything trains."""
    stages = ("stages=[{stage: sft, data: {train: 'builtin:letters', builtin_size: 1200, max_length: 32}, "
              "train: {steps: 80, batch_size: 32, lr: 3.0e-3, warmup_steps: 10}}, "
              "{stage: kto, data: {train: 'builtin:letters', builtin_size: 600, max_length: 32}, gold: letters_gold, "
              "generation: {max_new_tokens: 12}, eval_prompts: 48, train: {steps: 40, batch_size: 16, log_every: 5}}]")
    result = CliRunner().invoke(cli, ["run", "--out", str(tmp_path / "kto"), "--set", stages], obj={})
    assert result.exit_code == 0, result.output
    assert "reference: log-probs of a frozen copy, computed once before training" in result.output
    kto = json.loads((tmp_path / "kto" / "summary.json").read_text())["stages"]["kto"]
    assert kto["eval_rewards_desirable"] > kto["eval_rewards_undesirable"], kto
    assert kto["train_kl"] >= 0.0
    assert kto["eval_gold_end"] >= kto["eval_gold_start"] - 0.05, kto
    for stage, kind in (("dpo", "unpaired"), ("kto", "pairwise")):
        data = tmp_path / f"{kind}.jsonl"
        row = ({"prompt": "a=", "completion": "aaaa", "label": True} if kind == "unpaired"
               else {"prompt": "a=", "chosen": "aaaa", "rejected": "abab"})
        data.write_text(json.dumps(row) + "\n")
        result = CliRunner().invoke(cli, ["run", "--out", str(tmp_path / f"bad-{stage}"), "--set",
                                          f"stages=[{{stage: {stage}, init: base, data: {{train: '{data}'}}}}]"], obj={})
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert f"{data}:1:" in result.output, result.output
        assert not (tmp_path / f"bad-{stage}" / stage).exists()
