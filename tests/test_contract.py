"""The contract between strategy and callback, one aggregator for every transport, and what the library gives back.

- The callback hands the strategy one typed, frozen ``ExchangeSpec`` and then only calls the round protocol: it
  reads and writes nothing else of the strategy (checked on its source).
- The same aggregator object gives the same bits in memory, through the collective transport (partial sums or
  gathered deltas) and called directly on every client's delta, as a federation server does.
- A method of one's own extends the strategy through named hooks only; the module, its gradient hooks and the
  Trainer's callback list leave a fit as they came.
"""

from __future__ import annotations

import ast
import inspect
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import quiet_trainer
from lightning import Callback, LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import CSVLogger
from toy import ToyModule, toy_dataset, toy_loader

import lightning_parablock.callbacks.parablock as callback_module
from lightning_parablock import (
    ExchangeSpec,
    FederatedBlockStrategy,
    MeanAggregator,
    MedianAggregator,
    ParaBlockCallback,
    SimulatedLink,
    StackingAggregator,
    TrimmedMeanAggregator,
)
from lightning_parablock.comm.codecs import make_codec
from lightning_parablock.comm.distributed import CollectiveTransport
from lightning_parablock.comm.in_memory import InMemoryTransport
from lightning_parablock.comm.transport import RoundUploads
from lightning_parablock.core.planning import RoundPlan

ROUND_PROTOCOL = {
    "configure_exchange",
    "start_round",
    "start_turn_at",
    "end_last_turn",
    "rounds_awaiting_exchange",
    "start_exchange",
    "finish_exchange",
    "begin_flush",
    "close_round",
    "round_open",
    "at_round_end",
    "merge_round_record",
    "end_turn",
    "is_last_batch_of_round",
    "active_client",
    "options",
    "num_blocks",
}


# ----------------------------------------------------------------------------------------- the seam


def test_the_callback_talks_to_the_strategy_through_the_round_protocol_only():
    tree = ast.parse(Path(inspect.getfile(callback_module)).read_text())
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "strategy"
    }
    assert used <= ROUND_PROTOCOL, sorted(used - ROUND_PROTOCOL)
    written = [
        node
        for node in ast.walk(tree)
        if isinstance(node, (ast.Assign, ast.AugAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id != "self"
    ]
    assert not [ast.unparse(node) for node in written if "record" not in ast.unparse(node)]  # only its own records


def test_the_strategy_owns_the_spec_the_callback_hands_over_once():
    callback = ParaBlockCallback(staleness=2, aggregator=MedianAggregator(), compression="int8", comm_timeout="90s")
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=1)
    trainer = quiet_trainer(strategy=strategy, callbacks=[callback], max_epochs=3)
    trainer.fit(ToyModule(), toy_loader(toy_dataset()))
    spec = strategy.exchange_spec
    assert isinstance(spec, ExchangeSpec) and spec.method == "parablock"
    assert (spec.staleness, spec.aggregator, spec.codec, spec.comm_timeout) == (
        2, callback.aggregator, callback.codec, 90.0,
    )  # fmt: skip
    with pytest.raises(AttributeError):
        spec.staleness = 1  # frozen
    settings = strategy.run_settings()
    assert settings["staleness"] == 2 and settings["aggregator"] == repr(callback.aggregator)
    assert settings["precision"] == "32-true"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"aggregator": "median"}, r"`aggregator` must be an Aggregator .*got 'median'"),
        ({"codec": "int8"}, r"`codec` must be a Codec .*got 'int8'"),
        ({"link": 10}, r"`link` must be a SimulatedLink.*got 10"),
        ({"transport": "flower"}, r"`transport` must be a TransportChoice .*got 'flower'"),
        ({"staleness": -1}, r"staleness .*-1"),
        ({"comm_timeout": 0}, r"comm_timeout"),
    ],
)
def test_an_exchange_spec_refuses_a_wrong_value_by_name(arguments, message):
    with pytest.raises((TypeError, ValueError), match=message):
        ExchangeSpec(**arguments)


def test_the_deprecated_strategy_weighting_reaches_the_aggregator_or_is_refused():
    with pytest.warns(FutureWarning, match="weights belong to the aggregator"):
        strategy = FederatedBlockStrategy(num_clients=2, weighting="samples")
    strategy.configure_exchange(ExchangeSpec())
    assert strategy.exchange_spec.aggregator.weighting == "samples"
    with pytest.warns(FutureWarning):
        strategy = FederatedBlockStrategy(num_clients=2, weighting="samples")
    with pytest.raises(ValueError, match="uses no weights"):
        strategy.configure_exchange(ExchangeSpec(aggregator=MedianAggregator()))


# ------------------------------------------------------------------- one aggregator, every transport


def round_deltas(clients: int = 4, numel: int = 1000) -> dict[int, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return {
        c: {"a": torch.randn(numel, generator=generator) * 1e-3, "b": torch.randn(8, 4, generator=generator)}
        for c in range(clients)
    }


WEIGHTS = {0: 3.0, 1: 1.0, 2: 7.0, 3: 2.0}
LAYOUT = [("a", torch.Size([1000])), ("b", torch.Size([8, 4]))]


@pytest.mark.parametrize(
    "aggregator",
    [MeanAggregator(weighting="samples"), MeanAggregator(clip_norm=0.05), MedianAggregator(), TrimmedMeanAggregator(0.25)],
    ids=["mean", "clipped_mean", "median", "trimmed_mean"],
)
@pytest.mark.parametrize("compression", ["none", "int8"])
def test_one_aggregator_gives_the_same_bits_in_memory_in_collectives_and_on_a_server(one_rank_group, aggregator, compression):
    codec = make_codec(compression)
    encoded = {c: {n: codec.encode(t) for n, t in d.items()} for c, d in round_deltas().items()}
    uploads = RoundUploads(3, 1, encoded, WEIGHTS)
    in_memory = InMemoryTransport(aggregator, SimulatedLink()).exchange(uploads, threading.Event())
    collective = CollectiveTransport(dist.group.WORLD, aggregator, SimulatedLink(), [0] * 4, lambda b: LAYOUT, 30.0)
    over_ranks = collective.exchange(uploads, threading.Event())
    decoded = {c: {n: e.decode() for n, e in d.items()} for c, d in encoded.items()}
    on_a_server = aggregator(decoded, WEIGHTS)  # what a server that receives every client's delta computes
    for name in ("a", "b"):
        assert torch.equal(in_memory.aggregate[name], over_ranks.aggregate[name]), name
        assert torch.equal(in_memory.aggregate[name], on_a_server.aggregate[name]), name
    assert in_memory.upload_bytes == over_ranks.upload_bytes


def test_each_rule_says_whether_ranks_may_sum_in_parts():
    assert MeanAggregator.reduces_from_partial_sums
    assert not any(rule.reduces_from_partial_sums for rule in (MedianAggregator, TrimmedMeanAggregator, StackingAggregator))
    with pytest.raises(NotImplementedError, match="needs every client's delta"):
        MedianAggregator().accumulate({}, {}, {})


def test_a_partial_sum_adds_in_place_and_reads_each_delta_once():
    deltas = round_deltas(2)
    total = {n: torch.zeros_like(t) for n, t in deltas[0].items()}
    storage = {n: t.data_ptr() for n, t in total.items()}
    MeanAggregator().accumulate(total, deltas, {0: 0.25, 1: 0.75})
    assert {n: t.data_ptr() for n, t in total.items()} == storage  # summed where it lies, no new tensor
    torch.testing.assert_close(total["a"], 0.25 * deltas[0]["a"] + 0.75 * deltas[1]["a"])


# ------------------------------------------------------------------------------ named extension points


class EveryOtherBlock(RoundPlan):
    def block_of(self, round_index: int) -> int:
        return round_index % 2


class CustomMethod(FederatedBlockStrategy):
    """A method of one's own, through the named hooks alone."""

    def __init__(self, **kwargs):
        self.ended: list[tuple[int, int]] = []
        super().__init__(**kwargs)

    def make_round_plan(self, schedule, member, members):
        options = self.options
        return EveryOtherBlock(options.num_clients, options.participants_per_round, options.seed, schedule,
                               self.placement, members, member)  # fmt: skip

    def on_client_turn_end(self, client: int, round_index: int) -> None:
        self.ended.append((client, round_index))
        for tensor in self.federation.delta_of(client, round_index).values():
            tensor.zero_()  # this method keeps nothing a client trains

    def check_exchange(self, spec: ExchangeSpec) -> None:
        if spec.staleness > 1:
            raise ValueError("CustomMethod runs with staleness 0 or 1.")


def test_a_method_of_ones_own_plugs_in_through_the_named_hooks():
    module = ToyModule(num_layers=3)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    strategy = CustomMethod(num_clients=2, local_steps=1)
    callback = ParaBlockCallback(staleness=1)
    quiet_trainer(strategy=strategy, callbacks=[callback], max_epochs=4).fit(module, toy_loader(toy_dataset()))
    assert [r.block for r in callback.records if not r.flush] == [0, 1, 0, 1]
    assert sorted(strategy.ended) == [(c, r) for c in range(2) for r in range(4)]
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())  # every delta was zeroed
    with pytest.raises(ValueError, match="staleness 0 or 1"):
        quiet_trainer(strategy=CustomMethod(num_clients=2), callbacks=[ParaBlockCallback(staleness=2)], max_epochs=3).fit(
            ToyModule(), toy_loader(toy_dataset())
        )


# --------------------------------------------------------------------------- what a fit gives back


class NoOptimizerModule(ToyModule):
    configure_optimizers = LightningModule.configure_optimizers  # the user defined none


def test_the_module_gets_its_configure_optimizers_back_after_the_fit():
    module = NoOptimizerModule()
    assert "configure_optimizers" not in vars(module)
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=1, client_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    quiet_trainer(strategy=strategy, callbacks=[ParaBlockCallback()], max_epochs=2).fit(module, toy_loader(toy_dataset()))
    assert "configure_optimizers" not in vars(module)


def test_the_trainers_callbacks_stay_in_the_users_order(tmp_path):
    callbacks = [ParaBlockCallback(), LearningRateMonitor()]
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=1)
    trainer = quiet_trainer(strategy=strategy, callbacks=callbacks, max_epochs=2, logger=CSVLogger(tmp_path))
    trainer.fit(ToyModule(), toy_loader(toy_dataset()))
    assert [c for c in trainer.callbacks if c in callbacks] == callbacks


def test_the_readmes_method_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### Adding a method") :]
    code = section[section.index("```python") + len("```python") : section.index("```", section.index("```python") + 9)]
    namespace: dict = {}
    exec(compile(code, "README.md (Adding a method)", "exec"), namespace)
    trainer, module = namespace["trainer"], ToyModule(num_layers=3)
    biases = {n: p.detach().clone() for n, p in module.named_parameters() if n.endswith("bias")}
    trainer.fit(module, toy_loader(toy_dataset()))
    callback = next(c for c in trainer.callbacks if isinstance(c, ParaBlockCallback))
    assert [r.block for r in callback.records if not r.flush] == [0, 1, 2, 0]
    assert all(torch.equal(p, biases[n]) for n, p in module.named_parameters() if n in biases)


# ------------------------------------------------------------------------- found by review


def test_the_strategy_keeps_its_own_copy_of_the_exchange_and_it_is_read_only():
    aggregator = MeanAggregator(clip_norm=1.0)
    strategy = FederatedBlockStrategy(num_clients=2)
    strategy.configure_exchange(ExchangeSpec(aggregator=aggregator, comm_timeout="90s"))
    aggregator.clip_norm = 5.0  # the caller's object changes; the run's rule does not
    assert strategy.exchange_spec.aggregator.clip_norm == 1.0 and strategy.exchange_spec.comm_timeout == 90.0
    assert strategy.exchange_spec.aggregator == MeanAggregator(clip_norm=1.0)  # rules compare by their settings
    with pytest.raises(AttributeError):
        strategy.exchange_spec = ExchangeSpec()


def test_the_exchange_cannot_change_while_a_fit_uses_it():
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=1)
    refused = []

    class ChangeMidFit(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            with pytest.raises(MisconfigurationException, match="while a fit is set up"):
                strategy.configure_exchange(ExchangeSpec(staleness=0))
            refused.append(True)

    quiet_trainer(strategy=strategy, callbacks=[ParaBlockCallback(), ChangeMidFit()], max_epochs=2).fit(
        ToyModule(), toy_loader(toy_dataset())
    )
    assert refused and strategy.exchange_spec.staleness == 1
    strategy.configure_exchange(ExchangeSpec(staleness=0))  # between fits it may change


def test_the_callbacks_settings_stay_attributes_a_sweep_can_set():
    callback = ParaBlockCallback(staleness=2.0, comm_timeout="90s")
    assert (callback.staleness, type(callback.staleness), callback.comm_timeout) == (2, int, 90.0)
    callback.link = SimulatedLink("50MB/s")
    assert callback.spec.link == SimulatedLink(5e7)
    callback.aggregator = "median"
    with pytest.raises(TypeError, match="`aggregator` must be an Aggregator"):
        callback.spec


def test_a_run_without_staleness_marks_no_checkpoint_as_flushed(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_last=True)
    trainer = quiet_trainer(strategy=FederatedBlockStrategy(num_clients=2, local_steps=1), max_epochs=2,
                            callbacks=[ParaBlockCallback(staleness=0), checkpoint], enable_checkpointing=True)  # fmt: skip
    trainer.fit(ToyModule(), toy_loader(toy_dataset()))
    assert not torch.load(tmp_path / "last.ckpt", weights_only=True)["federation"]["flushed"]
    assert not list(tmp_path.glob("final*.ckpt"))  # nothing was flushed: last.ckpt is the final model


def test_one_final_checkpoint_per_folder_however_many_checkpoint_callbacks_share_it(tmp_path):
    callbacks = [ParaBlockCallback(staleness=1), ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_last=True),
                 ModelCheckpoint(dirpath=tmp_path, every_n_epochs=2, filename="again-{epoch}")]  # fmt: skip
    trainer = quiet_trainer(strategy=FederatedBlockStrategy(num_clients=2, local_steps=1), max_epochs=2,
                            callbacks=callbacks, enable_checkpointing=True)  # fmt: skip
    trainer.fit(ToyModule(), toy_loader(toy_dataset()))
    assert sorted(p.name for p in tmp_path.glob("final*.ckpt")) == ["final.ckpt"]


def test_a_round_without_senders_gives_no_aggregate_in_every_transport(one_rank_group):
    empty = RoundUploads(4, 0, {}, {})
    in_memory = InMemoryTransport(MeanAggregator(), SimulatedLink()).exchange(empty, threading.Event())
    collective = CollectiveTransport(dist.group.WORLD, MeanAggregator(), SimulatedLink(), [0, 0], lambda b: LAYOUT, 30.0)
    over_ranks = collective.exchange(empty, threading.Event())
    assert in_memory.aggregate is None and over_ranks.aggregate is None
    assert in_memory.upload_bytes == over_ranks.upload_bytes == {}


def test_an_old_median_checkpoint_with_sample_weights_resumes_as_today_s_median():
    from lightning_parablock.strategies.run_settings import upgraded

    saved = {"aggregator": "Aggregator(method='median', clip_norm=None, trim_fraction=0.1, nonfinite='raise')",
             "weighting": "samples"}  # fmt: skip
    assert upgraded(saved) == {"aggregator": repr(MedianAggregator()), "weighting": "uniform"}


@pytest.mark.parametrize(
    ("delta", "message"),
    [({"a": torch.ones(1), "b": torch.ones(8, 4)}, r"holds 'a' of shape \(1,\), expected \(1000,\)"),
     ({"a": torch.ones(1000), "b": torch.ones(8, 4), "c": torch.ones(2)}, r"holds tensors \['a', 'b', 'c'\]")],
)  # fmt: skip
def test_a_delta_that_does_not_fit_the_block_is_refused_by_every_transport(one_rank_group, delta, message):
    uploads = RoundUploads(0, 0, {0: delta, 1: {"a": torch.ones(1000), "b": torch.ones(8, 4)}}, {0: 1.0, 1: 1.0})
    with pytest.raises(ValueError, match="Client [01] sent"):  # in memory the clients are compared with each other
        InMemoryTransport(MeanAggregator(), SimulatedLink()).exchange(uploads, threading.Event())
    collective = CollectiveTransport(dist.group.WORLD, MeanAggregator(), SimulatedLink(), [0, 0], lambda b: LAYOUT, 30.0)
    with pytest.raises(ValueError, match=f"Client 0 \\(rank 0\\) sent a delta that {message}"):
        collective.exchange(uploads, threading.Event())  # summed in parts, yet checked as in memory


def test_rules_of_ones_own_are_told_what_they_lack_before_training():
    class Old(MeanAggregator):
        def __init__(self):
            super(MeanAggregator, self).__init__(method="median")  # as a subclass of the pre-0.2 Aggregator would

    with pytest.raises(TypeError, match="arguments of the deprecated `Aggregator\\(...\\)` only"):
        Old()

    class SumsWithoutParts(MedianAggregator):
        reduces_from_partial_sums = True

    with pytest.raises(TypeError, match="says it `reduces_from_partial_sums` but has no `accumulate`"):
        ExchangeSpec(aggregator=SumsWithoutParts())
