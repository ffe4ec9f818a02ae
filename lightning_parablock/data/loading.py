"""Load instruction data from the Hub or local files into one schema: ``instruction``, ``input``, ``output``.

Every source is renamed to the same three text columns, so prompt formatting and partitioning never need to
know where the data came from. Any other column (MathInstruct's ``source``, a user id) is kept, to split
clients by.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from datasets import Dataset, load_dataset
from datasets.exceptions import DatasetGenerationError

from lightning_parablock.argument_checks import check_optional_int
from lightning_parablock.data.chat import INSTRUCTION_FIELDS, MESSAGES, chat_column, to_chat_schema
from lightning_parablock.data.file_checks import DataFiles, check_data_files, check_data_files_shape, listed_files

TEXT_FIELDS = INSTRUCTION_FIELDS
INSTRUCTION, INPUT, OUTPUT = TEXT_FIELDS


@dataclass(frozen=True)
class DatasetPreset:
    """What is known about a dataset on the Hub: its configuration, its columns and its natural label."""

    name: Optional[str]
    columns: dict[str, str]
    label_column: Optional[str] = None


PRESETS: dict[str, DatasetPreset] = {
    "vicgalle/alpaca-gpt4": DatasetPreset(None, {INSTRUCTION: "instruction", INPUT: "input", OUTPUT: "output"}),
    "TIGER-Lab/MathInstruct": DatasetPreset(None, {INSTRUCTION: "instruction", OUTPUT: "output"}, "source"),
    "openai/gsm8k": DatasetPreset("main", {INSTRUCTION: "question", OUTPUT: "answer"}),
}
"""Defaults for the paper's datasets; a :class:`DataSource` can override each. GSM8K answers keep their
``#### N`` final line, which is what the model learns to end with and what accuracy is scored on."""

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
"""The ``datasets`` builder for each local file type."""


@dataclass
class DataSource:
    """Where one set of examples comes from.

    Args:
        path: A Hub dataset (``vicgalle/alpaca-gpt4``, ``TIGER-Lab/MathInstruct``, ``openai/gsm8k``, any other) or
            a ``datasets`` builder (``json``, ``parquet``, ``csv``). With ``data_files`` and no ``path`` the builder
            is taken from the files' extension.
        name: The dataset's configuration, e.g. ``main`` for GSM8K (the preset's by default).
        split: The split to read, e.g. ``train``, ``test`` or ``train[:1000]``.
        data_files: Local files: one path, a list, or a dict from split name to paths.
        columns: The data's column for each of ``instruction``, ``input`` (optional) and ``output``. Unnamed ones
            default to the preset's, else to the column of the same name. For chat data, ``{messages: column}``
            names the column of conversations (found by itself when it is ``messages`` or ShareGPT's
            ``conversations``, which is then trained even beside instruction columns); see
            :mod:`~lightning_parablock.data.chat`.
        max_examples: Keep a seeded random sample of this many examples (the paper samples 50,000 of MathInstruct).
    """

    path: Optional[str] = None
    name: Optional[str] = None
    split: str = "train"
    data_files: Optional[DataFiles] = None
    columns: Optional[dict[str, str]] = None
    max_examples: Optional[int] = None

    def __post_init__(self) -> None:
        check_optional_int("max_examples", self.max_examples, minimum=1)
        if self.data_files is not None:
            check_data_files_shape(self.data_files)
        if self.columns is not None and not (
            isinstance(self.columns, dict) and all(isinstance(c, str) for c in (*self.columns, *self.columns.values()))
        ):
            raise TypeError(
                f"`columns` must be a dict from a field ({', '.join(map(repr, TEXT_FIELDS))}) to the data's column"
                f" name, e.g. {{'instruction': 'question', 'output': 'answer'}}, got {self.columns!r}"
                f" ({type(self.columns).__name__})."
            )

    @property
    def preset(self) -> Optional[DatasetPreset]:
        return PRESETS.get(self.path) if self.path else None

    def describe(self) -> str:
        where = self.path if self.path and self.path not in FILE_BUILDERS.values() else str(self.data_files)
        return f"{where} [{self.split}]"


def load_examples(source: DataSource, seed: int, cache_dir: Optional[str] = None) -> Dataset:
    """Load ``source`` with ``datasets.load_dataset`` and rename its columns to the common schema.

    Returns:
        A ``Dataset`` with string columns ``instruction``, ``input`` (empty where the data has none) and ``output``,
        plus every other column of the data.
    """
    preset = source.preset
    name = source.name if source.name is not None else (preset.name if preset else None)
    builder = _builder(source)
    columns = {**(preset.columns if preset else {}), **(source.columns or {})}
    if source.data_files is not None:
        text_columns = [columns.get(field, field) for field in TEXT_FIELDS]
        check_data_files(
            source.data_files, text_columns, builder, conversation_column=(source.columns or {}).get(MESSAGES)
        )
    try:
        dataset = load_dataset(builder, name, split=source.split, data_files=source.data_files, cache_dir=cache_dir)
    except (ValueError, DatasetGenerationError) as error:  # e.g. 'Unknown split "test". Should be one of ['train'].'
        raise ValueError(f"Could not load the data source {source.describe()}: {error}") from error
    conversations = chat_column(source.columns, dataset.column_names, source.describe())
    if conversations is not None:
        dataset = to_chat_schema(dataset, conversations, source.describe())
    else:
        dataset = to_instruction_schema(dataset, columns, source.describe())
    if source.max_examples is not None and source.max_examples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(source.max_examples))
    return dataset


def _builder(source: DataSource) -> str:
    """The ``datasets`` builder: ``path``, else the one the files' extension names. A builder for local files that
    another file type's extension contradicts (``path: json`` over ``.csv`` files) is refused: ``datasets`` would
    report a parse error in row 0 instead."""
    if source.path is None and source.data_files is None:
        raise ValueError("A DataSource needs a `path` (a Hub dataset or a builder such as 'json') or `data_files`.")
    files = listed_files(source.data_files) if source.data_files is not None else []
    suffixes = {Path(file).suffix.lower() for file in files}
    builders = {FILE_BUILDERS.get(suffix) for suffix in suffixes}
    if source.path:
        contradicting = sorted(f for f in files if FILE_BUILDERS.get(Path(f).suffix.lower(), source.path) != source.path)
        if source.path in FILE_BUILDERS.values() and contradicting:
            named = FILE_BUILDERS[Path(contradicting[0]).suffix.lower()]
            raise ValueError(
                f"`path={source.path!r}` reads {source.path} files, but {contradicting[0]} is a {named} file by its"
                f" extension: set `path: {named}`, or leave `path` out to take the type from the extension."
            )
        return source.path
    if len(builders) != 1 or None in builders:
        raise ValueError(
            f"Cannot tell the file type of `data_files={source.data_files!r}` (extensions {sorted(suffixes)}); use"
            f" files of one of the types {sorted(FILE_BUILDERS)}, or set `path` to a `datasets` builder."
        )
    return builders.pop()


def to_instruction_schema(dataset: Dataset, columns: dict[str, str], where: str = "the dataset") -> Dataset:
    """Rename the columns named in ``columns`` to ``instruction``/``input``/``output``; add an empty ``input``.

    Args:
        columns: Field (one of ``instruction``, ``input``, ``output``) to the data's column. A field not named
            here is read from the column of its own name.
        where: Names the data in error messages.
    """
    unknown = sorted(set(columns) - set(TEXT_FIELDS) - {MESSAGES})
    if unknown:
        raise ValueError(
            f"`columns` maps the fields {list(TEXT_FIELDS)}; got unknown field(s) {unknown}. To split clients by a"
            " column, name it in `label_column` instead."
        )
    mapping = {field: columns.get(field, field) for field in TEXT_FIELDS}
    available = dataset.column_names
    for field, column in mapping.items():
        optional = field == INPUT and INPUT not in columns
        if column not in available and not optional:
            raise ValueError(
                f"{where} has no column {column!r} for the {field!r} field; its columns are {available}. Map the"
                f" field to one of them with `columns: {{{field}: ...}}`."
            )
    renames = {column: field for field, column in mapping.items() if column in available and column != field}
    clashing = [field for field in renames.values() if field in available and field not in renames]
    dataset = dataset.remove_columns(clashing).rename_columns(renames)
    for field in (INSTRUCTION, OUTPUT):  # a null would be trained on as an empty prompt or an empty answer
        if dataset.data.column(field).null_count:
            row = dataset[field].index(None)
            raise ValueError(
                f"{where} has a null {mapping[field]!r} (the {field!r} field) in row {row}; every example needs"
                " a text instruction and output. Drop or fill the rows without one."
            )
    if INPUT not in dataset.column_names:
        dataset = dataset.add_column(INPUT, [""] * len(dataset))
    return dataset
