"""Multi-turn episodes: token-in/token-out alignment, rendering, limits, tools, and environments
that misbehave. The learning checks are in test_environments_learn (CLI runs)."""
from __future__ import annotations

import time
import types

import pytest
import torch
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlhf_core import ComponentError, ComponentSpec, GenerationConfig, ModelConfig, Observation, Rollout, role_lines
from rlhf_core import CheckedEnvironment, hookimpl, render_prompt
from rlhf_core.models import load_causal_lm, load_tokenizer
from rlhf_core.plugin_system.manager import build_registry, get_plugin_manager
from rlhf_core.plugin_system.registry import Entry
from rlhf_core.sampling import generate, make_rollout, pad_prompts
from rlhf_plugins.ppo.config import EnvironmentSpec
from rlhf_plugins.ppo.environments import Answer, GuessNumber
from rlhf_plugins.ppo.episodes import EpisodeRendering, EpisodeRunner, ToolBox
from rlhf_plugins.ppo.rollout import score_tokens
from rlhf_plugins.tools import calculator


def entry(kind, name, obj, **meta):
    return Entry(kind, name, obj, "test-plugin", meta)


class Recording:
    """A generator that samples with rlhf's ``generate`` from ``policy`` and records every turn's
    sampled ids; with ``logprobs``, it reports the log-probs of the sampled tokens under the
    policy as it saw them (its own forward over the turn's left-padded context)."""

    def __init__(self, policy, tokenizer, loop="generate", logprobs=True):
        self.policy, self.tokenizer, self.loop, self.logprobs = policy, tokenizer, loop, logprobs
        self.turns: list[list[list[int]]] = []

    def generate(self, prompt_ids, *, max_new_tokens, temperature, top_p):
        roll = generate(self.policy, self.tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, device=torch.device("cpu"), loop=self.loop)
        self.turns.append([roll.labels[i][roll.mask[i].bool()].tolist() for i in range(len(prompt_ids))])
        if self.logprobs:
            roll.logprobs = score_tokens(self.policy, roll, None)[0] * roll.mask
        return roll


class Scripted:
    """A generator that replies with fixed token ids, turn after turn (token-in/token-out: no model)."""

    def __init__(self, tokenizer, replies: list[list[int]]):
        self.tokenizer, self.replies, self.calls = tokenizer, replies, 0

    def generate(self, prompt_ids, *, max_new_tokens, temperature, top_p):
        reply = self.replies[min(self.calls, len(self.replies) - 1)][:max_new_tokens]
        self.calls += 1
        ids, attn = pad_prompts(self.tokenizer, prompt_ids, torch.device("cpu"))
        response = torch.tensor([reply] * len(prompt_ids), dtype=torch.long)
        return make_rollout(self.tokenizer, ids, attn, response)


def runner(env, generator, tokenizer, *, spec=None, tools=None, max_new_tokens=8, max_length=256, context=None,
           template=False):
    spec = spec or EnvironmentSpec("test", max_turns=4)
    toolbox = ToolBox(tools, spec.tool_tags, spec.tool_timeout) if tools else None
    rendering = EpisodeRendering(tokenizer, template, toolbox.schemas if toolbox else None, "test")
    checked = env if isinstance(env, CheckedEnvironment) else CheckedEnvironment(entry("environment", "test", type(env)), env)
    return EpisodeRunner(spec, checked, toolbox, rendering, tokenizer, generator,
                         GenerationConfig(max_new_tokens=max_new_tokens), prompt_budget=64, max_length=max_length,
                         context=context, device=torch.device("cpu"))


def policy_tokens(roll: Rollout, row: int) -> list[int]:
    return roll.sequences[row, roll.prompt_len:][roll.mask[row].bool()].tolist()


@pytest.mark.parametrize("loop", ["generate", "rlhf"])
def test_loss_masked_tokens_are_the_sampled_ones_and_the_trainer_scores_them_like_the_generator(loop):
    torch.manual_seed(0)
    tok = load_tokenizer(ModelConfig())
    policy = load_causal_lm(ModelConfig(), seed=0).eval()
    gen = Recording(policy, tok, loop)
    batch = runner(GuessNumber(), gen, tok, spec=EnvironmentSpec("guess", max_turns=3)).run(
        [{"target": "3"}, {"target": "7"}, {}], [1, 2, 3])
    roll = batch.rollout
    for b, e in enumerate(batch.episodes):  # the rollout's loss tokens are the episode's policy tokens
        assert policy_tokens(roll, b) == [t for t, p in zip(e.body, e.policy) if p]
    # The environment's tokens are attended to but never targets.
    assert (roll.labels[roll.mask == 0] == -100).all()
    assert roll.attention_mask[:, roll.prompt_len:].sum() > roll.mask.sum()  # feedback tokens are context
    trainer = score_tokens(policy, roll, None)[0]
    assert roll.logprobs is not None
    assert torch.allclose(trainer * roll.mask, roll.logprobs, atol=1e-5), (trainer * roll.mask - roll.logprobs).abs().max()


def test_each_episode_holds_exactly_the_turns_sampled_for_it():
    torch.manual_seed(1)
    tok = load_tokenizer(ModelConfig())
    policy = load_causal_lm(ModelConfig(), seed=0).eval()
    gen = Recording(policy, tok, logprobs=False)
    r = runner(GuessNumber(), gen, tok, spec=EnvironmentSpec("guess", max_turns=3))
    seen: list[list[int]] = []
    original = r._reply

    def reply(running, episodes):  # remember which episode each generate row belongs to
        seen.append([episodes.index(e) for e in running])
        original(running, episodes)

    r._reply = reply
    batch = r.run([{"target": "1"}, {"target": "8"}, {"target": "4"}, {}], [1, 2, 3, 4])
    expected = {b: [] for b in range(4)}
    for rows, turn in zip(seen, gen.turns):
        for row, b in enumerate(rows):
            expected[b] += turn[row]
    for b in range(4):
        assert policy_tokens(batch.rollout, b) == expected[b]
        assert len([1 for rows in seen if b in rows]) == batch.episodes[b].turns


def merging_tokenizer():
    """A BPE tokenizer whose merge "a" + "b" -> "ab" makes decode-then-encode differ from what was
    sampled: the policy's separate "a", "b" decode to "ab", which encodes as one token."""
    from tokenizers import Tokenizer, decoders, models

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    vocab["ab"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    core.decoder = decoders.Fuse()  # tokens decode to their text, joined
    core.add_special_tokens(["<pad>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>")


def test_a_reply_that_re_encodes_differently_is_trained_on_as_sampled():
    tok = merging_tokenizer()
    a, b, ab, eos = tok.convert_tokens_to_ids(["a", "b", "ab", "</s>"])
    three = tok.convert_tokens_to_ids("3")
    assert tok(tok.decode([a, b]), add_special_tokens=False)["input_ids"] == [ab]  # re-encoding would merge them
    gen = Scripted(tok, [[a, b, eos], [three, eos]])
    batch = runner(GuessNumber(), gen, tok, spec=EnvironmentSpec("guess", max_turns=3)).run([{"target": "3"}], [0])
    e = batch.episodes[0]
    assert e.ended == "done" and e.reward == pytest.approx(0.9)  # "ab" had no number; "3" solved it on turn 2
    assert policy_tokens(batch.rollout, 0) == [a, b, eos, three, eos]
    assert batch.rollout.labels[0][batch.rollout.mask[0].bool()].tolist() == [a, b, eos, three, eos]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256))
    logp, _ = score_tokens(model.eval(), batch.rollout, None)
    assert logp.shape == batch.rollout.mask.shape and torch.isfinite(logp).all()


def test_fallback_rendering_matches_the_sft_rendering_of_the_same_conversation():
    tok = load_tokenizer(ModelConfig())
    eos = tok.eos_token_id
    replies = [tok("5", add_special_tokens=False)["input_ids"] + [eos], tok("7", add_special_tokens=False)["input_ids"] + [eos]]
    batch = runner(GuessNumber(), Scripted(tok, replies), tok).run([{"target": "7"}], [0])
    e = batch.episodes[0]
    assert [m["content"] for m in e.messages] == ["Guess my number from 1 to 16.", "5", "higher", "7"]
    # The episode's tokens up to the last reply are what SFT gives the same conversation as its prompt.
    prompt = render_prompt(tok, {"messages": e.messages})
    assert prompt == role_lines(e.messages[:-1], "</s>")
    before_last = e.opening + e.body[:len(e.body) - len(replies[1])]
    assert before_last == tok(prompt, add_special_tokens=False)["input_ids"]


# A turn closes with EOS then ";" (what follows the EOS the policy sampled is the template's closing).
CHAT_TEMPLATE = ("{% if tools %}<|tools|>{{ tools | length }};{% endif %}"
                 "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>;{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("tools", [False, True])
def test_chat_template_episodes_are_the_template_rendering_of_the_conversation(tools):
    tok = ByT5Tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    eos = tok.eos_token_id
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>'
    replies = ([tok(call, add_special_tokens=False)["input_ids"] + [eos]] if tools else []) + \
        [tok("4", add_special_tokens=False)["input_ids"] + [eos], tok("5", add_special_tokens=False)["input_ids"] + [eos]]
    tool_entries = [entry("tool", "calculator", calculator)] if tools else None
    batch = runner(GuessNumber(), Scripted(tok, replies), tok, tools=tool_entries, template=True,
                   max_new_tokens=128).run([{"target": "5"}], [0])
    e = batch.episodes[0]
    assert e.ended == "done"
    if tools:
        assert e.messages[2] == {"role": "tool", "name": "calculator", "content": "5"} and e.tool_calls == 1
    schemas = [runner(GuessNumber(), None, tok, tools=tool_entries, template=True).tools.schemas[0]] if tools else None
    whole = tok.apply_chat_template(e.messages, tools=schemas, tokenize=False, add_generation_prompt=False)
    assert e.opening + e.body == tok(whole, add_special_tokens=False)["input_ids"][:len(e.opening) + len(e.body)]
    assert whole == tok.decode(e.opening + e.body) + ";"


def test_max_turns_max_tokens_and_a_turn_without_eos_end_episodes_and_are_counted():
    tok = load_tokenizer(ModelConfig())
    eos = tok.eos_token_id
    wrong = tok("1", add_special_tokens=False)["input_ids"] + [eos]
    # never solved: max_turns ends it after exactly 3 turns
    batch = runner(GuessNumber(), Scripted(tok, [wrong]), tok, spec=EnvironmentSpec("g", max_turns=3)).run(
        [{"target": "8"}] * 2, [0, 1])
    assert [e.ended for e in batch.episodes] == ["max_turns"] * 2 and [e.turns for e in batch.episodes] == [3, 3]
    assert batch.stats["episode_cut_turns"] == 1.0 and batch.stats["episode_turns"] == 3.0
    assert batch.truncated.all() and batch.rewards.eq(0).all()
    # a token budget: the second turn's feedback would not fit
    batch = runner(GuessNumber(), Scripted(tok, [wrong]), tok, spec=EnvironmentSpec("g", max_turns=5, max_tokens=20)).run(
        [{"target": "8"}], [0])
    e = batch.episodes[0]
    assert e.ended == "max_tokens" and len(e.body) <= 20 and batch.stats["episode_cut_tokens"] == 1.0
    # the model's context: same, counted apart
    batch = runner(GuessNumber(), Scripted(tok, [wrong]), tok, context=80).run([{"target": "8"}], [0])
    e = batch.episodes[0]
    assert e.ended == "context" and len(e.opening) + len(e.body) <= 80 and batch.stats["episode_cut_context"] == 1.0
    # a reply cut by max_new_tokens before EOS
    batch = runner(GuessNumber(), Scripted(tok, [tok("12345", add_special_tokens=False)["input_ids"]]), tok,
                   max_new_tokens=3).run([{"target": "8"}], [0])
    assert batch.episodes[0].ended == "turn_tokens" and batch.episodes[0].turns == 1
    assert batch.stats["episode_cut_turn"] == 1.0


def test_tool_calls_parse_run_and_every_failure_is_an_observation():
    def slow(seconds: float) -> str:
        """Sleep.

        Args:
            seconds: how long
        """
        time.sleep(seconds)
        return "woke"

    def broken(x: int) -> str:
        """Raise.

        Args:
            x: anything
        """
        raise RuntimeError("boom")

    box = ToolBox([entry("tool", "calculator", calculator), entry("tool", "slow", slow), entry("tool", "broken", broken)],
                  ["<tool_call>", "</tool_call>"], timeout=0.5)
    assert box.respond("no call here") is None
    messages, calls, errors = box.respond('x <tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}'
                                          '</tool_call> and <tool_call>{"name": "calculator", "arguments": '
                                          '"{\\"expression\\": \\"1+1\\"}"}</tool_call>')
    assert [m["content"] for m in messages] == ["42", "2"] and (calls, errors) == (2, 0)
    cases = {
        '<tool_call>{"name": "calculator", "arguments": {"expression": "6*"}}</tool_call>': "error: ValueError",
        '<tool_call>{"name": "calc"}</tool_call>': "error: no tool named 'calc'; available: broken, calculator, slow",
        '<tool_call>{"name": "calculator", "arguments": {"expression": "1"}': "error: the call has no closing",
        "<tool_call>{nope}</tool_call>": "error: the call is not valid JSON",
        '<tool_call>["calculator"]</tool_call>': "error: a call is a JSON object",
        '<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>': "error: TypeError",
        '<tool_call>{"name": "broken", "arguments": {"x": 1}}</tool_call>': "error: RuntimeError: boom",
        '<tool_call>{"name": "slow", "arguments": {"seconds": 5}}</tool_call>': "error: slow did not finish within 0.5 s",
    }
    for reply, expected in cases.items():
        started = time.perf_counter()
        messages, calls, errors = box.respond(reply)
        assert messages[0]["content"].startswith(expected), (reply, messages)
        assert (calls, errors) == (1, 1) and time.perf_counter() - started < 2
    assert box.schemas[0]["function"]["name"] == "calculator"
    assert box.schemas[0]["function"]["parameters"]["required"] == ["expression"]


def test_calculator_evaluates_arithmetic_and_nothing_else():
    assert [calculator(x) for x in ("23+48", "7/2", "(2+3)*4", "-3**2", "10//3")] == ["71", "3.5", "20", "-9", "3"]
    for bad in ("__import__('os')", "x+1", "2**1000", "[1]"):
        with pytest.raises(ValueError):
            calculator(bad)


class Raising:
    def reset(self, row, seed):
        return Observation([{"role": "user", "content": "hi"}])

    def step(self, state, reply):
        raise KeyError("no such state")


class WrongType:
    def reset(self, row, seed):
        return Observation([{"role": "user", "content": "hi"}])

    def step(self, state, reply):
        return {"messages": [], "done": True}


class Hanging:
    def reset(self, row, seed):
        return Observation([{"role": "user", "content": "hi"}])

    def step(self, state, reply):
        time.sleep(60)


@pytest.mark.parametrize("env, message", [
    (Raising(), "environment 'test' (plugin 'test-plugin') raised KeyError in step: 'no such state'"),
    (WrongType(), "environment 'test' (plugin 'test-plugin') step returned dict; expected rlhf_core.Observation"),
    (Hanging(), "environment 'test' (plugin 'test-plugin'): step did not return within environment.step_timeout (0.5 s)"),
])
def test_an_environment_that_raises_returns_the_wrong_type_or_hangs_is_named(env, message):
    tok = load_tokenizer(ModelConfig())
    reply = tok("1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    started = time.perf_counter()
    with pytest.raises(ComponentError) as err:
        runner(env, Scripted(tok, [reply]), tok, spec=EnvironmentSpec("test", step_timeout=0.5)).run([{}], [0])
    assert message in str(err.value)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("bad, message", [
    (Observation([{"role": "user"}]), "expected a list of {'role': str, 'content': str} dicts"),
    (Observation(reward=float("nan")), "returned reward nan; expected a finite number"),
    (Observation(done=1), "returned done 1; expected True or False"),
    (Observation(info={"x": "high"}), "info with non-numeric or non-finite values for ['x']"),
])
def test_observations_are_checked(bad, message):
    class Env:
        def reset(self, row, seed):
            return Observation([{"role": "user", "content": "q"}])

        def step(self, state, reply):
            return bad

    checked = CheckedEnvironment(entry("environment", "env", Env), Env())
    with pytest.raises(ComponentError, match="environment 'env' \\(plugin 'test-plugin'\\) step"):
        checked.step(None, "x")
    with pytest.raises(ComponentError) as err:
        checked.step(None, "x")
    assert message in str(err.value)
    with pytest.raises(ComponentError, match="done=True from reset"):
        CheckedEnvironment(entry("environment", "env", Env), type("E", (), {"reset": lambda s, r, x: Observation(
            [{"role": "user", "content": "q"}], done=True)})()).reset({}, 0)


def test_answer_opens_with_the_rows_prompt_and_ends_at_the_first_answer():
    env = Answer(system="Use the calculator.")
    opening = env.reset({"prompt": "What is 2+2?"}, 0)
    assert opening.messages == [{"role": "system", "content": "Use the calculator."},
                                {"role": "user", "content": "What is 2+2?"}]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]
    assert Answer().reset({"prompt": chat}, 0).messages == chat
    assert Answer().step(None, "4").done


def test_guess_follows_the_rows_target_or_the_seed_and_rewards_fewer_turns():
    env = GuessNumber(low=1, high=8, turn_penalty=0.1)
    obs = env.reset({"target": "6"}, 0)
    assert obs.state == {"target": 6, "turns": 0}
    first = env.step(obs.state, "4")
    assert first.messages == [{"role": "user", "content": "higher"}] and not first.done
    second = env.step(first.state, "I say 7")
    assert second.messages[0]["content"] == "lower"
    third = env.step(second.state, "6")
    assert third.done and third.reward == pytest.approx(0.8) and third.info == {"solved": 1.0}
    assert env.step(obs.state, "six").info["invalid"] == 1.0
    assert env.reset({}, 5).state == env.reset({}, 5).state  # a function of the seed
    assert len({env.reset({}, s).state["target"] for s in range(40)}) == 8
    with pytest.raises(ValueError, match="low must be below high"):
        GuessNumber.check_options(low=3, high=3, turn_penalty=0)


def test_a_plugins_tools_and_environment_register_and_reach_the_episode():
    def shout(text: str) -> str:
        """Upper-case a text.

        Args:
            text: what to shout
        """
        return text.upper()

    schema = {"type": "function", "function": {"name": "ignored", "description": "Reverse a text.",
                                               "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}

    @hookimpl
    def rlhf_register_tools(register):
        register("shout", shout)
        register("reverse", lambda text: text[::-1], schema=schema)

    @hookimpl
    def rlhf_register_environments(register):
        register("once", Answer)

    pm = get_plugin_manager(entry_points=False)
    pm.register(types.SimpleNamespace(rlhf_register_tools=rlhf_register_tools,
                                      rlhf_register_environments=rlhf_register_environments), name="my-tools")
    registry = build_registry(pm)
    tools = [registry.lookup("tool", ComponentSpec(n)) for n in ("shout", "reverse")]
    assert registry.lookup("environment", ComponentSpec("once")).plugin == "my-tools"
    box = ToolBox(tools, ["<tool_call>", "</tool_call>"], 5.0)
    assert [s["function"]["name"] for s in box.schemas] == ["shout", "reverse"]  # the registered names
    assert box.schemas[1]["function"]["description"] == "Reverse a text." and schema["function"]["name"] == "ignored"
    tok = load_tokenizer(ModelConfig())
    call = ('<tool_call>{"name": "shout", "arguments": {"text": "hi"}}</tool_call>'
            '<tool_call>{"name": "reverse", "arguments": {"text": "abc"}}</tool_call>')
    replies = [tok(call, add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
               tok("done", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    batch = runner(Answer(), Scripted(tok, replies), tok, tools=tools, max_new_tokens=200).run([{"prompt": "go"}], [0])
    e = batch.episodes[0]
    assert [m["content"] for m in e.messages if m["role"] == "tool"] == ["HI", "cba"]
    assert e.ended == "done" and e.turns == 2 and e.final == "done" and e.tool_calls == 2
    assert batch.stats["tool_calls"] == 2.0 and batch.stats["tool_errors"] == 0.0
