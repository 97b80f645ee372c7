"""Datasets: reading records, validating fields, tokenising with prompt masking, collation.

Sources: a ``.jsonl`` file (one JSON object per line), ``.json`` (a list), ``.csv``, ``.parquet``, a
directory written by 🤗 ``Dataset.save_to_disk``, or ``hf:NAME`` (a hub dataset, when online). Columns
named otherwise are mapped with ``data.fields`` (``{prompt: question}``). Record formats:

- ``sft``: ``{"prompt": str, "response": str}`` or ``{"messages": [{"role", "content"}, ...]}``
  whose last message is the assistant's response (the tokenizer's chat template renders the rest
  when it has one; otherwise ``"<role>: <content>\n"`` lines followed by ``"assistant: "``).
- ``reward``: ``{"prompt": str, "response": str, "score": finite number}``.
- ``pairwise``: ``{"prompt": str, "chosen": str, "rejected": str}``. A pair whose ``chosen`` equals
  its ``rejected`` carries no preference: it is dropped, counted and reported with its file:line.
- ``prompts``: ``{"prompt": str}`` or ``{"messages": [...]}`` (the conversation so far).

Chat roles other than ``system``, ``user``, ``assistant``, ``tool``, ``developer`` are kept (a chat
template may know them) but counted and reported with the file:line of the first few.

Sequences are ``[bos] prompt response eos``; labels are ``-100`` on the prompt (loss on response
tokens only). Bad input raises :class:`DataError` naming file, line and field.

The package: ``records``, ``formats``, ``loading``, ``tokenize``, ``collate`` (one job each); everything is re-exported here,
so ``from rlhf_core.data import X`` is the way to import it."""
from __future__ import annotations

from .records import DataError, DataNotes, IGNORE_INDEX, KINDS, KNOWN_ROLES, map_fields, Record, validate_record  # noqa: F401
from .formats import check_data_path, is_saved_dataset, read_records  # noqa: F401
from .loading import data_inputs, dataset_components, held_out_count, load_records, load_split, split_records  # noqa: F401
from .tokenize import encode_prompt, encode_response, fit_length, render_prompt, response_text, tokenize_scored, tokenize_sft, TokenStats  # noqa: F401
from .collate import append_column, collate_scored, collate_sft, last_index, pad, shift_labels  # noqa: F401

#: The supported plugin API of this package (see docs/reference/api.md).
__all__ = ["DataError", "Record", "TokenStats", "IGNORE_INDEX", "load_split", "load_records", "data_inputs",
           "dataset_components", "render_prompt", "encode_prompt", "encode_response", "tokenize_sft",
           "tokenize_scored", "collate_sft", "collate_scored", "shift_labels", "pad"]
