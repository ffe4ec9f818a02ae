"""Overlap on a device: turn timing without a synchronize per turn, side-stream copies, profiler ranges.

The CUDA tests never ran where this was written (no GPU); they skip without one.
"""

import pytest
import torch
from helpers import quiet_trainer
from torch.profiler import ProfilerActivity, profile
from toy import ToyModule, toy_dataset, toy_loader

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback, SimulatedLink
from lightning_parablock.core.device_copies import COPY_RANGE, EXCHANGE_RANGE, copy_to_host
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
    copies, event = copy_to_host(tensors)
    assert event is None and copies["w"] is tensors["w"]


@cuda
def test_copy_to_host_lands_in_pinned_memory_after_its_event():
    source = {"w": torch.arange(1 << 20, device="cuda", dtype=torch.float32)}
    copies, event = copy_to_host(source)
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
