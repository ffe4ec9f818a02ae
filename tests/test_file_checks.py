"""Local data files are checked before `datasets` reads them: the file and the row are named."""

import json

import pytest

from lightning_parablock.data import DataSource, load_examples
from lightning_parablock.data.file_checks import check_data_files

ROWS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.json", "", r"'.*empty.json' is empty: it holds no example"),
        ("blank.jsonl", "\n \n", r"'.*blank.jsonl' holds only whitespace"),
        ("cut.json", json.dumps(ROWS)[:-20], r"'.*cut.json' is not valid JSON at line 1, column \d+"),
        ("none.json", "[]", r"'.*none.json' is an empty JSON array"),
        ("mixed.json", json.dumps([ROWS[0], "text", ROWS[1]]), r"'.*mixed.json', row 1: expected a JSON object"),
        ("bad.jsonl", "\n".join(json.dumps(r) for r in ROWS) + '\n{"instruction": "q', r"'.*bad.jsonl', line 4: not valid JSON"),
        ("list.jsonl", json.dumps(ROWS[0]) + "\n[1, 2]\n", r"'.*list.jsonl', line 2: expected a JSON object.*, got list"),
    ],
)
def test_a_bad_file_is_named_with_its_row(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        check_data_files({"train": [str(tmp_path / name)]})


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Data file '.*gone.jsonl' does not exist"):
        load_examples(DataSource(data_files=str(tmp_path / "gone.jsonl")), seed=0)


def test_good_files_globs_and_remote_paths_pass(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    check_data_files([str(tmp_path / "a.json"), str(tmp_path / "b.jsonl"), str(tmp_path / "*.jsonl"), "hf://x/y.json"])


@pytest.mark.parametrize(
    ("name", "content", "byte"),
    [("latin1.jsonl", b'{"instruction": "q", "output": "a"}\n{"instruction": "caf\xe9", "output": "a"}\n', 21),
     ("latin1.csv", b"instruction,output\ncaf\xe9,a\n", 4)],
)  # fmt: skip
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, name, content, byte):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"'.*{name}', line 2, byte {byte} of the line: not UTF-8 .*Save the file as UTF-8"):
        check_data_files(str(path))


@pytest.mark.parametrize(
    ("name", "builder", "content", "byte"),
    [("latin1.tsv", "csv", b"instruction\toutput\ncaf\xe9\ta\n", 4),
     ("rows.txt", "json", b'{"instruction": "q", "output": "a"}\n{"instruction": "caf\xe9", "output": "a"}\n', 21)],
)  # fmt: skip
def test_a_file_is_checked_as_the_builder_that_reads_it_whatever_its_extension(tmp_path, name, builder, content, byte):
    path = tmp_path / name
    path.write_bytes(content)
    check_data_files(str(path))  # by its extension alone, an unknown type: left to `datasets`
    with pytest.raises(ValueError, match=rf"'.*{name}', line 2, byte {byte} of the line: not UTF-8"):
        check_data_files(str(path), builder=builder)


@pytest.mark.parametrize(
    ("name", "rows", "message"),
    [
        ("list.jsonl", [ROWS[0], {"instruction": ["q", "r"], "output": "a"}], r"'.*list.jsonl', line 2: column 'instruction' holds list \[\"q\", \"r\"\], not text"),
        ("int.json", [ROWS[0], ROWS[1], {"instruction": "q", "output": 5}], r"'.*int.json', row 2: column 'output' holds int 5, not text"),
        ("mapped.jsonl", [{"question": {"a": 1}, "answer": "x"}], r"line 1: column 'question' holds dict"),
    ],
)
def test_a_row_whose_text_column_holds_another_type_is_named_with_row_and_column(tmp_path, name, rows, message):
    path = tmp_path / name
    path.write_text(json.dumps(rows) if name.endswith(".json") else "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=message):
        check_data_files(str(path), text_columns=["question", "input", "answer"] if "mapped" in name else ["instruction", "input", "output"])


def test_load_examples_checks_the_mapped_text_columns(tmp_path):
    path = tmp_path / "mapped.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": 7}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: column 'answer' holds int 7"):
        load_examples(DataSource(data_files=str(path), columns={"instruction": "question", "output": "answer"}), seed=0)
