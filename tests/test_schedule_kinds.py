"""The permutation and gradient-guided block schedules, alone and in a run."""

import copy

import pytest
import torch
from helpers import quiet_trainer
from lightning import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import default_collate
from toy import ToyDecoder, ToyModule, toy_dataset, toy_loader, toy_loss

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback
from lightning_parablock.core.schedule import BlockSchedule
from lightning_parablock.strategies.gradient_probe import block_gradient_norms


def test_permutation_visits_every_block_once_per_cycle_in_fresh_orders():
    schedule = BlockSchedule("permutation", 5, seed=3)
    cycles = [[schedule.block_for_round(c * 5 + p) for p in range(5)] for c in range(6)]
    assert all(sorted(cycle) == list(range(5)) for cycle in cycles)
    assert len({tuple(cycle) for cycle in cycles}) > 1
    assert cycles[2] == [BlockSchedule("permutation", 5, seed=3).block_for_round(10 + p) for p in range(5)]
    assert cycles != [[BlockSchedule("permutation", 5, seed=4).block_for_round(c * 5 + p) for p in range(5)] for c in range(6)]


def test_block_gradient_norms_on_a_constructed_case():
    small, large, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(4))
    small.requires_grad_(False)
    loss = lambda: (2.0 * small).sum() + (5.0 * large).sum()  # noqa: E731  d/dsmall = 2, d/dlarge = 5
    norms = block_gradient_norms(loss, [[small], [large], [unused]])
    assert norms == pytest.approx([2.0 * 3**0.5, 5.0 * 2.0, 0.0])
    assert not small.requires_grad and large.requires_grad  # flags restored
    assert small.grad is None and large.grad is None  # nothing left for an optimizer to pick up


def test_gradient_schedule_picks_the_largest_norm_once_per_round_and_checkpoints_it():
    calls = []

    def norms(round_index):
        calls.append(round_index)
        return [1.0, 5.0 + round_index, 2.0] if round_index < 2 else [9.0, 1.0, 1.0]

    schedule = BlockSchedule("gradient", 3, block_gradient_norms=norms)
    assert [schedule.block_for_round(t) for t in (0, 1, 2, 0, 2)] == [1, 1, 0, 1, 0]
    assert calls == [0, 1, 2] and set(schedule.probe_seconds) == {0, 1, 2}
    resumed = BlockSchedule("gradient", 3, block_gradient_norms=lambda r: pytest.fail("re-probed a past round"))
    resumed.load_state_dict(schedule.state_dict())
    assert [resumed.block_for_round(t) for t in range(3)] == [1, 1, 0]
    with pytest.raises(ValueError, match="needs `block_gradient_norms`"):
        BlockSchedule("gradient", 3)
    with pytest.raises(ValueError, match="returned 2 norms for 3 blocks"):
        BlockSchedule("gradient", 3, block_gradient_norms=lambda r: [1.0, 2.0]).block_for_round(0)


class AmplifiedDecoder(ToyDecoder):
    """The toy decoder with one layer's residual branch multiplied by 20: its gradient dominates."""

    def __init__(self, amplified_layer: int) -> None:
        super().__init__()
        self.gains = [20.0 if i == amplified_layer else 1.0 for i in range(len(self.layers))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for gain, layer in zip(self.gains, self.layers):
            h = h + gain * layer(h)
        return self.head(h)


class ScaledToy(ToyModule):
    def __init__(self, amplified_layer: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        torch.manual_seed(0)
        self.net = AmplifiedDecoder(amplified_layer)


def _fit_gradient(tmp_path, module, rounds=3, callbacks=(), ckpt_path=None, staleness=1):
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=2, schedule="gradient", seed=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer = quiet_trainer(
        strategy=strategy,
        callbacks=[ParaBlockCallback(staleness=staleness), checkpoint, *callbacks],
        max_epochs=rounds,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, toy_loader(toy_dataset()), ckpt_path=ckpt_path, weights_only=ckpt_path is not None)
    return strategy, trainer


def test_gradient_schedule_in_a_run_probes_the_global_model_and_charges_the_timeline(tmp_path):
    module = ScaledToy()
    initial = copy.deepcopy(module)
    strategy, trainer = _fit_gradient(tmp_path, module)
    dataset = toy_dataset()
    probe_batch = default_collate([dataset[i] for i in strategy.batch_sampler.plan(0)[0].batches[0]])
    blocks = [list(strategy.partition.parameters(initial, b).values()) for b in range(len(strategy.partition))]
    expected = block_gradient_norms(lambda: toy_loss(initial, probe_batch), blocks)
    assert strategy.plan.block_of(0) == max(range(len(expected)), key=expected.__getitem__) == 2
    records = [r for r in trainer.callbacks[0].records if not r.flush]
    assert all(r.probe_seconds > 0 for r in records)
    assert all(p.requires_grad for p in module.parameters())  # the user's flags are back after training


class Crash(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            raise RuntimeError("simulated crash")


def test_gradient_schedule_resumes_with_its_past_choices(tmp_path):
    whole, _ = _fit_gradient(tmp_path / "a", ScaledToy(optimizer="adamw"), rounds=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit_gradient(tmp_path / "b", ScaledToy(optimizer="adamw"), rounds=4, callbacks=[Crash()])
    module = ScaledToy(optimizer="adamw")
    resumed, _ = _fit_gradient(tmp_path / "b", module, rounds=4, ckpt_path=tmp_path / "b" / "last.ckpt")
    assert resumed.schedule.choices == whole.schedule.choices
    assert set(resumed.schedule.probe_seconds) == {2, 3}  # rounds 0 and 1 came from the checkpoint
    whole_module = whole.lightning_module
    for (name, a), b in zip(whole_module.named_parameters(), module.parameters()):
        assert torch.equal(a, b), name
