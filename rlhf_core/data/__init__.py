"""Datasets: reading records, validating fields, tokenising with prompt masking, collation.

Sources: a ``.jsonl`` file (one JSON object per line), ``.json`` (a list), ``.csv``, ``.parquet``, a
directory written by 🤗 ``Dataset.save_to_disk``, or ``hf:NAME`` (a hub dataset, when online). Columns
named otherwise are mapped with ``data.fields`` (``{prompt: question}``), before anything else.

Each kind takes the standard form (strings) and the conversational form (``[{"role", "content"}]``
message lists), as TRL and the Hugging Face hub write them (see :mod:`.records`):

- ``sft``: ``{"prompt", "response" | "completion"}`` or ``{"messages": [...]}`` whose last message
  is the assistant's response; ``reward``: the same plus a finite ``score``.
- ``pairwise``: ``{"prompt", "chosen", "rejected"}``, or ``{"chosen", "rejected"}`` holding the
  prompt (implicit prompt). A pair whose ``chosen`` equals its ``rejected`` carries no preference:
  it is dropped, counted and reported with its file:line.
- ``unpaired``: ``{"prompt", "completion", "label": true | false}`` (KTO).
- ``prompts``: ``{"prompt": str | [messages]}`` or ``{"messages": [...]}`` (the conversation so far).

Conversational records go through the tokenizer's chat template (``data.chat_template``: ``auto``,
``always``, ``never``; see :class:`Rendering`); only the final assistant message is trained on.

Chat roles other than ``system``, ``user``, ``assistant``, ``tool``, ``developer`` are kept (a chat
template may know them) but counted and reported with the file:line of the first few.

Sequences are ``[bos] prompt response eos`` (with a chat template: its rendering, EOS added only where it
puts none after the response); labels are ``-100`` on the prompt (loss on response
tokens only). Bad input raises :class:`DataError` naming file, line and field.

The package: ``validation``, ``readers``, ``loading``, ``tokenize``, ``collate`` (one job each); everything is re-exported here,
so ``from rlhf_core.data import X`` is the way to import it."""
from __future__ import annotations

from ..errors import DataError  # noqa: F401
from .validation import (  # noqa: F401
    DataNotes, IGNORE_INDEX, KINDS, KNOWN_ROLES, map_fields, Record, RESPONSE_KEYS, record_turns,
    split_common_prefix, Turns, validate_record,
)
from .readers import check_data_path, is_saved_dataset, read_records  # noqa: F401
from .loading import data_inputs, dataset_components, held_out_count, load_records, load_split, split_records  # noqa: F401
from .tokenize import (  # noqa: F401
    apply_template, as_conversation, CHAT_TEMPLATE_MODES, encode_prompt, encode_response, encode_turns, fit_length, fit_prompt, Rendering,
    render_prompt, role_lines, tokenize_scored, tokenize_sft, tokenize_unpaired, TokenStats,
)
from .collate import (  # noqa: F401
    append_column, collate_scored, collate_sft, collate_unpaired, last_index, mismatched_pair, pad, prompt_length, shift_labels,
)

#: The supported plugin API of this package (see docs/reference/api.md).
__all__ = ["DataError", "Record", "Turns", "TokenStats", "Rendering", "IGNORE_INDEX", "load_split", "load_records",
           "data_inputs", "dataset_components", "record_turns", "render_prompt", "encode_prompt", "encode_response",
           "encode_turns", "fit_length", "fit_prompt", "apply_template", "role_lines", "tokenize_sft", "tokenize_scored", "tokenize_unpaired", "collate_sft", "collate_scored",
           "collate_unpaired", "mismatched_pair", "shift_labels", "pad"]
