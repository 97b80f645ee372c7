"""Reading data files: ``.jsonl``, ``.json``, ``.csv``, ``.parquet``, 🤗 ``save_to_disk`` directories and
``hf:NAME[:split]`` hub datasets, row by row, each record validated as it is read."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError
from .validation import DataNotes, Record, map_fields, validate_record


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json dataset must be a list of objects, got {type(data).__name__}")
    for i, item in enumerate(data):
        yield f"{path}: record {i}", item


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                record = dict(row)
                if "score" in record and record["score"] not in (None, ""):
                    try:
                        record["score"] = float(record["score"])
                    except ValueError:
                        pass  # left as a string: the field check reports it with its line
                if str(record.get("label", "")).lower() in ("true", "false"):
                    record["label"] = record["label"].lower() == "true"  # CSV has no booleans
                yield f"{path}:{reader.line_num}", record
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason})") from None


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    for i, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}: row {i}", row


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


_SAVED_DATASET = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_saved_dataset(path: str | Path) -> bool:
    """True for a directory written by 🤗 ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return Path(path).is_dir() and any((Path(path) / m).is_file() for m in _SAVED_DATASET)


def _read_saved_dataset(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    """Rows of a ``save_to_disk`` directory, one at a time from the memory-mapped Arrow table."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise DataError(f"{path}: reading a saved 🤗 dataset needs the datasets package (pip install -e \".[datasets]\")") from None
    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        if split not in data:
            raise DataError(f"{path}: no split {split!r}; splits: {', '.join(data)} (set data.split)")
        data = data[split]
    for i, row in enumerate(data):
        yield f"{path}: row {i}", row


def _read_hub_dataset(name: str, split: str) -> Iterator[tuple[str, Any]]:
    """Rows of a 🤗 hub dataset (``hf:NAME``), streamed; a machine without network gets one line."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"hf:{name}: reading hub datasets needs the datasets package (pip install -e \".[datasets]\")") from None
    if any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        raise DataError(f"hf:{name}: hub datasets cannot be read while HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; save "
                        "it first with Dataset.save_to_disk(DIR) and set data.train: DIR")
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(name, timeout=10)  # one quick request, instead of the loader's retries
        data = load_dataset(name, split=split, streaming=True)
        rows = iter(data)
        first = next(rows, None)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"hf:{name}: could not load the hub dataset (split {split!r}): {reason}; offline, save it "
                        "first with Dataset.save_to_disk(DIR) and set data.train: DIR") from None
    if first is not None:
        yield f"hf:{name} row 0", first
    for i, row in enumerate(rows, start=1):
        yield f"hf:{name} row {i}", row


def check_data_path(path: str | Path) -> str | None:
    """None when ``path`` is a readable data file of a known format or a saved 🤗 dataset
    directory, else a one-line reason."""
    path = Path(path)
    if is_saved_dataset(path):
        return None
    if path.is_dir():
        return (f"{path}: is a directory; expected a data file ({', '.join(_READERS)}) or a directory written by "
                "Dataset.save_to_disk")
    if not path.exists():
        return f"{path}: no such file"
    if path.suffix.lower() not in _READERS:
        return f"{path}: unknown data format {path.suffix!r}; accepted: {', '.join(_READERS)}"
    if not os.access(path, os.R_OK):
        return f"{path}: permission denied"
    return None


def read_records(path: str | Path, kind: str, notes: DataNotes | None = None, *, fields: dict[str, str] | None = None,
                 split: str = "train", extra: dict[str, str] | None = None) -> list[Record]:
    """Read and validate every record of ``path`` (a data file, a saved 🤗 dataset directory, or
    ``hf:NAME``) for data ``kind``; errors name file, line, field. ``fields`` maps our field names to
    the source's columns (``{prompt: question}``); ``extra``: fields a component reads (see
    :func:`~rlhf_core.data.validation.validate_record`). Suspicious records are counted in ``notes``
    (pairs with chosen == rejected are dropped)."""
    notes = notes if notes is not None else DataNotes()
    if str(path).startswith("hf:"):
        rows = _read_hub_dataset(str(path)[3:], split)
    else:
        problem = check_data_path(path)
        if problem:
            raise DataError(problem)
        path = Path(path)
        rows = _read_saved_dataset(path, split) if is_saved_dataset(path) else _READERS[path.suffix.lower()](path)
    records = [r for where, obj in rows if (r := validate_record(map_fields(obj, fields, where), where, kind, notes,
                                                                       extra))]
    if not records:
        raise DataError(f"{path}: no records (the file is empty)" if not notes.dropped_pairs
                        else f"{path}: no usable records (every pair has chosen == rejected)")
    return records
