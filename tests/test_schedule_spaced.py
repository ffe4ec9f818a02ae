"""The ``spaced`` block schedule: random, yet never a block trained in the last ``spacing`` rounds."""

import itertools
import multiprocessing

import pytest

from lightning_parablock.core.schedule import BlockSchedule


def _blocks(num_blocks: int, seed: int, spacing: int, rounds: int) -> list[int]:
    schedule = BlockSchedule("spaced", num_blocks, seed=seed, spacing=spacing)
    return [schedule.block_for_round(t) for t in range(rounds)]


@pytest.mark.parametrize(("num_blocks", "spacing"), [(2, 1), (4, 1), (4, 2), (4, 3), (16, 1), (16, 5)])
def test_never_a_block_of_the_last_spacing_rounds_while_there_are_more_blocks(num_blocks, spacing):
    for seed in range(5):
        blocks = _blocks(num_blocks, seed, spacing, 300)
        for t in range(len(blocks)):
            assert blocks[t] not in blocks[max(0, t - spacing) : t], (seed, t, blocks[max(0, t - spacing) : t + 1])
        assert set(blocks) == set(range(num_blocks))


def test_still_random_where_it_has_a_choice():
    blocks = _blocks(4, 0, 1, 400)
    assert len({tuple(blocks[t : t + 4]) for t in range(0, 400, 4)}) > 20  # not a fixed cycle
    assert len(set(itertools.pairwise(blocks))) == 12  # every ordered pair of distinct blocks
    assert blocks != _blocks(4, 1, 1, 400)


@pytest.mark.parametrize(("num_blocks", "spacing"), [(1, 1), (3, 3), (3, 7)])
def test_with_no_more_blocks_than_the_spacing_every_block_comes_back_every_num_blocks_rounds(num_blocks, spacing):
    blocks = _blocks(num_blocks, 2, spacing, 30)
    assert sorted(blocks[:num_blocks]) == list(range(num_blocks))
    assert all(blocks[t] == blocks[t - num_blocks] for t in range(num_blocks, 30))


def test_a_pure_function_of_seed_spacing_and_round_in_any_order_of_asking():
    reference = _blocks(6, 3, 2, 120)
    resumed = BlockSchedule("spaced", 6, seed=3, spacing=2)  # a resumed run asks for round 97 first
    assert [resumed.block_for_round(t) for t in (97, 5, 119, 0)] == [reference[t] for t in (97, 5, 119, 0)]
    assert resumed.state_dict() == BlockSchedule("spaced", 6, seed=3, spacing=2).state_dict()  # nothing to carry
    fresh = BlockSchedule("spaced", 6, seed=3, spacing=2)
    fresh.load_state_dict(resumed.state_dict())
    assert [fresh.block_for_round(t) for t in range(120)] == reference


def test_a_checkpoint_of_another_spacing_is_refused_naming_both():
    with pytest.raises(ValueError, match="spacing=2, this run spacing=3"):
        BlockSchedule("spaced", 6, spacing=3).load_state_dict(BlockSchedule("spaced", 6, spacing=2).state_dict())
    BlockSchedule("random", 6).load_state_dict({"kind": "random", "choices": {}})  # a checkpoint from before


def _rank_blocks(rank: int) -> list[int]:
    return _blocks(8, 11, 2, 200)


def test_the_same_on_every_rank():
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        per_rank = pool.map(_rank_blocks, range(2))
    assert per_rank[0] == per_rank[1] == _blocks(8, 11, 2, 200)


def test_refuses_bad_spacing_naming_the_value():
    with pytest.raises(ValueError, match="spacing.*0"):
        BlockSchedule("spaced", 4, spacing=0)
    with pytest.raises(ValueError, match="'spaced' schedule only.*spacing=2.*'random'"):
        BlockSchedule("random", 4, spacing=2)


def test_a_run_with_the_spaced_schedule_never_trains_last_rounds_block_again(tmp_path):
    from helpers import quiet_trainer
    from toy import ToyModule, toy_dataset, toy_loader

    from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback

    strategy = FederatedBlockStrategy(num_clients=2, local_steps=1, schedule="spaced", seed=1)
    trainer = quiet_trainer(strategy=strategy, callbacks=[ParaBlockCallback(staleness=1)], max_epochs=12,
                            default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(ToyModule(), toy_loader(toy_dataset()))
    trained = [strategy.plan.block_of(t) for t in range(12)]
    assert trained == _blocks(len(strategy.partition), 1, 1, 12)
    assert all(a != b for a, b in itertools.pairwise(trained))


@pytest.mark.parametrize(("staleness", "schedule_spacing", "expected"), [(2, None, 2), (0, None, 1), (1, 3, 3)])
def test_the_strategys_spacing_is_the_callbacks_staleness_unless_given(tmp_path, staleness, schedule_spacing, expected):
    from helpers import quiet_trainer
    from toy import ToyModule, toy_dataset, toy_loader

    from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback

    strategy = FederatedBlockStrategy(
        num_clients=2, local_steps=1, schedule="spaced", schedule_spacing=schedule_spacing, seed=1
    )
    trainer = quiet_trainer(strategy=strategy, callbacks=[ParaBlockCallback(staleness=staleness)], max_epochs=4,
                            default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(ToyModule(), toy_loader(toy_dataset()))
    assert strategy.schedule.spacing == expected
    assert [strategy.plan.block_of(t) for t in range(4)] == _blocks(len(strategy.partition), 1, expected, 4)


def test_a_spacing_without_the_spaced_schedule_is_refused_naming_both():
    from lightning_parablock import FederatedBlockStrategy

    with pytest.raises(ValueError, match=r"`schedule_spacing` applies to schedule='spaced' only.*'random'"):
        FederatedBlockStrategy(schedule_spacing=2)


@pytest.mark.parametrize(("num_layers", "staleness", "warned"), [(2, 2, True), (3, 3, True), (3, 2, False)])
def test_too_few_blocks_for_the_spacing_is_said_before_training(tmp_path, num_layers, staleness, warned):
    import warnings

    from helpers import quiet_trainer
    from toy import ToyModule, toy_dataset, toy_loader

    from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback

    strategy = FederatedBlockStrategy(num_clients=2, local_steps=1, schedule="spaced", seed=1)
    trainer = quiet_trainer(strategy=strategy, callbacks=[ParaBlockCallback(staleness=staleness)], max_epochs=staleness + 1,
                            default_root_dir=tmp_path)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ToyModule(num_layers=num_layers), toy_loader(toy_dataset()))
    said = [str(w.message) for w in caught if "schedule='spaced'" in str(w.message)]
    if warned:
        assert said and f"only {num_layers} block(s)" in said[0] and "still pending" in said[0]
    else:
        assert not said
