"""Records from the files instruction data comes in: (location, fields) pairs, nothing interpreted.

Files: `.jsonl` (one object a line), `.json` (an array of objects, or an object holding
the array under "data" or under the split's name; a `.json` file that is really JSON
Lines is read as such), `.csv` (a header row; a `messages` cell holds JSON), `.parquet`.
Anything else that is not an existing path is loaded with `datasets.load_dataset(name,
split=split)` (a hub dataset, or a local folder). `split` matters only there and for
JSON objects keyed by split (`{"train": [...], "test": [...]}`; `split_read` says which).

Locations: `file:LINE` (1-based; for JSON and CSV the line where the record starts) for
text files, `name[ROW]` (0-based, as in `dataset[ROW]`) for parquet files and datasets.
What the fields mean (layouts, conversations) is asymllm.data's business.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Iterator

logger = logging.getLogger("asymllm.data")


class DataError(ValueError):
    """Unusable instruction data; the message names the file, the line (or row) and the field."""


FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
Record = tuple[str, dict | None]  # (location, fields); None for a blank line or row


def source_identity(source: str) -> str:
    """What a --dataset value names: an existing path resolved (so two spellings of one
    file compare equal), anything else (a hub name) as given."""
    source = os.fspath(source)
    return os.path.realpath(source) if os.path.exists(source) else source


def split_read(source: str, split: str) -> str | None:
    """Which split of `source` load_examples(source, split) reads: None for a local file
    without named splits (JSON Lines, CSV, parquet, a JSON array, a JSON object holding its
    examples under "data"), where every split name reads the same examples."""
    path = Path(os.fspath(source))
    if not path.is_file():
        return split  # a hub dataset or a local dataset folder: datasets.load_dataset picks the split
    if path.suffix.lower() != ".json":
        return None
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError:
        return None  # JSON Lines named .json (or malformed, which load_examples reports)
    if not isinstance(data, dict) or isinstance(data.get("data"), list):
        return None
    return split  # as _json_records: the examples under the split's name


def read_records(source: str, split: str) -> Iterator[Record]:
    """Every record of `source`, in file order; a file name that does not exist is an error, not a hub name."""
    path = Path(source)
    suffix = path.suffix.lower()
    if not path.is_file():
        if suffix in FILE_TYPES:  # looks like a file name: a typo, not a hub dataset
            raise DataError(f"{source}: file not found")
        return _hub_records(source, split)
    if suffix == ".jsonl":
        return _jsonl_records(path)
    if suffix == ".json":
        return _json_records(path, split)
    if suffix == ".csv":
        return _csv_records(path)
    if suffix == ".parquet":
        return _parquet_records(path)
    raise DataError(f"{source}: unknown file type {suffix!r}; use one of {', '.join(FILE_TYPES)}")


def _jsonl_records(path: Path, text: str | None = None) -> Iterator[Record]:
    text = read_text(path) if text is None else text
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines() breaks on.
    lines = text.split("\n")
    if lines[-1] == "":  # the file's final newline ends the last line, it does not start a new one
        lines.pop()
    for number, line in enumerate(lines, 1):
        location = f"{path}:{number}"
        if not line.strip():
            yield location, None
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{location}: malformed JSON ({error.msg}, column {error.colno})") from None
        yield location, _as_object(record, location)


def _json_records(path: Path, split: str) -> Iterator[Record]:
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON Lines named .json
            logger.info("%s: several JSON values, one a line: reading it as JSON Lines", path)
            return _jsonl_records(path, text)
        raise DataError(f"{path}:{error.lineno}: malformed JSON ({error.msg}, column {error.colno})") from None
    if isinstance(data, dict):
        key = next((k for k in ("data", split) if isinstance(data.get(k), list)), None)
        if key is None:
            raise DataError(
                f"{path}: a JSON object must hold the examples as a list under 'data' or '{split}'; "
                f"found keys {sorted(data)}"
            )
        return _array_records(path, text, _value_start(text, key))
    if isinstance(data, list):
        return _array_records(path, text, text.index("["))
    raise DataError(f"{path}: expected a JSON array of examples, got {type(data).__name__}")


def _array_records(path: Path, text: str, start: int) -> Iterator[Record]:
    """The elements of the (already validated) JSON array at text[start], with their lines."""
    decoder = json.JSONDecoder()
    position = _skip_space(text, start + 1)
    line, counted_to = 1, 0  # lines counted incrementally: counting from 0 each time is quadratic
    while text[position] != "]":
        line, counted_to = line + text.count("\n", counted_to, position), position
        location = f"{path}:{line}"
        value, end = decoder.raw_decode(text, position)
        yield location, _as_object(value, location)
        position = _skip_space(text, end)
        if text[position] == ",":
            position = _skip_space(text, position + 1)


def _value_start(text: str, wanted: str) -> int:
    """Where the value of the top-level key `wanted` starts in the (validated) JSON object `text`."""
    decoder = json.JSONDecoder()
    position = _skip_space(text, text.index("{") + 1)
    while True:
        key, end = decoder.raw_decode(text, position)
        position = _skip_space(text, _skip_space(text, end) + 1)  # past the colon
        if key == wanted:
            return position
        _, end = decoder.raw_decode(text, position)
        position = _skip_space(text, _skip_space(text, end) + 1)  # past the comma


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _csv_records(path: Path) -> Iterator[Record]:
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header = next(reader, None)
    if header is None:
        return
    end_of_previous = reader.line_num
    for row in reader:
        location = f"{path}:{end_of_previous + 1}"  # where the row starts: a quoted cell may span lines
        end_of_previous = reader.line_num
        if not any(cell.strip() for cell in row):
            yield location, None
            continue
        if len(row) != len(header):
            raise DataError(f"{location}: {len(row)} cells, but the header has {len(header)} ({', '.join(header)})")
        yield location, dict(zip(header, row))


def _parquet_records(path: Path) -> Iterator[Record]:
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({error})") from error
    for number, row in enumerate(rows):
        yield f"{path}[{number}]", row


def _hub_records(name: str, split: str) -> Iterator[Record]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # offline, unknown name, no such split: all mean "cannot read it"
        raise DataError(
            f"{name}: not a local file, and loading it as a dataset "
            f"(datasets.load_dataset({name!r}, split={split!r})) "
            f"failed: {type(error).__name__}: {error}. Check the path; for a hub dataset the hub must be reachable "
            f"or the dataset already in the local cache"
        ) from error
    for number, row in enumerate(dataset):
        yield f"{name}[{number}]", row


def read_text(path: Path) -> str:
    """The file as text; a file that is not UTF-8 is a DataError naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from None


def _as_object(value, location: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{location}: expected a JSON object (one example), got {type(value).__name__}")
    return value
