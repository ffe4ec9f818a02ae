"""Half-precision weights: the active block trains through fp32 masters, deltas stay fp32, frozen blocks stay bare."""

import pytest
import torch
from helpers import quiet_trainer
from lightning import Callback
from torch import nn
from toy import ToyModule, toy_dataset, toy_loader, toy_loss

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback
from lightning_parablock.core.blocks import partition_by_patterns
from lightning_parablock.core.clients import VirtualClient
from lightning_parablock.core.federation import Federation
from lightning_parablock.core.master_weights import rebind


def fit(precision, module=None, rounds=6, **strategy_kwargs):
    module = module if module is not None else ToyModule(optimizer="adamw", lr=0.02)
    strategy = FederatedBlockStrategy(num_clients=3, local_steps=3, schedule="sequential", **strategy_kwargs)
    callback = ParaBlockCallback(staleness=1)
    trainer = quiet_trainer(strategy=strategy, callbacks=[callback], max_epochs=rounds, precision=precision)
    trainer.fit(module, toy_loader(toy_dataset()))
    return module, callback


def full_loss(module):
    x, y = toy_dataset().tensors
    with torch.no_grad():
        return toy_loss(module.float(), (x, y)).item()


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_weights_with_master_copies_track_the_fp32_run(precision):
    reference, reference_cb = fit("32-true")
    half, half_cb = fit(precision)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16 if precision == "bf16-true" else torch.float16}
    start = full_loss(ToyModule())
    assert full_loss(half) < 0.7 * start
    assert abs(full_loss(half) - full_loss(reference)) < 0.05 * start
    for ours, theirs in zip(half_cb.records, reference_cb.records):
        assert ours.client_loss.keys() == theirs.client_loss.keys()
        assert all(abs(ours.client_loss[c] - theirs.client_loss[c]) < 0.05 * start for c in ours.client_loss)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_full_precision_weights_take_no_master_copy(precision):
    class NoMasters(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert trainer.strategy.federation._turn.master is None

    module = ToyModule()
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=1)
    callbacks = [NoMasters(), ParaBlockCallback()]
    trainer = quiet_trainer(strategy=strategy, callbacks=callbacks, max_epochs=2, precision=precision)
    trainer.fit(module, toy_loader(toy_dataset()))
    assert all(p.dtype == torch.float32 for p in module.parameters())


class OneWeight(ToyModule):
    """A loss whose gradient is exactly 1 on one bf16 weight of 1.0: SGD(lr) moves it by lr per step."""

    def training_step(self, batch, batch_idx):
        untouched = sum(p.float().sum() for p in self.parameters()) * 0
        return untouched + self.net.layers[0][0].bias.float().sum()

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def _steps_below_resolution(master_weights):
    module = OneWeight()
    with torch.no_grad():
        module.net.layers[0][0].bias.fill_(1.0)  # bf16 spacing at 1.0 is 2^-7: a step of 1e-3 rounds away
    strategy = FederatedBlockStrategy(
        num_clients=1, local_steps=8, block_patterns=[r"layers\.0\.", r"layers\.1\."], schedule="sequential",
        master_weights=master_weights,
    )  # fmt: skip
    callbacks = [ParaBlockCallback(staleness=0)]
    trainer = quiet_trainer(strategy=strategy, callbacks=callbacks, max_epochs=1, precision="bf16-true")
    trainer.fit(module, toy_loader(toy_dataset(n=32)))
    return module.net.layers[0][0].bias.detach().float()


def test_a_step_below_bf16_resolution_vanishes_without_the_master_copy_and_survives_with_it():
    assert torch.equal(_steps_below_resolution(master_weights=False), torch.ones(8))
    # 8 steps of 1e-3 in fp32 make a delta of 0.008, above half the spacing: the global bias moves one bf16 step down
    moved = _steps_below_resolution(master_weights=True)
    assert torch.equal(moved, torch.full((8,), 1.0 - 2**-7))


def test_master_delta_is_the_fp32_sum_of_the_steps():
    recorded = []
    module = OneWeight()
    with torch.no_grad():
        module.net.layers[0][0].bias.fill_(1.0)
    strategy = FederatedBlockStrategy(
        num_clients=1, local_steps=8, block_patterns=[r"layers\.0\.", r"layers\.1\."], schedule="sequential"
    )
    callbacks = [ParaBlockCallback(staleness=1)]
    trainer = quiet_trainer(strategy=strategy, callbacks=callbacks, max_epochs=2, precision="bf16-true")

    class Peek(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                recorded.append(trainer.strategy.federation.clients[0].pending[0].tensors["net.layers.0.0.bias"].clone())

    trainer.callbacks.append(Peek())
    trainer.fit(module, toy_loader(toy_dataset(n=32)))
    assert recorded[0].dtype == torch.float32
    torch.testing.assert_close(recorded[0], torch.full((8,), -0.008), rtol=0, atol=1e-6)


class InspectTurn(Callback):
    """After every step: no frozen parameter holds a gradient, the optimizer holds state for the active block only."""

    def __init__(self):
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        strategy = trainer.strategy
        active = set(strategy.partition[strategy.turns.current.block].param_names)
        for name, param in pl_module.named_parameters():
            assert param.grad is None, name  # frozen: never; active bf16 weights: moved to their master
        optimizer = trainer.optimizers[0]
        masters = strategy.federation._turn.master.masters
        state_params = list(optimizer.state)
        assert len(state_params) == len(active)
        assert all(any(p is m for m in masters.values()) for p in state_params)
        for state in optimizer.state.values():
            assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
        self.checked += 1


@pytest.mark.parametrize("optimizer_state", ["reset", "per_block"])
def test_frozen_blocks_never_hold_gradients_or_optimizer_state(optimizer_state):
    inspect = InspectTurn()
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=2, optimizer_state=optimizer_state)
    callbacks = [inspect, ParaBlockCallback()]  # inspect before the round closes
    trainer = quiet_trainer(strategy=strategy, callbacks=callbacks, max_epochs=3, precision="bf16-true")
    module = ToyModule(optimizer="adamw")
    trainer.fit(module, toy_loader(toy_dataset()))
    assert inspect.checked == 3 * 2 * 2
    assert all(p.grad is None for p in module.parameters())
    for optimizer in strategy.federation.kept_optimizers.values():  # kept between turns: fp32, keyed by the weight
        assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())


def test_global_values_come_back_bit_exact_after_a_half_precision_turn():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).to(torch.bfloat16)
    partition = partition_by_patterns(model, [r"^0\.", r"^1\."])
    federation = Federation(
        model, partition, global_lr=1.0, optimizer_state="reset", offload_deltas=False,
        new_optimizer=lambda params: torch.optim.SGD(params, lr=1e-3),
    )  # fmt: skip
    federation.host([VirtualClient(0, [0]), VirtualClient(1, [1])])
    federation.unaggregated[0] = 1
    federation.clients[0].pending[0] = federation.clients[0].pending.get(0) or _delta(0, 1, model, 3e-4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = federation.start_turn(0, round_index=1, block=0)
    loss = model(torch.ones(2, 4, dtype=torch.bfloat16)).float().sum()
    loss.backward()
    optimizer.step()
    federation.end_turn()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert federation.clients[0].pending[1].tensors["0.weight"].dtype == torch.float32


def _delta(round_index, block, model, value):
    from lightning_parablock.core.clients import BlockDelta

    params = {n: p for n, p in model.named_parameters() if n.startswith(f"{block}.")}
    tensors = {n: torch.full_like(p, value, dtype=torch.float32) for n, p in params.items()}
    return BlockDelta(round_index, block, tensors)


def test_master_starts_from_the_exact_view_not_the_rounded_weights():
    model = nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16)
    with torch.no_grad():
        model[0].bias.fill_(1.0)
    partition = partition_by_patterns(model, [r"^0\."])
    federation = Federation(
        model, partition, global_lr=1.0, optimizer_state="reset", offload_deltas=False,
        new_optimizer=lambda params: torch.optim.SGD(params, lr=0.0),
    )  # fmt: skip
    federation.host([VirtualClient(0, [0])])
    federation.unaggregated[0] = 0
    federation.clients[0].pending[0] = _delta(0, 0, model, 1e-3)  # 1.001 is not a bf16 number
    federation.start_turn(0, round_index=1, block=0)
    master = federation._turn.master.masters["0.bias"]
    assert torch.equal(master, torch.full((4,), 1.0 + 1e-3))
    federation.end_turn()
    assert torch.equal(federation.clients[0].pending[1].tensors["0.bias"], torch.zeros(4))


def test_rebind_carries_optimizer_state_between_tensors():
    a = nn.Parameter(torch.ones(2))
    b = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([a], lr=0.1)
    a.grad = torch.ones(2)
    optimizer.step()
    state = optimizer.state[a]
    rebind(optimizer, {a: b})
    assert optimizer.param_groups[0]["params"] == [b] and optimizer.state[b] is state and a not in optimizer.state


def test_kept_optimizer_state_resumes_in_fp32_under_half_weights():
    def federation_of(model):
        federation = Federation(
            model, partition_by_patterns(model, [r"^0\."]), global_lr=1.0, optimizer_state="per_block",
            offload_deltas=False, new_optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        )  # fmt: skip
        federation.host([VirtualClient(0, [0])])
        return federation

    model = nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16)
    federation = federation_of(model)
    optimizer = federation.start_turn(0, round_index=0, block=0)
    model(torch.ones(2, 4, dtype=torch.bfloat16)).float().sum().backward()
    optimizer.step()
    federation.end_turn()
    saved = federation.state_dict()
    moments = [s["exp_avg"].clone() for s in optimizer.state.values()]

    resumed = federation_of(model)
    resumed.load_state_dict(saved)
    optimizer = resumed.start_turn(0, round_index=1, block=0)
    restored = [s["exp_avg"] for s in optimizer.state.values()]
    assert all(r.dtype == torch.float32 and torch.equal(r, m) for r, m in zip(restored, moments, strict=True))
    assert all(any(p is m for m in resumed._turn.master.masters.values()) for p in optimizer.state)


def test_clipping_and_accumulation_act_on_the_fp32_masters():
    seen, clipped = [], []

    def norm(optimizer):
        masters = [p for group in optimizer.param_groups for p in group["params"]]
        assert all(p.dtype == torch.float32 and p.grad is not None for p in masters)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in masters])).item()

    class Norms(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(norm(optimizer))
            if not getattr(optimizer, "_probed", False):
                optimizer.register_step_post_hook(lambda opt, *_: clipped.append(norm(opt)))
                optimizer._probed = True

    module = ToyModule(optimizer="adamw", lr=0.02)
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=2)
    trainer = quiet_trainer(
        strategy=strategy, callbacks=[ParaBlockCallback(), Norms()], max_epochs=3, precision="bf16-true",
        accumulate_grad_batches=2, gradient_clip_val=1e-3,
    )  # fmt: skip
    start = full_loss(ToyModule())
    trainer.fit(module, toy_loader(toy_dataset()))
    assert len(seen) == 3 * 2 * 2 and max(seen) > 1e-3  # before clipping; Lightning clips right after this hook
    assert len(clipped) == len(seen) and max(clipped) <= 1e-3 * (1 + 1e-5)
    assert full_loss(module) < start


def test_bf16_true_keeps_rope_inverse_frequencies_fp32_and_exact(tiny_llama_config):
    from lightning_parablock import CausalLMModule
    from lightning_parablock.data import SyntheticArithmeticDataModule

    config = {**tiny_llama_config, "max_position_embeddings": 4096}
    reference = CausalLMModule(config=config, seed=0)
    reference.configure_model()  # outside a Trainer: fp32
    original = {n: b.clone() for n, b in reference.named_buffers() if n.endswith("inv_freq")}
    module = CausalLMModule(config=config, seed=0)  # built by the Trainer, under bf16-true
    assert original and all(b.dtype == torch.float32 for b in original.values())
    seen = {}

    class AtFirstBatch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.update({n: b.clone() for n, b in pl_module.named_buffers() if n.endswith("inv_freq")})
            seen["weights"] = {p.dtype for p in pl_module.parameters()}

    strategy = FederatedBlockStrategy(num_clients=2, local_steps=1)
    trainer = quiet_trainer(
        strategy=strategy, callbacks=[ParaBlockCallback(), AtFirstBatch()], max_epochs=2, precision="bf16-true"
    )
    trainer.fit(module, datamodule=SyntheticArithmeticDataModule(num_examples=16, val_examples=4, batch_size=4, seed=0))
    assert seen.pop("weights") == {torch.bfloat16}
    for name, value in original.items():
        assert seen[name].dtype == torch.float32 and torch.equal(seen[name], value), name
