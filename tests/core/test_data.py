"""Data: bad input names file, line and field; prompt masking; explicit truncation accounting."""
from __future__ import annotations

import json

import pytest
from transformers import ByT5Tokenizer

from rlhf_core.data import (
    IGNORE_INDEX, DataError, Record, collate_sft, fit_length, read_records, render_prompt, split_records,
    tokenize_scored, tokenize_sft,
)


def write(tmp_path, name, content: bytes | str):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(
    "content, kind, message",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n', "sft", ":2: invalid JSON"),
        ('{"prompt": "a"}\n', "sft", ":1: missing field 'response' (or 'messages')"),
        ('{"prompt": "a", "response": 3}\n', "sft", ":1: field 'response' must be a string, got int"),
        ('{"prompt": "a", "response": "b", "score": "high"}\n', "reward", ":1: field 'score' must be a number"),
        ('{"prompt": "a", "response": "b", "score": NaN}\n', "reward", ":1: field 'score' must be finite"),
        ('{"prompt": "a", "response": "b", "score": Infinity}\n', "reward", ":1: field 'score' must be finite"),
        ('[1, 2]\n', "prompts", ":1: expected a JSON object, got list"),
        ('\n\n', "sft", ": no records (the file is empty)"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "sft", "last message must have role 'assistant'"),
        ('{"messages": [{"role": "user"}]}\n', "prompts", "'messages[0]' must be an object with string 'role'"),
        ('{"prompt": "a", "chosen": "b"}\n', "pairwise", ":1: missing field 'rejected'"),
        # a column other datasets use for the field: the message says which mapping fixes it
        ('{"prompt": "a", "answer": "b"}\n', "sft",
         ":1: missing field 'response' (or 'messages'); a sft record needs prompt and response (or completion), or "
         "messages; the record has a 'answer' field: map it with data.fields: {response: answer}"),
        ('{"question": "a", "answer": "b", "rating": 1}\n', "reward",
         "the record has a 'question' field: map it with data.fields: {prompt: question}"),
    ],
)
def test_bad_jsonl_names_file_line_field(tmp_path, content, kind, message):
    path = write(tmp_path, "d.jsonl", content)
    with pytest.raises(DataError) as info:
        read_records(path, kind)
    assert str(path) in str(info.value) and message in str(info.value)


def test_undecodable_bytes(tmp_path):
    path = write(tmp_path, "d.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid UTF-8"):
        read_records(path, "sft")


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown data format '.txt'; accepted: .jsonl, .json, .csv, .parquet"):
        read_records(write(tmp_path, "d.txt", "x"), "sft")
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "missing.jsonl", "sft")


def test_csv_and_json_formats(tmp_path):
    csv_path = write(tmp_path, "d.csv", "prompt,response,score\nhi,there,0.5\nyo,bad,oops\n")
    with pytest.raises(DataError, match=r"d.csv:3: field 'score' must be a number, got 'oops'"):
        read_records(csv_path, "reward")
    json_path = write(tmp_path, "d.json", json.dumps([{"prompt": "p", "response": "r"}]))
    assert read_records(json_path, "sft")[0].fields == {"prompt": "p", "response": "r"}


def test_prompt_masking_and_eos():
    tok = ByT5Tokenizer()
    items, stats = tokenize_sft([Record("x", {"prompt": "ab", "response": "cd"})], tok, 64, None)
    (item,) = items
    # ByT5 ids are byte + 3; EOS is 1.
    assert item["input_ids"] == [100, 101, 102, 103, 1]
    assert item["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 102, 103, 1]
    assert (stats.total, stats.truncated, stats.skipped) == (1, 0, 0)
    batch = collate_sft(items + [{"input_ids": [5], "labels": [5]}], tok.pad_token_id)
    assert batch["labels"][1].tolist() == [5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"][1].tolist() == [1, 0, 0, 0, 0]


def test_truncation_is_counted_never_silent():
    assert fit_length([1, 2, 3, 4], [5, 6, 7, 8], 6, None) == ([2, 3, 4], [5, 6, 7], True)
    assert fit_length([1, 2], [5, 6], 6, None) == ([1, 2], [5, 6], False)
    assert fit_length([1, 2, 3, 4, 5, 6], [7], 4, 4) == ([3, 4, 5, 6], [], True)
    tok = ByT5Tokenizer()
    records = [Record("f:1", {"prompt": "a" * 10, "response": "b" * 10}), Record("f:2", {"prompt": "x", "response": "y"})]
    items, stats = tokenize_sft(records, tok, max_length=8, max_prompt_length=8)
    assert (stats.total, stats.truncated, stats.skipped, stats.skipped_sources) == (2, 1, 1, ["f:1"])
    assert len(items) == 1 and "1 skipped" in stats.describe() and "f:1" in stats.describe()


def test_chat_records_without_template_fall_back_to_role_lines():
    tok = ByT5Tokenizer()
    fields = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert render_prompt(tok, fields) == "user: hi\nassistant: "
    items, _ = tokenize_sft([Record("x", fields)], tok, 64, None)
    assert tok.decode([t for t in items[0]["labels"] if t != IGNORE_INDEX], skip_special_tokens=True) == "yo"


def test_reward_and_pairwise_tokenisation():
    tok = ByT5Tokenizer()
    items, _ = tokenize_scored([Record("x", {"prompt": "a", "response": "b", "score": 2.0})], tok, 16, None)
    # prompt "a" -> [100], response "b" + EOS -> [101, 1]; labels mask the prompt
    assert items == [{"response_ids": [100, 101, 1], "response_labels": [-100, 101, 1], "score": 2.0}]
    items, _ = tokenize_scored([Record("x", {"prompt": "a", "chosen": "b", "rejected": "c"})], tok, 16, None, ("chosen", "rejected"))
    assert items[0]["chosen_ids"][-2] == 101 and items[0]["rejected_ids"][-2] == 102


def test_split_is_seeded_and_holds_out():
    records = [Record(str(i), {"prompt": str(i)}) for i in range(20)]
    train, held = split_records(records, 0.1, seed=3)
    assert len(train) == 18 and len(held) == 2
    assert split_records(records, 0.1, seed=3)[1] == held
    assert {r.source for r in train} | {r.source for r in held} == {str(i) for i in range(20)}


def test_saved_hf_dataset_with_mapped_columns_trains(tmp_path):
    """A 🤗 ``save_to_disk`` directory (Dataset and DatasetDict) whose columns are named otherwise."""
    import json

    from click.testing import CliRunner
    from datasets import Dataset, DatasetDict

    from rlhf_core.cli import cli

    rows = [{"question": f"{c}=", "answer": c * 6, "id": i} for i, c in enumerate("abcdefgh" * 8)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "qa"))
    chat = [{"conversation": [{"role": "user", "content": f"{c}="}, {"role": "assistant", "content": c * 4}]}
            for c in "abcd" * 4]
    DatasetDict({"train": Dataset.from_list(chat), "validation": Dataset.from_list(chat[:4])}).save_to_disk(str(tmp_path / "chat"))
    stages = ("stages=[{stage: sft, data: {train: %s, fields: {prompt: question, response: answer}, max_length: 16}, "
              "train: {steps: 2, batch_size: 8}}, {stage: sft, name: chat, data: {train: %s, eval: %s, "
              "eval_split: validation, fields: {messages: conversation}, max_length: 32}, train: {steps: 1, batch_size: 4}}]"
              % (tmp_path / "qa", tmp_path / "chat", tmp_path / "chat"))
    result = CliRunner().invoke(cli, ["run", "--out", str(tmp_path / "run"), "--set", stages], obj={})
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"]["sft"]["examples"] == 58  # 64 rows, 10% held out
    assert summary["stages"]["chat"]["examples"] == 16 and "eval_loss" in summary["stages"]["chat"]


def test_hf_dataset_problems_are_one_line_before_anything_trains(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from datasets import Dataset, DatasetDict

    from rlhf_core.cli import cli

    DatasetDict({"train": Dataset.from_list([{"q": "a=", "a": "aaa"}])}).save_to_disk(str(tmp_path / "dd"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(cli, [
        "run", "--out", str(tmp_path / "run"),
        "--set", f"stages.sft.data={{train: {tmp_path / 'dd'}, split: training, fields: {{prompt: q, response: a}}}}",
        "--set", f"stages.reward.data={{train: {tmp_path / 'dd'}, fields: {{prompt: question}}}}",
        "--set", "stages.ppo.data.train=hf:someorg/prompts-nobody-has"], obj={})
    assert result.exit_code == 1 and "Traceback" not in result.output and "== stage" not in result.output
    assert f"stages[0].data.train: {tmp_path / 'dd'}: no split 'training'; splits: train (set data.split)" in result.output
    assert f"stages[1].data.train: {tmp_path / 'dd'}: row 0: no column 'question' (data.fields maps 'prompt' to it); columns: q, a" in result.output
    assert ("stages[2].data.train: hf:someorg/prompts-nobody-has: hub datasets cannot be read while "
            "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; save it first with Dataset.save_to_disk(DIR)") in result.output
