"""Properties of the Dirichlet split and the block schedules over random inputs."""

from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_parablock.data import dirichlet_partition
from lightning_parablock.schedule import SCHEDULE_KINDS, BlockSchedule


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.sampled_from("abcde"), min_size=20, max_size=200),
    num_clients=st.integers(1, 5),
    alpha=st.floats(0.05, 100.0),
    seed=st.integers(0, 2**16),
)
def test_dirichlet_split_is_a_seeded_partition_of_every_example(labels, num_clients, alpha, seed):
    parts = dirichlet_partition(labels, num_clients, alpha, seed)
    flat = sorted(i for part in parts for i in part)
    assert flat == list(range(len(labels)))  # every example once, sizes sum to the dataset
    assert all(len(part) >= 1 for part in parts)
    assert parts == dirichlet_partition(labels, num_clients, alpha, seed)


@given(
    kind=st.sampled_from(SCHEDULE_KINDS),
    num_blocks=st.integers(1, 40),
    seed=st.integers(0, 2**31),
    rounds=st.lists(st.integers(0, 10_000), min_size=1, max_size=20),
)
def test_every_schedule_is_a_pure_function_into_the_blocks(kind, num_blocks, seed, rounds):
    schedule = BlockSchedule(kind, num_blocks, seed)
    blocks = [schedule.block_for_round(r) for r in rounds]
    assert all(0 <= b < num_blocks for b in blocks)
    assert blocks == [BlockSchedule(kind, num_blocks, seed).block_for_round(r) for r in rounds]
