"""Overlap on a device: turn timing without a synchronize per turn, side-stream copies, profiler ranges.

The CUDA tests never ran where this was written (no GPU); they skip without one.
"""

import pytest
import torch
from helpers import quiet_trainer
from torch.profiler import ProfilerActivity, profile
from toy import ToyModule, toy_dataset, toy_loader

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback, SimulatedLink
from lightning_parablock.core.device_copies import COPY_RANGE, EXCHANGE_RANGE, HostCopier
from lightning_parablock.core.turn_timer import COMPUTE_RANGE, TurnTimer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def fit(accelerator="cpu", **strategy_kwargs):
    module = ToyModule()
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=2, **strategy_kwargs)
    callback = ParaBlockCallback(staleness=1, link=SimulatedLink(latency="1ms"))
    trainer = quiet_trainer(strategy=strategy, callbacks=[callback], max_epochs=3, accelerator=accelerator, devices=1)
    trainer.fit(module, toy_loader(toy_dataset()))
    return module, callback


def test_a_trace_names_compute_copy_and_exchange():
    # the exchange runs on the communication thread: the profiler has to follow every thread
    every_thread = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    with profile(activities=[ProfilerActivity.CPU], experimental_config=every_thread) as trace:
        fit()
    names = {event.name for event in trace.events()}
    assert {COMPUTE_RANGE, COPY_RANGE, EXCHANGE_RANGE} <= names
    computes = [e for e in trace.events() if e.name == COMPUTE_RANGE]
    assert len(computes) == 3 * 2  # one range per client turn


def test_turn_timer_on_cpu_measures_each_turn_once():
    timer = TurnTimer(torch.device("cpu"))
    timer.start()
    timer.stop(4)
    timer.start()
    timer.stop(None)  # an idle turn
    seconds = timer.resolve()
    assert list(seconds) == [4] and seconds[4] >= 0
    assert timer.resolve() == {}


def test_copy_to_host_leaves_host_tensors_alone():
    tensors = {"w": torch.ones(3)}
    copies, event = HostCopier().copy(tensors)
    assert event is None and copies["w"] is tensors["w"]


@cuda
def test_copy_to_host_lands_in_pinned_memory_after_its_event():
    source = {"w": torch.arange(1 << 20, device="cuda", dtype=torch.float32)}
    copies, event = HostCopier().copy(source)
    event.synchronize()
    assert copies["w"].is_pinned() and torch.equal(copies["w"], source["w"].cpu())


@cuda
def test_gpu_run_times_turns_by_events_and_offloads_to_pinned_memory(monkeypatch):
    synchronized = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: synchronized.append(a))
    module, callback = fit(accelerator="gpu", offload_deltas=True)
    assert synchronized == []  # no device-wide synchronize on the hot path
    rounds = [r for r in callback.records if not r.flush]
    assert all(set(r.compute_seconds) == set(r.participants) and min(r.compute_seconds.values()) > 0 for r in rounds)


@cuda
def test_side_stream_copies_are_exact_while_the_compute_stream_is_busy_and_freed_memory_is_reused():
    busy = torch.randn(4096, 4096, device="cuda")
    source = {"w": torch.randn(1 << 22, device="cuda")}
    expected = source["w"].cpu()
    for _ in range(20):  # queue work on the compute stream before and after the copy starts
        busy = busy @ busy / busy.norm()
    copies, event = HostCopier().copy(source)
    address = source["w"].data_ptr()
    del source
    reused = torch.zeros(1 << 22, device="cuda")  # may take the freed block only once the copy is done
    for _ in range(20):
        busy = busy @ busy / busy.norm()
    event.synchronize()
    assert copies["w"].is_pinned() and torch.equal(copies["w"], expected)
    assert reused.data_ptr() != address or event.query()


@cuda
def test_the_exchange_never_runs_on_the_compute_stream():
    device = torch.device("cuda", torch.cuda.current_device())
    assert HostCopier().side_stream(device) != torch.cuda.current_stream(device)


@cuda
def test_offloaded_deltas_are_pinned_and_bit_identical_to_deltas_kept_on_the_gpu():
    on_gpu, _ = fit(accelerator="gpu", offload_deltas=False)
    offloaded, _ = fit(accelerator="gpu", offload_deltas=True)
    for (name, a), (_, b) in zip(on_gpu.named_parameters(), offloaded.named_parameters()):
        assert torch.equal(a, b), name


@cuda
def test_bf16_true_on_the_gpu_trains_through_fp32_masters_on_the_device_and_no_half_gradients():
    from lightning import Callback

    seen = []

    class Inspect(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            masters = [p for group in optimizer.param_groups for p in group["params"]]
            seen.append(all(p.dtype == torch.float32 and p.is_cuda and p.grad is not None for p in masters))
            seen.append(all(p.grad is None for p in pl_module.parameters() if p.dtype == torch.bfloat16))

    module = ToyModule(optimizer="adamw")
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=2)
    trainer = quiet_trainer(
        strategy=strategy, callbacks=[ParaBlockCallback(), Inspect()], max_epochs=3, accelerator="gpu", devices=1,
        precision="bf16-true",
    )  # fmt: skip
    trainer.fit(module, toy_loader(toy_dataset()))
    assert seen and all(seen)


@cuda
def test_the_comm_thread_exchanges_on_a_gpu_run_under_a_bf16_default_dtype_without_touching_gpu_0():
    from lightning_parablock.comm.worker import CommWorker

    device = torch.device("cuda", torch.cuda.device_count() - 1)
    worker = CommWorker(SimulatedLink(), 60.0, device=device)
    delta = {"w": torch.randn(65537, device=device)}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        worker.submit(0, 0, {0: delta, 1: delta}, {0: 262147.0, 1: 1.0})
        result = worker.wait(0)
    finally:
        torch.set_default_dtype(previous)
        worker.shutdown()
    assert result.upload_bytes == {0: 4 * 65537, 1: 4 * 65537}
    assert torch.equal(result.aggregate["w"], delta["w"].cpu())


@cuda
def test_a_gpu_run_resumed_from_a_round_boundary_is_bit_identical(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(rounds, ckpt_path=None, save=False):
        module = ToyModule(optimizer="adamw")
        strategy = FederatedBlockStrategy(num_clients=2, local_steps=2, offload_deltas=True)
        callbacks = [ParaBlockCallback(staleness=1, link=SimulatedLink(latency="1ms"))]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1))
        trainer = quiet_trainer(
            strategy=strategy, callbacks=callbacks, max_epochs=rounds, accelerator="gpu", devices=1,
            enable_checkpointing=save,
        )  # fmt: skip
        trainer.fit(module, toy_loader(toy_dataset()), ckpt_path=ckpt_path)
        return module

    straight = run(4, save=True)
    resumed = run(4, ckpt_path=str(tmp_path / "epoch=1-step=8.ckpt"))
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
