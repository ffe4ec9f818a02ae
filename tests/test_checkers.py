"""The shared argument checkers, and the constructors that use them: counts are integers, rates finite."""

import math

import pytest

from lightning_parablock import MeanAggregator, SimulatedLink, TrimmedMeanAggregator
from lightning_parablock.argument_checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_optional_text,
    check_positive,
)
from lightning_parablock.data import DataSource, SyntheticArithmeticDataModule


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: check_int("num_clients", 2.5, minimum=1), ValueError, r"`num_clients` must be an integer, got 2.5 \(float\)"),
        (lambda: check_int("num_clients", True, minimum=1), TypeError, r"`num_clients` must be an integer, got True \(bool\)"),
        (lambda: check_int("num_clients", "3", minimum=1), TypeError, r"got '3' \(str\)"),
        (lambda: check_int("num_clients", 0, minimum=1), ValueError, r"must be a positive integer, got 0"),
        (lambda: check_int("rounds", 9, minimum=0, maximum=8), ValueError, r"an integer in \[0, 8\], got 9"),
        (lambda: check_float("eta", math.inf), ValueError, r"`eta` must be a finite number, got inf"),
        (lambda: check_float("timeout", math.nan), ValueError, r"`timeout` must be a finite number, got nan"),
        (lambda: check_float("fraction", 1.0, 0.0, 1.0, max_open=True), ValueError, r"in \[0, 1\), got 1.0"),
        (lambda: check_positive("bandwidth", 0), ValueError, r"`bandwidth` must be positive, got 0"),
        (lambda: check_choice("method", "krum", ("mean", "median")), ValueError, r"'mean' or 'median', got 'krum'"),
        (lambda: check_bool("shuffle", "no"), TypeError, r"`shuffle` must be True or False, got 'no' \(str\)"),
        (lambda: check_optional_text("label_column", ""), ValueError, r"`label_column` must be a non-empty string, or None"),
    ],
)
def test_checkers_name_the_argument_the_value_and_what_is_accepted(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_checkers_return_the_value_in_its_kind():
    assert check_int("n", 2.0) == 2 and isinstance(check_int("n", 2.0), int)
    assert check_float("x", 3) == 3.0 and check_positive("x", 0.5) == 0.5


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SimulatedLink(bandwidth=0), r"`bandwidth` must be positive, got 0"),
        (lambda: SimulatedLink(bandwidth=math.inf), r"`bandwidth` must be a finite number, got inf"),
        (lambda: SimulatedLink(latency=math.nan), r"latency"),
        (lambda: MeanAggregator(clip_norm=math.inf), r"`clip_norm` must be a finite number, got inf"),
        (lambda: TrimmedMeanAggregator(trim_fraction=True), r"`trim_fraction` must be a number, got True \(bool\)"),
        (lambda: SyntheticArithmeticDataModule(num_examples=2.5), r"`num_examples` must be an integer, got 2.5"),
        (lambda: SyntheticArithmeticDataModule(batch_size=True), r"`batch_size` must be an integer, got True"),
        (lambda: SyntheticArithmeticDataModule(alpha=math.nan), r"`alpha` must be a finite number, got nan"),
        (lambda: DataSource(path="json", max_examples=0.5), r"`max_examples` must be an integer, got 0.5"),
        (lambda: DataSource(data_files=5), r"`data_files` must be a path, a list of paths, or a dict .*got 5 \(int\)"),
        (lambda: DataSource(data_files={"train": [3]}), r"`data_files` must be .*got \{'train': \[3\]\} \(dict\)"),
        (lambda: DataSource(path="json", columns=["question"]), r"`columns` must be a dict from a field .*got \['question'\] \(list\)"),
        (lambda: DataSource(path="json", columns={"instruction": 1}), r"`columns` must be a dict .*got \{'instruction': 1\}"),
    ],
)
def test_constructors_refuse_bad_numbers(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_a_number_is_a_bandwidth_in_bytes_per_second():
    assert SimulatedLink(bandwidth=1e8).bytes_per_second == 1e8
