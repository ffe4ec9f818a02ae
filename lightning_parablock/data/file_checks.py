"""Local data files checked before ``datasets`` reads them, so a bad file is named with its row.

``datasets`` reports an empty or corrupt JSON file as a pyarrow error deep in its builder, without the
file or the line. These checks run first and say which file, which line, and what is wrong there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

DataFiles = Union[str, list[str], dict[str, Union[str, list[str]]]]
_JSON_SUFFIXES = (".json", ".jsonl")
_GLOB_CHARACTERS = set("*?[")


def listed_files(data_files: DataFiles) -> list[str]:
    """Every path named in ``data_files`` (one path, a list, or a dict from split name to paths)."""
    if isinstance(data_files, dict):
        return [file for group in data_files.values() for file in ([group] if isinstance(group, str) else group)]
    return [data_files] if isinstance(data_files, str) else list(data_files)


def check_data_files_shape(data_files: object) -> None:
    """``data_files`` is one path, a list of paths, or a dict from split name to a path or a list of paths."""

    def paths(group: object) -> bool:
        return isinstance(group, str) or (isinstance(group, (list, tuple)) and all(isinstance(f, str) for f in group))

    if isinstance(data_files, dict):
        accepted = all(isinstance(split, str) and paths(group) for split, group in data_files.items())
    else:
        accepted = paths(data_files)
    if not accepted:
        raise TypeError(
            "`data_files` must be a path, a list of paths, or a dict from split name to a path or a list of paths,"
            f" e.g. 'train.jsonl' or {{'train': ['a.jsonl', 'b.jsonl']}}, got {data_files!r}"
            f" ({type(data_files).__name__})."
        )


def check_data_files(data_files: DataFiles) -> None:
    """Each local file exists and holds at least one example; each JSON row parses to an object.

    Remote paths (``hf://``, ``s3://`` ...) and glob patterns are left to ``datasets``.
    """
    for file in listed_files(data_files):
        if "://" in file or _GLOB_CHARACTERS & set(file):
            continue
        path = Path(file).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"Data file {file!r} does not exist (resolved to {path.resolve()}).")
        if path.is_dir():
            continue
        if path.stat().st_size == 0:
            raise ValueError(f"Data file {file!r} is empty: it holds no example.")
        if path.suffix.lower() in _JSON_SUFFIXES:
            _check_json(path)


def _check_json(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"Data file {str(path)!r} holds only whitespace: no example.")
    if path.suffix.lower() == ".json" and text.lstrip()[:1] == "[":
        _check_json_document(path, text)
    else:
        _check_json_lines(path, text)


def _check_json_document(path: Path, text: str) -> None:
    """A JSON array of objects (Alpaca's layout)."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"Data file {str(path)!r} is not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
            " (a truncated or corrupt file?)."
        ) from None
    if not rows:
        raise ValueError(f"Data file {str(path)!r} is an empty JSON array: it holds no example.")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(
                f"Data file {str(path)!r}, row {index}: expected a JSON object with the example's fields, got"
                f" {type(row).__name__} {str(row)[:60]!r}."
            )


def _check_json_lines(path: Path, text: str) -> None:
    """One JSON object per line (``.jsonl``, or a ``.json`` file in that layout); blank lines are skipped."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"Data file {str(path)!r}, line {number}: not valid JSON ({error.msg} at column {error.colno});"
                f" the line starts {line[:60]!r} (a truncated or corrupt line?)."
            ) from None
        if not isinstance(row, dict):
            raise ValueError(
                f"Data file {str(path)!r}, line {number}: expected a JSON object with the example's fields, got"
                f" {type(row).__name__} {line[:60]!r}."
            )
