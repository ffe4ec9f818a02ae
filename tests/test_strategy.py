"""The strategy and callback inside a user's Trainer: errors, faults, and a user's own module."""

import math

import pytest
import torch
from helpers import quiet_trainer
from lightning import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from toy import ToyModule, toy_dataset, toy_loader, toy_loss

from lightning_parablock import CommunicationError, FederatedBlockStrategy, ParaBlockCallback, SimulatedLink


def fit(module=None, strategy=None, callbacks=None, **trainer_kwargs):
    module = module if module is not None else ToyModule()
    strategy = strategy if strategy is not None else FederatedBlockStrategy(num_clients=3, local_steps=2)
    callbacks = callbacks if callbacks is not None else [ParaBlockCallback()]
    trainer = quiet_trainer(strategy=strategy, callbacks=callbacks, **{"max_epochs": 3, **trainer_kwargs})
    trainer.fit(module, toy_loader(toy_dataset()))
    return module, trainer


def test_users_own_module_learns_under_the_strategy():
    module = ToyModule(optimizer="adamw", lr=0.02)
    dataset = toy_dataset()
    full_batch = tuple(t for t in dataset.tensors)
    before = toy_loss(module, full_batch).item()
    strategy = FederatedBlockStrategy(num_clients=4, local_steps=4, schedule="sequential")
    fit(module, strategy, [ParaBlockCallback(staleness=1, link=SimulatedLink("10MB/s", "1ms"))], max_epochs=8)
    after = toy_loss(module, full_batch).item()
    assert after < 0.7 * before


class PoisonDelta(Callback):
    """Turns one client's pending delta into NaN just before it is sent."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            delta = trainer.strategy.federation.clients[1].pending[1]
            next(iter(delta.tensors.values())).fill_(math.nan)


def test_comm_thread_error_reaches_the_caller_with_round_and_cause():
    module = ToyModule()
    with pytest.raises(CommunicationError, match=r"round 1 .*NonFiniteDeltaError.*Client 1") as error:
        fit(module, callbacks=[PoisonDelta(), ParaBlockCallback(staleness=1)], max_epochs=4)
    assert error.value.__cause__ is not None
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_strategy_without_callback_is_refused():
    with pytest.raises(MisconfigurationException, match="add `ParaBlockCallback"):
        fit(callbacks=[])


def test_callback_without_strategy_is_refused():
    trainer = quiet_trainer(callbacks=[ParaBlockCallback()], max_epochs=1)
    with pytest.raises(MisconfigurationException, match="FederatedBlockStrategy"):
        trainer.fit(ToyModule(), toy_loader(toy_dataset()))


def test_staleness_not_below_rounds_is_refused():
    with pytest.raises(MisconfigurationException, match=r"staleness=3.*max_epochs=3"):
        fit(callbacks=[ParaBlockCallback(staleness=3)], max_epochs=3)


class SharedOptimizerModule(ToyModule):
    def configure_optimizers(self):
        if not hasattr(self, "_shared"):
            self._shared = torch.optim.SGD(self.parameters(), lr=0.1)
        return self._shared


def test_optimizer_shared_by_clients_is_refused():
    with pytest.raises(MisconfigurationException, match="same optimizer object"):
        fit(SharedOptimizerModule())


def test_client_optimizer_callable_replaces_configure_optimizers():
    made = []

    def client_optimizer(params):
        made.append(torch.optim.SGD(params, lr=0.1))
        return made[-1]

    fit(SharedOptimizerModule(), FederatedBlockStrategy(num_clients=2, local_steps=1, client_optimizer=client_optimizer))
    assert len(made) == 3 * 2  # one per client per round
    assert all(len(o.param_groups[0]["params"]) == 2 for o in made)  # one block: a Linear's weight and bias


class ManualModule(ToyModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


def test_manual_optimization_is_refused():
    with pytest.raises(MisconfigurationException, match="automatic optimization"):
        fit(ManualModule())


def test_training_stopped_inside_a_round_still_flushes():
    module, trainer = fit(max_steps=5)  # 3 clients × 2 steps per round: stops in round 0's last client
    assert trainer.strategy.federation.pending_rounds() == []
    callback = trainer.callbacks[0]
    assert callback.records[-1].flush


class ValidatingModule(ToyModule):
    def validation_step(self, batch, batch_idx):
        self.seen = {n: p.detach().clone() for n, p in self.named_parameters()}


def test_validation_sees_the_global_model_not_a_client_view():
    module = ValidatingModule()
    strategy = FederatedBlockStrategy(num_clients=3, local_steps=2)
    recorder = GlobalAtRoundEnd()
    trainer = quiet_trainer(strategy=strategy, callbacks=[ParaBlockCallback(staleness=1), recorder], max_epochs=3)
    trainer.fit(module, toy_loader(toy_dataset()), toy_loader(toy_dataset(n=8)))
    # the boundary comes first: validation at a round's end sees that round's global model
    assert all(torch.equal(module.seen[n], p) for n, p in recorder.globals[2].items())


class GlobalAtRoundEnd(Callback):
    def __init__(self):
        self.globals = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.globals.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


class SleepyModule(ToyModule):
    """Compute that takes a known time without contending for the CPU with the comm thread."""

    def training_step(self, batch, batch_idx):
        import time

        time.sleep(0.05)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("staleness", [0, 1])
def test_exposed_wait_is_what_compute_does_not_hide(staleness):
    # 2 clients × 2 steps × 50 ms = 0.2 s of compute per round; the link costs 2 × 150 ms = 0.3 s.
    link = SimulatedLink(bandwidth="1GB/s", latency="150ms")
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=2)
    callback = ParaBlockCallback(staleness=staleness, link=link)
    fit(SleepyModule(), strategy, [callback], max_epochs=4)
    rounds = [r for r in callback.records if not r.flush and r.exchanged_round is not None]
    waits = [r.exposed_wait_seconds for r in rounds]
    assert all(r.link_seconds == pytest.approx(0.3, abs=0.01) for r in rounds)
    if staleness == 0:  # FedBCD: the whole exchange comes after compute
        assert min(waits) >= 0.29
    else:  # ParaBlock: compute hides 0.2 s of the 0.3 s
        assert max(waits) <= 0.2


@pytest.mark.parametrize("setting", [dict(limit_train_batches=1), dict(val_check_interval=1)])
def test_integer_one_which_means_one_batch_is_refused(setting):
    with pytest.raises(MisconfigurationException, match=f"`{next(iter(setting))}=1`"):
        fit(**setting)


def test_changing_accumulation_during_training_is_refused():
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    callbacks = [ParaBlockCallback(), GradientAccumulationScheduler({2: 2})]
    with pytest.raises(MisconfigurationException, match="`accumulate_grad_batches` changed to 2 .*round 2"):
        fit(callbacks=callbacks, max_epochs=4)


def test_double_precision_is_refused_rather_than_silently_dropped_to_fp32():
    with pytest.raises(MisconfigurationException, match="precision='64-true'.*fp32"):
        fit(precision="64-true")


class FrozenBiases(ToyModule):
    def __init__(self):
        super().__init__()
        for name, param in self.named_parameters():
            param.requires_grad_(not name.endswith("bias"))


def test_parameters_the_user_froze_stay_frozen_and_flags_come_back():
    module = FrozenBiases()
    biases = {n: p.detach().clone() for n, p in module.named_parameters() if n.endswith("bias")}
    fit(module, max_epochs=4)
    assert all(torch.equal(p, biases[n]) for n, p in module.named_parameters() if n.endswith("bias"))
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        n for n, _ in module.named_parameters() if not n.endswith("bias")
    }


class FrozenLayer(ToyModule):
    def __init__(self):
        super().__init__()
        self.net.layers[1].requires_grad_(False)


def test_a_block_with_nothing_trainable_is_refused():
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=1, schedule="sequential")
    with pytest.raises(ValueError, match="Block 'layers1' has no trainable parameter"):
        fit(FrozenLayer(), strategy, max_epochs=3)


def test_validation_and_checkpoints_after_the_boundary_see_the_same_model(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = ValidatingModule()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=3, local_steps=2),
        callbacks=[ParaBlockCallback(staleness=1), checkpoint],
        max_epochs=2,
        check_val_every_n_epoch=2,
        enable_checkpointing=True,
    )
    trainer.fit(module, toy_loader(toy_dataset()), toy_loader(toy_dataset(n=8)))
    saved = torch.load(tmp_path / "epoch=1-step=12.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(module.seen[n], saved[n]) for n in module.seen)


def test_offloaded_deltas_live_on_the_host_and_change_nothing():
    class Probe(Callback):
        devices = set()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.devices |= {t.device.type for c in trainer.strategy.federation.clients.values() for d in c.pending.values() for t in d.tensors.values()}

    plain, _ = fit(ToyModule(), FederatedBlockStrategy(num_clients=3, local_steps=2), max_epochs=3)
    probe = Probe()
    offloaded, _ = fit(
        ToyModule(), FederatedBlockStrategy(num_clients=3, local_steps=2, offload_deltas=True),
        [ParaBlockCallback(), probe], max_epochs=3,
    )  # fmt: skip
    assert probe.devices == {"cpu"}
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), offloaded.parameters()))
