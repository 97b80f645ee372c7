"""Record formats of every stage (TRL / Hugging Face hub): standard and conversational forms parse to
the same tokens as their equivalents, only assistant tokens are trained, ``data.chat_template``
(auto / always / never), the fallback without a template, and bad input with its FILE:LINE."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from rlhf_core.cli import cli
from rlhf_core.config import ConfigError, ModelConfig, load_raw, resolve
from rlhf_core.data import (
    IGNORE_INDEX, DataError, Record, Rendering, collate_unpaired, read_records, record_turns, render_prompt,
    tokenize_scored, tokenize_sft, tokenize_unpaired,
)
from rlhf_core.data.validation import split_common_prefix, validate_record
from rlhf_core.models import load_causal_lm, load_tokenizer
from rlhf_core.plugin_system.manager import build_registry, get_plugin_manager
from rlhf_plugins.letters import make_records

#: A ChatML-like template (Qwen's shape): each turn closes with <|im_end|> and a newline.
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PAIR = ("chosen", "rejected")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def byt5_chatml():
    """Byte tokenizer whose EOS (</s>) the template never writes: EOS follows the template's end of turn."""
    tok = ByT5Tokenizer()
    tok.chat_template = CHATML
    return tok


def bpe_chatml():
    """A BPE tokenizer with real special tokens and EOS = <|im_end|> (as Qwen's instruct models): the
    template's end of turn is the EOS, so nothing is added after it."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(["user assistant system hello there how are you", "yes no the answer is 42"] * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


TOKENIZERS = {"byt5": byt5_chatml, "bpe": bpe_chatml}


def rec(obj, kind, where="f.jsonl:1"):
    record = validate_record(obj, where, kind)
    assert record is not None
    return record


def sft_ids(obj, tok, kind="sft", rendering=None):
    items, _ = tokenize_sft([rec(obj, kind)], tok, 512, None, rendering or Rendering(echo=None))
    return items[0]


def pair_ids(obj, tok, rendering=None):
    items, _ = tokenize_scored([rec(obj, "pairwise")], tok, 512, None, PAIR, rendering or Rendering(echo=None))
    return items[0]


# ------------------------------------------------------------------ every format, the same tokens

SFT_EQUIVALENTS = [
    # conversational prompt/completion == messages
    ({"prompt": [user("hello")], "completion": [assistant("yes there")]},
     {"messages": [user("hello"), assistant("yes there")]}),
    # multi-turn: earlier turns join the prompt, the last assistant turn is the response
    ({"prompt": [{"role": "system", "content": "be brief"}, user("hello"), assistant("no"), user("how are you")],
      "completion": [assistant("yes")]},
     {"messages": [{"role": "system", "content": "be brief"}, user("hello"), assistant("no"), user("how are you"),
                   assistant("yes")]}),
    # a completion list of several messages: all but its last join the prompt
    ({"prompt": [user("hello")], "completion": [assistant("no"), user("how are you"), assistant("yes")]},
     {"messages": [user("hello"), assistant("no"), user("how are you"), assistant("yes")]}),
    # standard prompt/completion == prompt/response
    ({"prompt": "hello", "completion": "yes there"}, {"prompt": "hello", "response": "yes there"}),
]


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("first, second", SFT_EQUIVALENTS)
def test_sft_formats_give_the_same_tokens(name, first, second):
    tok = TOKENIZERS[name]()
    assert sft_ids(first, tok) == sft_ids(second, tok)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_reward_and_unpaired_formats_give_the_same_tokens_as_sft(name):
    tok = TOKENIZERS[name]()
    conv = {"prompt": [user("hello")], "completion": [assistant("yes there")]}
    expected = sft_ids(conv, tok)
    (scored,), _ = tokenize_scored([rec({"messages": conv["prompt"] + conv["completion"], "score": 0.5}, "reward")],
                                   tok, 512, None, rendering=Rendering(echo=None))
    assert (scored["response_ids"], scored["response_labels"], scored["score"]) == (
        expected["input_ids"], expected["labels"], 0.5)
    (item,), _ = tokenize_unpaired([rec({**conv, "label": False}, "unpaired")], tok, 512, None, Rendering(echo=None))
    assert (item["ids"], item["labels"], item["desirable"]) == (expected["input_ids"], expected["labels"], False)
    (item,), _ = tokenize_unpaired([rec({"prompt": "hello", "completion": "yes there", "label": True}, "unpaired")],
                                   tok, 512, None, Rendering(echo=None))
    plain = sft_ids({"prompt": "hello", "response": "yes there"}, tok)
    assert (item["ids"], item["labels"], item["desirable"]) == (plain["input_ids"], plain["labels"], True)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_pairwise_formats_give_the_same_tokens(name):
    tok = TOKENIZERS[name]()
    explicit = {"prompt": [user("hello")], "chosen": [assistant("yes")], "rejected": [assistant("no")]}
    implicit = {"chosen": [user("hello"), assistant("yes")], "rejected": [user("hello"), assistant("no")]}
    item = pair_ids(explicit, tok)
    assert item == pair_ids(implicit, tok)
    # each side is the sft example of prompt + that side
    for side, text in (("chosen", "yes"), ("rejected", "no")):
        sft = sft_ids({"messages": [user("hello"), assistant(text)]}, tok)
        assert (item[f"{side}_ids"], item[f"{side}_labels"]) == (sft["input_ids"], sft["labels"])
    # strings: an implicit prompt is the common prefix up to its last whitespace
    strings = {"prompt": "the answer is", "chosen": " 42", "rejected": " no"}
    assert pair_ids(strings, tok) == pair_ids({"chosen": "the answer is 42", "rejected": "the answer is no"}, tok)


def test_implicit_string_prompt_never_ends_inside_a_word():
    assert split_common_prefix("Q: hi A: yes", "Q: hi A: no") == ("Q: hi A:", (" yes", " no"))
    assert split_common_prefix("The answer is 42", "The answer is 45") == ("The answer is", (" 42", " 45"))
    assert split_common_prefix("good", "goodbye") == ("", ("good", "goodbye"))  # no whitespace: no prompt
    assert split_common_prefix("hi there", "hi there friend") == ("hi", (" there", " there friend"))


def test_every_prompt_form_renders_the_same_prompt():
    tok = byt5_chatml()
    expected = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    for fields in ({"prompt": [user("hello")]}, {"messages": [user("hello")]}, {"messages": [user("hello"), assistant("x")]},
                   {"prompt": [user("hello")], "completion": [assistant("x")]},
                   {"chosen": [user("hello"), assistant("a")], "rejected": [user("hello"), assistant("b")]}):
        assert render_prompt(tok, fields) == expected, fields
    assert render_prompt(tok, {"prompt": "hello"}) == "hello"  # auto: plain text as written
    assert render_prompt(tok, {"prompt": "hello"}, Rendering("always", echo=None)) == expected
    assert render_prompt(tok, {"chosen": "the answer is 42", "rejected": "the answer is no"}) == "the answer is"


# ------------------------------------------------------------------ masking: only assistant tokens

@pytest.mark.parametrize("name, closing", [("byt5", "<|im_end|>\n</s>"), ("bpe", "<|im_end|>\n")])
def test_labels_are_exactly_the_assistant_content_and_its_end_of_turn(name, closing):
    """The labelled tokens decode to the last assistant message's content, the template's end of turn
    and EOS only when the template wrote none; the rest decodes to the prompt with the generation
    prompt, earlier assistant turns included and masked."""
    tok = TOKENIZERS[name]()
    messages = [user("hello"), assistant("no"), user("how are you"), assistant("yes there")]
    item = sft_ids({"messages": messages}, tok)
    labelled = [t for t in item["labels"] if t != IGNORE_INDEX]
    assert item["input_ids"][-len(labelled):] == labelled and IGNORE_INDEX not in item["labels"][-len(labelled):]
    assert tok.decode(labelled) == "yes there" + closing
    masked = item["input_ids"][: len(item["input_ids"]) - len(labelled)]
    assert tok.decode(masked) == tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------ data.chat_template

def test_auto_prints_one_notice_per_rendering_for_plain_strings(capsys):
    tok = byt5_chatml()
    plain = [rec({"prompt": "hello", "response": "yes"}, "sft")] * 3
    rendering = Rendering("auto", "sft", "my-model")
    tokenize_sft(plain, tok, 64, None, rendering)
    tokenize_sft(plain, tok, 64, None, rendering)  # the held-out split: same stage, no second notice
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["sft: plain-text prompts go to my-model as written, without its chat template; set "
                     "data.chat_template to always to wrap each one as a user message and apply the template "
                     "(never: no template and no notice)"]
    conv = [rec({"messages": [user("hello"), assistant("yes")]}, "sft")]
    tokenize_sft(conv, tok, 64, None, Rendering("auto", "sft"))  # conversational records: templated, no notice
    tokenize_sft(plain, tok, 64, None, Rendering("never", "sft"))
    tokenize_sft(plain, ByT5Tokenizer(), 64, None, Rendering("auto", "sft"))  # no template: nothing to say
    assert capsys.readouterr().out == ""


def test_always_wraps_plain_strings_and_never_uses_the_fallback():
    tok = byt5_chatml()
    conv = sft_ids({"messages": [user("hello"), assistant("yes")]}, tok)
    assert sft_ids({"prompt": "hello", "response": "yes"}, tok, rendering=Rendering("always", echo=None)) == conv
    assert pair_ids({"prompt": "hello", "chosen": "yes", "rejected": "no"}, tok, Rendering("always", echo=None)) == \
        pair_ids({"prompt": [user("hello")], "chosen": [assistant("yes")], "rejected": [assistant("no")]}, tok)
    never = sft_ids({"messages": [user("hello"), assistant("yes")]}, tok, rendering=Rendering("never", echo=None))
    assert never == sft_ids({"prompt": "user: hello\nassistant: ", "response": "yes"}, tok)
    assert sft_ids({"prompt": "hello", "response": "yes"}, tok, rendering=Rendering("never", echo=None)) == \
        sft_ids({"prompt": "hello", "response": "yes"}, ByT5Tokenizer())


def test_without_a_template_conversations_use_role_lines_with_consistent_response_tokens():
    tok = ByT5Tokenizer()
    messages = [{"role": "system", "content": "be brief"}, user("hi"), assistant("yo")]
    assert render_prompt(tok, {"messages": messages}) == "system: be brief\nuser: hi\nassistant: "
    item = sft_ids({"prompt": messages[:-1], "completion": messages[-1:]}, tok)
    assert item == sft_ids({"prompt": "system: be brief\nuser: hi\nassistant: ", "response": "yo"}, tok)
    assert tok.decode([t for t in item["labels"] if t != IGNORE_INDEX]) == "yo</s>"


def test_always_without_a_template_is_an_error_naming_the_model():
    with pytest.raises(DataError, match="data.chat_template: always needs a chat template, and the tokenizer of "
                                        "builtin:tiny has none; use auto or never"):
        tokenize_sft([rec({"prompt": "a", "response": "b"}, "sft")], ByT5Tokenizer(), 64, None,
                     Rendering("always", "sft", "builtin:tiny"))


def test_a_template_that_rewrites_earlier_turns_is_an_error_naming_the_record(tmp_path):
    """The prompt rendered with the generation prompt must be the start of the whole conversation."""
    tok = ByT5Tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m.role }}{{ '=' if loop.last else ':' }}{{ m.content }}|{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n"
                    + json.dumps({"prompt": [user("hi")], "completion": [assistant("yo")]}) + "\n")
    records = read_records(path, "sft")
    with pytest.raises(DataError, match=rf"{path}:2: field 'completion': the chat template renders the messages before "
                                        "the final assistant message differently once that message is added"):
        tokenize_sft(records, tok, 64, None, Rendering(echo=None))


# ------------------------------------------------------------------ bad input: FILE:LINE, field, what is accepted

U, A = user("hi"), assistant("yo")


@pytest.mark.parametrize("obj, kind, message", [
    ({"prompt": "a", "chosen": "", "rejected": "b"}, "pairwise",
     "field 'chosen' is empty; a pairwise record needs a non-empty chosen and rejected response"),
    ({"prompt": [U], "chosen": [A], "rejected": []}, "pairwise", "field 'rejected' is empty"),
    ({"prompt": [U], "chosen": [A], "rejected": [assistant("")]}, "pairwise",
     "field 'rejected': the assistant message is empty"),
    ({"chosen": "a b"}, "pairwise", "missing field 'rejected'; a pairwise record needs prompt, chosen and rejected, "
                                    "or chosen and rejected that hold the prompt"),
    ({"prompt": [U], "chosen": [A], "rejected": [user("no")]}, "pairwise",
     "field 'rejected': the last message must have role 'assistant' (the response)"),
    ({"chosen": [U, A], "rejected": [user("other"), A]}, "pairwise",
     "fields 'chosen' and 'rejected' differ before their final assistant message"),
    ({"chosen": [A], "rejected": [assistant("no")]}, "pairwise",
     "fields 'chosen' and 'rejected': no message before the final assistant one (the prompt)"),
    ({"prompt": "hi", "chosen": [A], "rejected": [A]}, "pairwise",
     "field 'prompt' must be a list of {role, content} messages like 'chosen' (a conversational record), got a string"),
    ({"chosen": [U, A], "rejected": "no"}, "pairwise",
     "field 'rejected' must be a list of {role, content} messages like 'chosen'"),
    ({"prompt": [U], "completion": [user("more")]}, "sft",
     "field 'completion': the last message must have role 'assistant' (the response)"),
    ({"prompt": [U], "completion": "yo"}, "sft",
     "field 'completion' must be a list of {role, content} messages like 'prompt' (a conversational record), got str"),
    ({"prompt": [U], "completion": [user("more")], "label": True}, "unpaired",
     "field 'completion': the last message must have role 'assistant'"),
    ({"prompt": "a", "completion": "", "label": True}, "unpaired", "field 'completion' is empty"),
    ({"prompt": "a", "completion": "b"}, "unpaired",
     "missing field 'label' (true: a desirable completion, false: an undesirable one); an unpaired record needs "
     "prompt, completion (or response) and label"),
    ({"prompt": "a", "completion": "b", "label": 1}, "unpaired",
     "field 'label' must be true (a desirable completion) or false (an undesirable one), got 1"),
    # the other kind's preference data: says what it looks like and who reads it
    ({"prompt": "a", "completion": "b", "label": True}, "pairwise",
     "missing field 'chosen'; a pairwise record needs prompt, chosen and rejected, or chosen and rejected that hold "
     "the prompt; the record looks like unpaired preference data (a completion with a true/false label), which an "
     "unpaired consumer (the kto stage) reads, not a pairwise one"),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "unpaired",
     "missing field 'completion' (or 'response', or 'messages'); an unpaired record needs prompt, completion (or "
     "response) and label, or messages and label; the record looks like pairwise preference data (chosen, rejected), "
     "which a pairwise consumer (the reward stage's pairwise loss, the dpo stage) reads, not an unpaired one"),
    ({"prompt": "a", "completion": "b", "label": False}, "reward",
     "missing field 'score'; a reward record needs prompt, response (or completion) and score, or messages and score; "
     "the record looks like unpaired preference data"),
    ({"prompt": 3}, "prompts", "field 'prompt' must be a string, got int (or a list of {role, content} messages)"),
    ({"prompt": [{"role": "user"}]}, "prompts", "field 'prompt[0]' must be an object with string 'role' and 'content'"),
])
def test_bad_records_name_file_line_field_and_what_is_accepted(tmp_path, obj, kind, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "chosen": "x", "rejected": "y", "response": "r", "completion": "c",
                                "label": True, "score": 1.0}) + "\n" + json.dumps(obj) + "\n")
    with pytest.raises(DataError) as info:
        read_records(path, kind)
    assert f"{path}:2: {message}" in str(info.value)


def test_equal_sides_are_dropped_in_every_form():
    for obj in ({"chosen": [U, A], "rejected": [U, A]}, {"chosen": "a b", "rejected": "a b"},
                {"prompt": [U], "chosen": [A], "rejected": [A]}):
        assert validate_record(obj, "x", "pairwise") is None


def test_csv_labels_and_mapped_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer,label\nhi,yo,true\nhey,no,False\n")
    records = read_records(path, "unpaired", fields={"prompt": "question", "completion": "answer"})
    assert [(r.fields["prompt"], r.fields["completion"], r.fields["label"]) for r in records] == [
        ("hi", "yo", True), ("hey", "no", False)]


def test_collate_unpaired_and_its_mismatched_pairs():
    tok = ByT5Tokenizer()  # byte ids: "p" -> 115, "ab" -> 100 101; EOS 1
    records = [rec({"prompt": "p", "completion": "ab", "label": True}, "unpaired"),
               rec({"prompt": "qq", "completion": "c", "label": False}, "unpaired")]
    items, stats = tokenize_unpaired(records, tok, 64, None)
    assert items[0] == {"ids": [115, 100, 101, 1], "labels": [IGNORE_INDEX, 100, 101, 1], "desirable": True}
    batch = collate_unpaired(items, tok.pad_token_id, mismatched=True)
    assert batch["desirable"].tolist() == [True, False]
    assert batch["input_ids"].tolist() == [[115, 100, 101, 1], [116, 116, 102, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 100, 101, 1], [IGNORE_INDEX, IGNORE_INDEX, 102, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    # row 0: "p" + the second completion "c"; row 1: "qq" + the first completion "ab", cut to 4 tokens
    assert batch["kl_input_ids"].tolist() == [[115, 102, 1, 0], [116, 116, 100, 101]]
    assert batch["kl_labels"].tolist() == [[IGNORE_INDEX, 102, 1, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 100, 101]]
    assert batch["kl_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert set(collate_unpaired(items, 0)) == {"input_ids", "attention_mask", "labels", "desirable"}


def test_turns_of_a_hand_made_record():
    turns = record_turns({"messages": [U, A]}, "sft")
    assert (turns.prompt, turns.responses, turns.conversational) == ([U], {"response": A}, True)
    assert tokenize_sft([Record("x", {"prompt": "a", "completion": "b"})], ByT5Tokenizer(), 8, None)[0] == [
        {"input_ids": [100, 101, 1], "labels": [IGNORE_INDEX, 101, 1]}]


# ------------------------------------------------------------------ the command line and a stage

def invoke(*args):
    return CliRunner().invoke(cli, list(args), obj={})


def test_generate_chat_template_on_a_model_without_one():
    result = invoke("generate", "builtin:tiny", "--chat-template", "always", "--prompt", "hi", "--max-new-tokens", "2")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert ("--chat-template: always needs a chat template, and the tokenizer of builtin:tiny has none; use auto or "
            "never") in result.output
    for mode in ("auto", "never"):
        result = invoke("generate", "builtin:tiny", "--chat-template", mode, "--prompt", "hi", "--max-new-tokens", "2",
                        "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["prompt"] == "hi"


@pytest.fixture(scope="module")
def templated_model(tmp_path_factory):
    """builtin:tiny saved with a ChatML template on its byte tokenizer."""
    path = tmp_path_factory.mktemp("chatml")
    config = ModelConfig()
    load_causal_lm(config).save_pretrained(path)
    tok = load_tokenizer(config)
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    return path


def test_generate_with_a_template_model(templated_model):
    result = invoke("generate", str(templated_model), "--prompt", "a=", "--prompt", "b=", "--max-new-tokens", "2", "--json")
    assert result.exit_code == 0, result.output
    notices = [line for line in result.output.splitlines() if "plain-text prompts" in line]
    assert notices == [f"rlhf generate: plain-text prompts go to {templated_model} as written, without its chat "
                       "template; set --chat-template to always to wrap each one as a user message and apply the "
                       "template (never: no template and no notice)"]
    result = invoke("generate", str(templated_model), "--chat-template", "always", "--prompt", "a=",
                    "--max-new-tokens", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["prompt"] == "<|im_start|>user\na=<|im_end|>\n<|im_start|>assistant\n"


def test_eval_maps_columns_with_fields(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i}+1?", "solution": str(i + 1)}) + "\n" for i in range(3)))
    common = ["eval", "builtin:tiny", "--prompts", str(path), "--reward", "math", "--max-new-tokens", "2", "--json"]
    result = invoke(*common, "--fields", "prompt=question,answer=solution")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1])["prompts"] == 3
    result = invoke(*common, "--fields", "prompt=question")
    assert result.exit_code == 1 and f"{path}:1: missing field 'answer', which --reward 'math' reads" in result.output
    result = invoke(*common, "--fields", "prompt")
    assert result.exit_code == 2 and "expected FIELD=COLUMN pairs separated by commas" in result.output


def test_each_stage_prints_the_notice_once(tmp_path, templated_model):
    """sft, reward and ppo on plain strings with a model that has a template: one notice per stage,
    while a conversational sft stage trains through the template without one."""
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"{c}=", "completion": c * 4}) + "\n" for c in "abcd" * 4))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"prompt": [user(f"{c}=")], "completion": [assistant(c * 4)]}) + "\n"
                            for c in "abcd" * 4))
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"prompt": f"{c}=", "response": c * n, "score": n / 4}) + "\n"
                              for c in "abcd" for n in range(1, 5)))
    stages = (f"stages=[{{stage: sft, data: {{train: {sft}, max_length: 64}}, train: {{steps: 1, batch_size: 4}}}}, "
              f"{{stage: sft, name: chat, data: {{train: {chat}, max_length: 64}}, train: {{steps: 1, batch_size: 4}}}}, "
              f"{{stage: reward, data: {{train: {scores}, max_length: 64}}, train: {{steps: 1, batch_size: 4}}}}, "
              f"{{stage: ppo, data: {{train: {sft}, max_length: 64}}, iterations: 1, prompts_per_batch: 2, "
              f"minibatch_size: 2, eval_prompts: 2, generation: {{max_new_tokens: 4}}}}]")
    result = invoke("run", "--out", str(tmp_path / "run"), "--set", f"model.name_or_path={templated_model}",
                    "--set", stages)
    assert result.exit_code == 0, result.output
    notices = [line for line in result.output.splitlines() if "plain-text prompts" in line]
    assert [line.split(":")[0] for line in notices] == ["sft", "reward", "ppo"]
    assert "set data.chat_template to always" in notices[0]


def test_a_template_that_writes_bos_gets_no_second_one():
    tok = bpe_chatml()
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = "{{ bos_token }}" + CHATML
    item = sft_ids({"messages": [user("hello"), assistant("yes")]}, tok)
    assert item["input_ids"][:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|im_start|>")]
    assert sft_ids({"prompt": "hello", "response": "yes"}, tok)["input_ids"][0] == tok.bos_token_id  # plain: BOS added


def test_chat_template_and_fields_in_the_config():
    registry = build_registry(get_plugin_manager(entry_points=False))
    good = resolve(load_raw(None, ["stages.sft.data.chat_template=always",
                                   "stages.ppo.data.fields={prompt: question, answer: solution}"]), registry)
    assert good.stages[0].config.data.chat_template == "always"
    with pytest.raises(ConfigError, match=r"stages\[0\].data.chat_template: expected one of 'auto', 'always', 'never', "
                                          "got 'sometimes'"):
        resolve(load_raw(None, ["stages.sft.data.chat_template=sometimes"]), registry)


def test_builtin_letters_has_unpaired_data():
    records = [validate_record(obj, f"letters {i}", "unpaired") for i, obj in enumerate(make_records("unpaired", 64, 0))]
    assert {r.fields["label"] for r in records} == {True, False}


def test_always_without_a_template_is_refused_before_anything_trains(tmp_path, templated_model):
    result = invoke("run", "--dry-run", "--set", "stages.reward.data.chat_template=always")
    assert result.exit_code == 1 and "== stage" not in result.output
    assert ("stages[1].data.chat_template: always needs a chat template, and the tokenizer of builtin:tiny has none; "
            "use auto or never") in result.output
    result = invoke("run", "--dry-run", "--set", f"model.name_or_path={templated_model}",
                    "--set", "stages.reward.data.chat_template=always")
    assert result.exit_code == 0, result.output
