"""Local data files checked before ``datasets`` reads them, so a bad file is named with its row.

``datasets`` reports an empty or corrupt JSON file as a pyarrow error deep in its builder, without the
file or the line, and it converts a column of mixed types to one type first (a list of content parts among text
turns makes every content JSON: the text "0." becomes 0.0), so a refusal after loading would name the wrong row.
These checks run first, on the rows as written, and say which file, which line, and what is wrong there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from lightning_parablock.data.chat import CHAT_COLUMNS, check_conversation

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


def check_data_files(
    data_files: DataFiles,
    text_columns: Sequence[str] = (),
    builder: str | None = None,
    conversation_column: Optional[str] = None,
) -> None:
    """Each local file exists and holds at least one example; a JSON or CSV file is UTF-8; each JSON row parses
    to an object whose ``text_columns`` (those it has) hold text: a list or a number there would be trained on
    as its ``str()``, or stop ``datasets`` with an error that names neither the file nor the row. A row with a
    conversation (``conversation_column``, else ``messages`` or ``conversations``) has that checked instead, as
    :func:`~lightning_parablock.data.chat.check_conversation` checks it after loading.

    A file is JSON or CSV by its extension, or by the ``datasets`` ``builder`` that reads it (``path: csv`` over
    a ``.tsv`` file). Remote paths (``hf://``, ``s3://`` ...) and glob patterns are left to ``datasets``.
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
        if path.suffix.lower() in _JSON_SUFFIXES or builder == "json":
            conversation_columns = (conversation_column,) if conversation_column else CHAT_COLUMNS
            _check_json(path, text_columns, conversation_columns)
        elif path.suffix.lower() == ".csv" or builder in ("csv", "text"):
            _check_utf8_lines(path)  # ``datasets`` reports other bytes without the file, the line or the encoding


def _check_json(path: Path, text_columns: Sequence[str], conversation_columns: Sequence[str]) -> None:
    text = _read_utf8(path)
    if not text.strip():
        raise ValueError(f"Data file {str(path)!r} holds only whitespace: no example.")
    if path.suffix.lower() == ".json" and text.lstrip()[:1] == "[":
        _check_json_document(path, text, text_columns, conversation_columns)
    else:
        _check_json_lines(path, text, text_columns, conversation_columns)


def _read_utf8(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are refused naming the line and column where they are."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        line = data.count(b"\n", 0, error.start) + 1
        raise _not_utf8(path, line, data[line_start:], error.start - line_start, error.reason) from None


def _check_utf8_lines(path: Path) -> None:
    """:func:`_read_utf8`'s check, a line at a time: a multi-GB CSV is never held whole (a newline byte never
    occurs inside a UTF-8 character, so each line decodes on its own)."""
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _not_utf8(path, number, line, error.start, error.reason) from None


def _not_utf8(path: Path, line: int, text: bytes, column: int, reason: str) -> ValueError:
    return ValueError(
        f"Data file {str(path)!r}, line {line}, byte {column + 1} of the line: not UTF-8 ({reason}, byte"
        f" {text[column:column + 1]!r}). Save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
    )


def _check_row(
    path: Path,
    line: Optional[int],
    index: int,
    row: dict[str, Any],
    text_columns: Sequence[str],
    conversation_columns: Sequence[str],
) -> None:
    """The row's conversation, the first of ``conversation_columns`` it has, is one (chat data trains it and reads
    no instruction column), named by its ``line`` in the file and its ``index`` among the rows as after loading;
    else every column of ``text_columns`` the row has holds a string (or null, refused later with the field's
    name)."""
    conversation = next((column for column in conversation_columns if column in row), None)
    if conversation is not None:
        line_text = f" (line {line})" if line is not None else ""
        check_conversation(row[conversation], f"Data file {str(path)!r}{line_text}, row {index}")
        return
    where = f"Data file {str(path)!r}, " + (f"line {line}" if line is not None else f"row {index}")
    for column in text_columns:
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"{where}: column {column!r} holds {type(value).__name__} {json.dumps(value)[:60]}, not text; every"
                f" example's {column!r} must be a JSON string. Fix the row, or convert the column to strings first."
            )


def _check_json_document(
    path: Path, text: str, text_columns: Sequence[str], conversation_columns: Sequence[str]
) -> None:
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
        _check_row(path, None, index, row, text_columns, conversation_columns)


def _check_json_lines(
    path: Path, text: str, text_columns: Sequence[str], conversation_columns: Sequence[str]
) -> None:
    """One JSON object per line (``.jsonl``, or a ``.json`` file in that layout); blank lines are skipped."""
    index = 0
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
        _check_row(path, number, index, row, text_columns, conversation_columns)
        index += 1
