"""Properties of the block schedules over random inputs (the partitioners' are in test_data.py)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_parablock.core.schedule import PURE_SCHEDULE_KINDS, BlockSchedule


@settings(deadline=None)  # "spaced" rebuilds its history up to the round asked for: 10 000 rounds take ~0.2 s
@given(
    kind=st.sampled_from(PURE_SCHEDULE_KINDS),
    num_blocks=st.integers(1, 40),
    seed=st.integers(0, 2**31),
    rounds=st.lists(st.integers(0, 10_000), min_size=1, max_size=20),
)
def test_every_schedule_is_a_pure_function_into_the_blocks(kind, num_blocks, seed, rounds):
    schedule = BlockSchedule(kind, num_blocks, seed)
    blocks = [schedule.block_for_round(r) for r in rounds]
    assert all(0 <= b < num_blocks for b in blocks)
    assert blocks == [BlockSchedule(kind, num_blocks, seed).block_for_round(r) for r in rounds]
