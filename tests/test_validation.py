"""Bad input is refused before training, each with a message naming the value and what is accepted."""

import inspect
from dataclasses import FrozenInstanceError, fields
from datetime import timedelta

import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, IterableDataset
from toy import ToyModule, toy_dataset, toy_loader

from lightning_parablock import Aggregator, FederatedBlockStrategy, ParaBlockCallback, SimulatedLink
from lightning_parablock.data import dirichlet_partition, iid_partition
from lightning_parablock.strategies.federation_options import FederationOptions

CONSTRUCTION_ERRORS = [
    (lambda: FederatedBlockStrategy(num_clients=0), r"`num_clients` must be a positive integer, got 0"),
    (lambda: FederatedBlockStrategy(local_steps=0), r"`local_steps` must be a positive integer, got 0"),
    (lambda: FederatedBlockStrategy(global_lr=0.0), r"`global_lr \(η\)` must be > 0, got 0.0"),
    (lambda: FederatedBlockStrategy(participation=1.5), r"in \(0, 1\], got 1.5"),
    (lambda: FederatedBlockStrategy(participation=0.0), r"in \(0, 1\], got 0.0"),
    (lambda: FederatedBlockStrategy(num_clients=4, clients_per_round=5), r"between 1 and num_clients=4, got 5"),
    (lambda: FederatedBlockStrategy(optimizer_state="shared"), r"'reset' or 'per_block', got 'shared'"),
    (lambda: FederatedBlockStrategy(weighting="tokens"), r"'uniform' or 'samples', got 'tokens'"),
    (lambda: FederatedBlockStrategy(schedule="shuffled"), r"`schedule` must be 'random', 'sequential', 'reverse', 'permutation', 'spaced' or 'gradient', got 'shuffled'"),
    (lambda: ParaBlockCallback(staleness=-1), r"`staleness .*` must be an integer >= 0, got -1"),
    (lambda: ParaBlockCallback(staleness=1.5), r"`staleness .*` must be an integer, got 1.5"),
    (lambda: FederatedBlockStrategy(num_clients=2.5), r"`num_clients` must be an integer, got 2.5"),
    (lambda: FederatedBlockStrategy(global_lr=float("inf")), r"`global_lr \(η\)` must be a finite number, got inf"),
    (lambda: FederatedBlockStrategy(layers_per_block=0), r"`layers_per_block` must be a positive integer, got 0"),
    (lambda: FederatedBlockStrategy(seed=-3), r"`seed` must be an integer >= 0, got -3"),
    (lambda: FederatedBlockStrategy(block_patterns=["layers", ["ok", "("]]), r"`block_patterns\[1\]` holds '\(', which is not a regular expression"),
    (lambda: FederatedBlockStrategy(block_patterns="layers"), r"`block_patterns` must be a list with one pattern .* per block, got 'layers'"),
    (lambda: FederatedBlockStrategy(block_patterns=["a", []]), r"`block_patterns\[1\]` must be a pattern or a non-empty list of patterns, got \[\]"),
    (lambda: FederatedBlockStrategy(block_patterns=[]), r"`block_patterns` is empty \(\[\]\): give at least one block .*or None for the decoder's layers"),
    (lambda: FederatedBlockStrategy(block_patterns=5), r"`block_patterns` must be a list with one pattern .* per block, got 5"),
    (lambda: FederatedBlockStrategy(block_patterns=[3]), r"`block_patterns\[0\]` must be a pattern or a non-empty list of patterns, got 3"),
    (lambda: FederatedBlockStrategy(shuffle="no"), r"`shuffle` must be True or False, got 'no' \(str\)"),
    (lambda: FederatedBlockStrategy(include_head=1), r"`include_head` must be True or False, got 1 \(int\)"),
    (lambda: FederatedBlockStrategy(client_optimizer="adam"), r"`client_optimizer` must be a callable.*got 'adam'"),
    (lambda: FederatedBlockStrategy(device="gpu0"), r"`device` must be a torch device such as 'cpu', 'cuda' or 'cuda:1'.*got 'gpu0'"),
    (lambda: FederatedBlockStrategy(process_group_backend="nccl2"), r"`process_group_backend` must be one of 'gloo', 'nccl'.*got 'nccl2'"),
    (lambda: FederatedBlockStrategy(timeout=30), r"`timeout` must be a positive `datetime.timedelta` or None, got 30"),
    (lambda: FederatedBlockStrategy(start_method="thread"), r"`start_method` must be 'popen', 'spawn', 'fork' or 'forkserver', got 'thread'"),
    (lambda: FederatedBlockStrategy(schedule_spacing=2), r"`schedule_spacing` applies to schedule='spaced' only"),
    (lambda: ParaBlockCallback(link="100MB/s"), r"`link` must be a SimulatedLink.*got '100MB/s'"),
    (lambda: ParaBlockCallback(aggregator="median"), r"`aggregator` must be an Aggregator.*got 'median'"),
    (lambda: ParaBlockCallback(comm_timeout=float("nan")), r"`comm_timeout` must be a finite number, got nan"),
    (lambda: SimulatedLink(latency=float("inf")), r"`latency` must be a finite number, got inf"),
    (lambda: ParaBlockCallback(comm_timeout="soon"), r"`comm_timeout`: Could not parse duration 'soon'.*'20ms', '1.5s'.*or a number of seconds"),
    (lambda: ParaBlockCallback(comm_timeout=0), r"`comm_timeout` must be positive, got 0"),
    (lambda: SimulatedLink(bandwidth="fast"), r"`bandwidth`: Could not parse bandwidth 'fast'.*'100MB/s'"),
    (lambda: SimulatedLink(bandwidth="-5MB/s"), r"`bandwidth`: Could not parse bandwidth '-5MB/s'. Use a positive number"),
    (lambda: SimulatedLink(bandwidth=-1e6), r"`bandwidth` must be positive, got -1000000.0"),
    (lambda: SimulatedLink(bandwidth="100MB"), r"Could not parse bandwidth '100MB'"),
    (lambda: SimulatedLink(latency="-5ms"), r"`latency`: Could not parse duration '-5ms'"),
    (lambda: SimulatedLink(latency="abc"), r"`latency`: Could not parse duration 'abc'.*'20ms', '1.5s'.*or a number of seconds"),
    (lambda: SimulatedLink(latency=-0.5), r"`latency` cannot be negative, got -0.5"),
    (lambda: Aggregator(method="krum"), r"'mean', 'median' or 'trimmed_mean', got 'krum'"),
    (lambda: dirichlet_partition(["a", "b"] * 10, 2, alpha=0.0, seed=0), r"alpha"),
    (lambda: iid_partition(3, 5, seed=0), r"5"),
]


def test_process_arguments_ddp_accepts_pass_and_the_options_are_frozen():
    strategy = FederatedBlockStrategy(
        num_clients=4.0, participation=0.5, process_group_backend="cpu:gloo,cuda:nccl", timeout=timedelta(minutes=5)
    )
    assert strategy.options.num_clients == 4 and type(strategy.options.num_clients) is int
    assert strategy.options.participants_per_round == 2
    with pytest.raises(FrozenInstanceError):
        strategy.options.num_clients = 8  # a run's settings are compared on resume: they do not change under it


@pytest.mark.parametrize(("make", "message"), CONSTRUCTION_ERRORS, ids=[m for _, m in CONSTRUCTION_ERRORS])
def test_bad_arguments_are_refused_on_construction(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()




class NoIterable(IterableDataset):
    def __iter__(self):
        yield from toy_dataset()


def fit(strategy=None, callback=None, module=None, loader=None, **trainer_kwargs):
    trainer = quiet_trainer(
        strategy=strategy or FederatedBlockStrategy(num_clients=3, local_steps=1),
        callbacks=[callback or ParaBlockCallback()],
        **{"max_epochs": 3, **trainer_kwargs},
    )
    trainer.fit(module or ToyModule(), loader if loader is not None else toy_loader(toy_dataset()))


SETUP_ERRORS = [
    (dict(strategy=FederatedBlockStrategy(layers_per_block=3)), ValueError, r"`layers_per_block=3` does not divide the model's 4 layers. Use one of \[1, 2, 4\]"),
    (dict(strategy=FederatedBlockStrategy(layers_per_block=8)), ValueError, r"`layers_per_block=8` exceeds the model's 4 layers"),
    (dict(strategy=FederatedBlockStrategy(block_patterns=[r"net\.head", r"decoder"])), ValueError, r"pattern 'decoder' \(block 1\) matches no parameter"),
    (dict(strategy=FederatedBlockStrategy(layer_split="attention_mlp")), ValueError, r"Could not split layer"),
    (dict(strategy=FederatedBlockStrategy(num_clients=60)), MisconfigurationException, r"48 examples, fewer than num_clients=60"),
    (dict(callback=ParaBlockCallback(staleness=3)), MisconfigurationException, r"`staleness=3` is not below the number of rounds \(max_epochs=3\)"),
    (dict(limit_train_batches=0.5), MisconfigurationException, r"`limit_train_batches=0.5` would cut rounds short"),
    (dict(val_check_interval=0.5), MisconfigurationException, r"`val_check_interval=0.5`"),
    (dict(loader=DataLoader(NoIterable(), batch_size=4)), MisconfigurationException, r"map-style dataset.*got DataLoader"),
    (dict(loader=DataLoader(toy_dataset(), batch_size=None)), MisconfigurationException, r"no `batch_size`"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "error", "message"), SETUP_ERRORS, ids=[m[:40] for *_, m in SETUP_ERRORS])
def test_bad_setups_are_refused_before_training(kwargs, error, message):
    module = kwargs.setdefault("module", ToyModule())
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(error, match=message):
        fit(**kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))  # nothing trained, nothing changed


def test_a_fit_without_the_callback_is_refused_at_setup_before_anything_trains():
    module = ToyModule()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = quiet_trainer(strategy=FederatedBlockStrategy(num_clients=2, local_steps=1), max_epochs=1)
    with pytest.raises(MisconfigurationException, match=r"has no exchange: add `ParaBlockCallback\(...\)`"):
        trainer.fit(module, toy_loader(toy_dataset()))
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.parametrize(
    ("tuner", "message"),
    [(LearningRateFinder(), "LearningRateFinder runs training loops of its own"),
     (BatchSizeFinder(), "Batch size finder is not supported with distributed strategies")],  # Lightning's own
    ids=["lr_finder", "batch_size_finder"],
)  # fmt: skip
def test_tuners_that_train_before_the_first_round_are_refused(tuner, message):
    module = ToyModule()
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=2, local_steps=1),
        callbacks=[ParaBlockCallback(staleness=0), tuner],
        max_epochs=2,
    )
    with pytest.raises(MisconfigurationException, match=message):
        trainer.fit(module, toy_loader(toy_dataset()))


def test_the_strategy_passes_every_federation_option_with_the_same_default():
    strategy_defaults = {
        name: p.default for name, p in inspect.signature(FederatedBlockStrategy.__init__).parameters.items()
    }
    options = [f for f in fields(FederationOptions) if f.init]
    assert {f.name: f.default for f in options} == {f.name: strategy_defaults[f.name] for f in options}
    given = {f.name: strategy_defaults[f.name] for f in options} | {"num_clients": 3, "seed": 7, "weighting": "samples"}
    assert {f.name: getattr(FederatedBlockStrategy(**given).options, f.name) for f in options} == given
