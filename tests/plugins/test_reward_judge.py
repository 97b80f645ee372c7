"""The ``judge`` reward: verdict probabilities of a local causal LM after a prompt template.

The judge is a tiny Llama saved with ``save_pretrained`` next to a character-level BPE tokenizer
(built with ``tokenizers``) whose merges make ``" Yes"`` and ``" No"`` single tokens, so the
default verdicts work; the expected values are computed by hand from the model's own full
forward on each unpadded sequence.
"""
from __future__ import annotations

import pytest
import torch

from rlhf_core import distributed as dist_utils
from rlhf_core.config import ModelConfig, RunConfig
from rlhf_core import StageContext, StageResult
from rlhf_plugins.rewards.judge import JudgeReward, rlhf_register_rewards, template_placeholders
from rlhf_core.plugin_system.registry import Entry

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
MERGES = [(" ", "Y"), (" Y", "e"), (" Ye", "s"), (" ", "N"), (" N", "o")]
TEMPLATE = "Q: {prompt}\nA: {response}\nGood? Verdict:"


def check_options(component, **options):
    """The host's call: every option, the unset ones at the signature's defaults."""
    return component.check_options(**Entry("reward", "under-test", component, "test").with_defaults(options))




def build_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS + ["".join(m) for m in MERGES])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A saved tiny Llama judge and its tokenizer; weights large enough that scores spread out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False, initializer_range=0.3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("judge")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_ctx(tmp_path, base: str, results: dict | None = None) -> StageContext:
    return StageContext(name="ppo", stage_dir=tmp_path, run_config=RunConfig(model=ModelConfig(name_or_path=base)),
                        registry=None, tracker=None, device=torch.device("cpu"), seed=0, results=results or {})


@pytest.fixture(scope="module")
def reference(judge_dir):
    """``(tokenizer, model)`` loaded independently of the reward, for the hand computation."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    return AutoTokenizer.from_pretrained(judge_dir), LlamaForCausalLM.from_pretrained(judge_dir).eval()


def by_hand(reference, text: str, positive: str = " Yes", negative: str | None = " No", max_length: int | None = None) -> float:
    """Softmax over the vocabulary of the full forward's logits at the last position of the
    unpadded ``[bos] text``, then p(positive) / (p(positive) + p(negative)) (or p(positive))."""
    tok, model = reference
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    if max_length is not None and len(ids) > max_length:
        ids = ids[:1] + ids[len(ids) - (max_length - 1):]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    y = tok.convert_tokens_to_ids(positive)
    if negative is None:
        return float(probs[y])
    n = tok.convert_tokens_to_ids(negative)
    return float(probs[y] / (probs[y] + probs[n]))


PROMPTS = ["What is 2+2?", "Name a colour.", "x", "Write a long sentence about the sea and the sky, please."]
RESPONSES = ["4", "Blue, like the deep ocean at noon.", "yes!", "The sea"]


def test_matches_the_full_forward_and_padding_changes_nothing(judge_dir, reference, tmp_path):
    reward = JudgeReward(make_ctx(tmp_path, str(judge_dir)), template=TEMPLATE)
    got = reward(PROMPTS, RESPONSES)
    assert got.dtype == torch.float32 and got.shape == (4,)
    want = [by_hand(reference, TEMPLATE.format(prompt=p, response=r)) for p, r in zip(PROMPTS, RESPONSES)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    assert float(got.std()) > 0.02  # the scores really differ, so a padding mistake would show
    alone = torch.cat([reward([p], [r]) for p, r in zip(PROMPTS, RESPONSES)])
    assert torch.allclose(got, alone, atol=1e-5)
    assert ((got >= 0) & (got <= 1)).all()


def test_batch_size_and_stand_in_chunks_do_not_change_values(judge_dir, tmp_path, monkeypatch):
    full = JudgeReward(make_ctx(tmp_path, str(judge_dir)), template=TEMPLATE)(PROMPTS, RESPONSES)
    reward = JudgeReward(make_ctx(tmp_path, str(judge_dir)), template=TEMPLATE, batch_size=3)
    calls = []
    real = reward.score
    monkeypatch.setattr(reward, "score", lambda rows: calls.append(len(rows)) or real(rows))
    assert torch.allclose(reward(PROMPTS, RESPONSES), full, atol=1e-5)
    assert calls == [3, 1]
    # another rank had more chunks: this one runs one-row stand-ins and drops their scores
    calls.clear()
    monkeypatch.setattr(dist_utils, "all_reduce_max", lambda t: t + 2)
    assert torch.allclose(reward(PROMPTS, RESPONSES), full, atol=1e-5)
    assert calls == [3, 1, 1, 1]
    assert reward([], []).shape == (0,)


def test_no_null_scores_p_yes_over_the_whole_vocabulary(judge_dir, reference, tmp_path):
    reward = JudgeReward(make_ctx(tmp_path, str(judge_dir)), template=TEMPLATE, negative=None)
    want = [by_hand(reference, TEMPLATE.format(prompt=p, response=r), negative=None) for p, r in zip(PROMPTS, RESPONSES)]
    assert reward(PROMPTS, RESPONSES).tolist() == pytest.approx(want, abs=1e-6)


def test_head_fallback_computes_the_same(judge_dir, tmp_path):
    """A judge whose head is not a plain linear layer is scored from the last position's logits."""
    for no in (" No", None):
        reward = JudgeReward(make_ctx(tmp_path, str(judge_dir)), template=TEMPLATE, negative=no)
        fused = reward(PROMPTS, RESPONSES)
        reward.head = None
        assert torch.allclose(reward(PROMPTS, RESPONSES), fused, atol=1e-6)
        reward.keep_last = False  # a forward without logits_to_keep: every position's logits, the last one used
        assert torch.allclose(reward(PROMPTS, RESPONSES), fused, atol=1e-6)


def test_fields_reach_the_template(judge_dir, reference, tmp_path):
    template = "Q: {prompt}\nReference: {answer}\nA: {response}\nSame? Verdict:"
    assert JudgeReward.fields(template=template, positive="Y") == ("answer",)
    assert JudgeReward.fields() == ()
    reward = JudgeReward(make_ctx(tmp_path, str(judge_dir)), template=template)
    answers = ["4", "red", 7, "The sea"]  # any value str.format can write
    got = reward(PROMPTS, RESPONSES, answer=answers)
    want = [by_hand(reference, template.format(prompt=p, response=r, answer=a))
            for p, r, a in zip(PROMPTS, RESPONSES, answers)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    assert not torch.allclose(got, reward(PROMPTS, RESPONSES, answer=["5"] * 4))
    with pytest.raises(ValueError, match="answer"):
        reward(PROMPTS, RESPONSES)


def test_long_templates_lose_their_beginning_and_keep_bos(judge_dir, reference, tmp_path):
    reward = JudgeReward(make_ctx(tmp_path, str(judge_dir)), template=TEMPLATE, max_length=12)
    got = reward(PROMPTS, RESPONSES)
    want = [by_hand(reference, TEMPLATE.format(prompt=p, response=r), max_length=12) for p, r in zip(PROMPTS, RESPONSES)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    ids = reward.render(PROMPTS[3], RESPONSES[3], {})
    assert len(ids) == 12 and ids[0] == reward.tokenizer.bos_token_id


def test_model_from_an_earlier_stage_and_single_character_verdicts(judge_dir, reference, tmp_path):
    ctx = make_ctx(tmp_path, "builtin:tiny", {"judge_sft": StageResult(model_dir=judge_dir, kind="policy")})
    reward = JudgeReward(ctx, model="@judge_sft", template=TEMPLATE, positive="Y", negative="N")
    want = [by_hand(reference, TEMPLATE.format(prompt=p, response=r), positive="Y", negative="N")
            for p, r in zip(PROMPTS, RESPONSES)]
    assert reward(PROMPTS, RESPONSES).tolist() == pytest.approx(want, abs=1e-5)


def test_a_judge_edited_to_like_an_exclamation_mark_prefers_it(judge_dir, tmp_path):
    """Block outputs zeroed: the last hidden state is the normed embedding of the last token, and
    the head's ``" Yes"`` row is the embedding of ``!``, so responses ending in ``!`` score high."""
    reward = JudgeReward(make_ctx(tmp_path, str(judge_dir)), template="{prompt}\n{response}")
    model, tok = reward.model, reward.tokenizer
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = model.get_output_embeddings().weight
        head[tok.convert_tokens_to_ids(" Yes")] = 20 * model.get_input_embeddings().weight[tok.convert_tokens_to_ids("!")]
        head[tok.convert_tokens_to_ids(" No")] = 0
    got = reward(["a", "b", "c", "d"], ["great!", "meh", "fine!", "no."])
    assert got[0] > 0.9 and got[2] > 0.9 and got[1] < got[0] and got[3] < got[2]


@pytest.mark.parametrize("options, message", [
    ({"template": "{prompt} is it good?"}, "no {response}"),
    ({"template": "{prompt} {response} {}"}, "not a field name"),
    ({"template": "{response} {0}"}, "not a field name"),
    ({"template": "{response} {row.answer}"}, "not a field name"),
    ({"template": "{response} {"}, "not a valid str.format"),
    ({"positive": ""}, "positive must be a non-empty"),
    ({"negative": ""}, "negative must be a non-empty"),
    ({"positive": " No"}, "same text"),
    ({"batch_size": 0}, "batch_size"),
    ({"max_length": 0}, "max_length"),
    ({"model": "auto"}, "latest policy"),
    ({"model": "/no/such/judge"}, "no such directory"),
])
def test_bad_options_are_value_errors_before_any_model_loads(options, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("(", r"\(")):
        check_options(JudgeReward, **options)


def test_check_options_accepts_the_defaults_and_placeholders_are_parsed():
    check_options(JudgeReward)
    check_options(JudgeReward, negative=None, template="{response}{{literal}} {answer!r:>4}")
    assert template_placeholders("{a} {response} {a} {prompt}") == ("a", "response", "prompt")


def test_multi_token_verdicts_are_refused_naming_the_tokens(judge_dir, tmp_path):
    with pytest.raises(ValueError, match=r"positive ' Maybe' is 6 tokens"):
        JudgeReward(make_ctx(tmp_path, str(judge_dir)), positive=" Maybe")
    with pytest.raises(ValueError, match="unknown token"):
        JudgeReward(make_ctx(tmp_path, str(judge_dir)), negative="\u00e9")


def test_registered_as_judge():
    seen = []
    rlhf_register_rewards(lambda name, cls: seen.append((name, cls)))
    assert seen == [("judge", JudgeReward)]
