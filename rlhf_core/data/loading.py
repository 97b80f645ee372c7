"""A stage's data from its config: files or ``builtin:NAME`` datasets, the train/eval split, and
what the host's preflight checks (``data_inputs``, ``dataset_components``)."""
from __future__ import annotations

import random
from typing import Any

from ..config.schema import ComponentSpec
from ..types import StageInput, Uses
from .readers import read_records
from .validation import DataNotes, Record, validate_record


def load_records(spec: str, kind: str, registry: Any, *, seed: int, builtin_size: int,
                 notes: DataNotes | None = None, fields: dict[str, str] | None = None,
                 split: str = "train", extra: dict[str, str] | None = None) -> list[Record]:
    """Records from a file, a saved 🤗 dataset, ``hf:NAME`` or ``builtin:NAME`` (a registered dataset);
    ``extra``: fields a component reads beside the ones of ``kind`` (``{field: who reads it}``)."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        factory = registry.get("dataset", name).obj
        raw = factory(kind, builtin_size, seed)
        records = [validate_record(obj, f"builtin:{name} record {i}", kind, notes, extra) for i, obj in enumerate(raw)]
        return [r for r in records if r is not None]
    return read_records(spec, kind, notes, fields=fields, split=split, extra=extra)


def held_out_count(n: int, eval_fraction: float) -> int:
    """How many of ``n`` records :func:`split_records` holds out (at least one when there are two or more)."""
    return min(n - 1, max(1, round(n * eval_fraction))) if eval_fraction > 0 and n > 0 else 0


def split_records(records: list[Record], eval_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded shuffle, then hold out ``eval_fraction`` (at least one record when there are two or more)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = held_out_count(len(records), eval_fraction)
    return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]


def load_split(data_cfg: Any, kind: str, registry: Any, seed: int,
               extra: dict[str, str] | None = None) -> tuple[list[Record], list[Record]]:
    """(train, eval) records for a stage's :class:`~rlhf_core.config.DataConfig`; ``extra`` as in
    :func:`load_records`."""
    train = load_records(data_cfg.train, kind, registry, seed=seed, builtin_size=data_cfg.builtin_size,
                         fields=data_cfg.fields, split=data_cfg.split, extra=extra)
    if data_cfg.eval:
        held = load_records(data_cfg.eval, kind, registry, seed=seed + 1, builtin_size=max(1, data_cfg.builtin_size // 10),
                            fields=data_cfg.fields, split=data_cfg.eval_split, extra=extra)
    else:
        train, held = split_records(train, data_cfg.eval_fraction, seed)
    if data_cfg.limit is not None:
        train = train[: data_cfg.limit]
    return train, held


def data_inputs(data_cfg: Any, kind: str, path: str = "data", extra: dict[str, str] | None = None) -> list[StageInput]:
    """The :class:`~rlhf_core.types.StageInput` of a stage's ``train`` (and ``eval``) data;
    ``extra`` as in :func:`load_records`."""
    return [StageInput(f"{path}.{key}", "data", getattr(data_cfg, key), kind, data_cfg.builtin_size, data_cfg.fields,
                       data_cfg.split if key == "train" else data_cfg.eval_split, extra or None)
            for key in ("train", "eval") if getattr(data_cfg, key)]


def dataset_components(data_cfg: Any, path: str) -> list[Uses]:
    """The ``builtin:`` datasets a :class:`DataConfig` names, as the components a stage uses (looked
    up before anything trains)."""
    return [Uses("dataset", ComponentSpec(value.split(":", 1)[1]), f"{path}.{key}")
            for key in ("train", "eval") if isinstance(value := getattr(data_cfg, key), str) and value.startswith("builtin:")]
