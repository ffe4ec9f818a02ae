"""The invariants of DESIGN §1 on the Lightning implementation."""


import pytest
import torch
from helpers import lightning_and_reference, max_abs_diff, quiet_trainer
from lightning import Callback, LightningDataModule
from torch.utils.data import default_collate
from toy import ToyModule, toy_dataset, toy_loader, toy_loss

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback


class ViewRecorder(Callback):
    """After each boundary: every client's materialized view and the global model."""

    def __init__(self):
        self.views, self.globals = [], []

    def on_train_epoch_end(self, trainer, pl_module):
        strategy = trainer.strategy
        self.views.append([strategy.federation.client_view(j) for j in range(strategy.options.num_clients)])
        self.globals.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


class SharedShardData(LightningDataModule):
    """Every client holds the same examples in the same order."""

    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset

    def train_dataloader(self):
        return toy_loader(self.dataset)

    def client_partition(self, num_clients):
        return [list(range(len(self.dataset)))] * num_clients


def test_single_client_parablock_is_centralized_block_coordinate_descent():
    module, _, strategy, _ = lightning_and_reference(staleness=1, num_clients=1, optimizer="adamw", rounds=5)
    dataset = toy_dataset()
    central = ToyModule(optimizer="adamw")
    for t in range(5):
        strategy.partition.freeze_all_but(central, strategy.plan.block_of(t))
        optimizer = central.configure_optimizers()  # fresh at every block switch
        (turn,) = strategy.batch_sampler.plan(t)
        for batch in turn.batches:
            loss = toy_loss(central, default_collate([dataset[i] for i in batch]))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert max_abs_diff(module, central) <= 1e-6


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_identical_client_data_makes_staleness_irrelevant(optimizer):
    dataset = toy_dataset(n=16)
    finals = []
    for staleness in (0, 1, 2):
        module = ToyModule(optimizer=optimizer)
        strategy = FederatedBlockStrategy(num_clients=3, local_steps=2, shuffle=False, seed=5)
        trainer = quiet_trainer(strategy=strategy, callbacks=[ParaBlockCallback(staleness=staleness)], max_epochs=5)
        trainer.fit(module, datamodule=SharedShardData(dataset))
        finals.append(module)
    assert max_abs_diff(finals[0], ToyModule()) > 1e-3
    assert max_abs_diff(finals[0], finals[1]) <= 1e-6
    assert max_abs_diff(finals[0], finals[2]) <= 1e-6


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_client_views_match_literal_client_models_after_every_boundary(staleness):
    """Global + own pending deltas (one model) equals the literal per-client models of the reference."""
    recorder = ViewRecorder()
    _, reference, _, _ = lightning_and_reference(
        staleness, num_clients=4, optimizer="adamw", rounds=5, clients_per_round=3, extra_callbacks=[recorder]
    )
    for t in range(5):
        for j in range(4):
            for name, value in recorder.views[t][j].items():
                assert torch.allclose(value, reference.snapshots[t][j][name], atol=1e-6, rtol=0), (t, j, name)


def test_previous_block_of_every_client_equals_global_after_boundary():
    """Paper Eq. 3 = Eq. 4: once round t−1 is aggregated, no client differs from the global on b_{t−1}."""
    recorder = ViewRecorder()
    _, _, strategy, _ = lightning_and_reference(
        1, num_clients=3, optimizer="sgd", rounds=4, schedule="sequential", extra_callbacks=[recorder]
    )
    for t in range(1, 4):
        previous_block = strategy.partition[strategy.plan.block_of(t - 1)]
        current_block = strategy.partition[strategy.plan.block_of(t)]
        for view in recorder.views[t]:
            for name in previous_block.param_names:
                assert torch.equal(view[name], recorder.globals[t][name].float())
        # the block trained this round is still each client's own
        assert any(not torch.equal(recorder.views[t][0][n], recorder.views[t][1][n]) for n in current_block.param_names)


class StateSizeProbe(Callback):
    def __init__(self):
        self.largest_client_state = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.largest_client_state = max(self.largest_client_state, trainer.strategy.federation.client_state_nbytes())


@pytest.mark.parametrize("optimizer_state", ["reset", "per_block"])
def test_client_state_grows_by_blocks_not_models(optimizer_state):
    sizes = {}
    for num_clients in (2, 8):
        module = ToyModule(optimizer="adamw", num_layers=8)
        probe = StateSizeProbe()
        strategy = FederatedBlockStrategy(num_clients=num_clients, local_steps=1, optimizer_state=optimizer_state)
        trainer = quiet_trainer(strategy=strategy, callbacks=[ParaBlockCallback(staleness=1), probe], max_epochs=3)
        trainer.fit(module, toy_loader(toy_dataset()))
        sizes[num_clients] = probe.largest_client_state
        block_bytes = max(strategy.partition.numel(module, b) for b in range(len(strategy.partition))) * 4
    model_bytes = sum(p.numel() for p in module.parameters()) * 4
    per_client = (sizes[8] - sizes[2]) / 6
    # at most s + 1 = 2 pending deltas per client, plus, per kept block (3 rounds), AdamW's two
    # moments and a scalar step count for each of the block's 2 tensors
    allowed = 2 * block_bytes + (3 * (2 * block_bytes + 2 * 4) if optimizer_state == "per_block" else 0)
    assert 0 < per_client <= allowed
    if optimizer_state == "reset":
        assert per_client < model_bytes / 4


def test_lightning_run_differs_from_reference_of_other_staleness():
    """The agreement tests can fail: a Lightning ParaBlock run is not the FedBCD reference."""
    module, _, _, _ = lightning_and_reference(1, 3, "sgd")
    _, fedbcd_reference, _, _ = lightning_and_reference(0, 3, "sgd")
    assert max_abs_diff(module, fedbcd_reference.global_model) > 1e-4
