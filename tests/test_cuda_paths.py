"""The CUDA and NCCL paths, shown on CPU where the mechanism allows: fakes stand in for ``torch.cuda`` and NCCL.

What cannot be shown without a device (copies exact on a busy GPU, a real NCCL run) is in
``test_cuda_overlap.py`` and ``benchmarks/gpu_check.sh``, which skip without CUDA.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_parablock import FederatedBlockStrategy, SimulatedLink
from lightning_parablock.aggregation import MeanAggregator
from lightning_parablock.comm import distributed as distributed_module
from lightning_parablock.comm.by_processes import ByProcesses
from lightning_parablock.comm.distributed import GROUP_TIMEOUT_MARGIN_S
from lightning_parablock.comm.in_memory import InMemoryTransport
from lightning_parablock.comm.transport import ExchangeContext, RoundUploads
from lightning_parablock.comm.worker import CommWorker
from lightning_parablock.core import device_copies, turn_timer
from lightning_parablock.core.blocks import partition_by_patterns
from lightning_parablock.core.clients import BlockDelta, VirtualClient
from lightning_parablock.core.federation import Federation
from lightning_parablock.core.planning import RoundPlan
from lightning_parablock.core.schedule import BlockSchedule
from lightning_parablock.strategies import federation_checkpoint
from lightning_parablock.strategies.client_exchange import ClientExchange
from lightning_parablock.strategies.exchange_spec import ExchangeSpec
from lightning_parablock.strategies.federation_checkpoint import FederationCheckpoint
from lightning_parablock.strategies.turns import RoundState, Turns

GPU_1 = torch.device("cuda", 1)


@pytest.fixture
def nccl_default_group(one_rank_group, monkeypatch):
    """The default group reports NCCL (as on GPUs); every new group is recorded, and is the gloo world."""
    created: list[dict] = []

    def new_group(*args, **kwargs):
        created.append(kwargs)
        return dist.group.WORLD

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "new_group", new_group)
    return created


def two_layer_federation(offload: bool = False, device: str = "cpu") -> Federation:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).to(device)
    federation = Federation(
        model, partition_by_patterns(model, [r"^0\.", r"^1\."]), global_lr=1.0, optimizer_state="reset",
        offload_deltas=offload, new_optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )  # fmt: skip
    federation.host([VirtualClient(0, [0]), VirtualClient(1, [1])])
    return federation


# ----------------------------------------------------------------- 1, 4: the exchange's group


def exchange_context(layout, device: torch.device) -> ExchangeContext:
    return ExchangeContext(MeanAggregator(), SimulatedLink(), 30.0, [0], 0, 2, layout, device)


def test_under_nccl_the_exchange_runs_over_a_gloo_group_on_host_copies(nccl_default_group):
    layout = lambda block: [("w", torch.Size([3]))]  # noqa: E731
    transport = ByProcesses().build(exchange_context(layout, GPU_1))
    assert [group["backend"] for group in nccl_default_group] == ["gloo"]  # never a CUDA stream: no NCCL
    assert transport.pin_memory  # the sum comes back pinned, for a non-blocking upload to the GPU


def test_the_exchange_groups_timeout_leaves_the_librarys_own_error_first(nccl_default_group):
    layout = lambda block: [("w", torch.Size([3]))]  # noqa: E731
    transport = ByProcesses().build(exchange_context(layout, torch.device("cpu")))
    assert nccl_default_group[0]["timeout"] == timedelta(seconds=30.0 + GROUP_TIMEOUT_MARGIN_S)
    assert transport.timeout == timedelta(seconds=30.0)  # what the transport waits before naming the rank
    assert GROUP_TIMEOUT_MARGIN_S > 0


def pin_requests(monkeypatch) -> list[bool]:
    """Every ``torch.empty`` call's ``pin_memory`` (a sum is made in memory it then overwrites), which a CPU build
    cannot honour: recorded, then left out."""
    requests = []
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        requests.append(pin_memory)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    return requests


def test_the_weighted_sum_is_allocated_pinned_when_the_model_is_on_a_gpu(one_rank_group, monkeypatch):
    pinned_requests = pin_requests(monkeypatch)
    layout = lambda block: [("w", torch.Size([3]))]  # noqa: E731
    transport = distributed_module.CollectiveTransport(
        dist.group.WORLD, MeanAggregator(), SimulatedLink(), [0], layout, 30.0, pin_memory=True
    )
    result = transport.exchange(RoundUploads(0, 0, {0: {"w": torch.ones(3)}}, {0: 1.0}), threading.Event())
    assert torch.equal(result.aggregate["w"], torch.ones(3))
    assert pinned_requests[-1] is True  # the sum; the status row is tiny and stays pageable


def test_a_shared_memory_sum_is_copied_to_pinned_memory_and_the_shared_set_handed_back(one_rank_group, monkeypatch):
    # On a GPU host the boundary uploads the aggregate without blocking only from pinned memory: the shared sum's
    # tensors are gathered into one pinned vector and the shared set is free at once for the next round.
    pinned_requests = pin_requests(monkeypatch)
    layout = [("a", torch.Size([2, 3])), ("b", torch.Size([4]))]
    transport = distributed_module.CollectiveTransport(
        dist.group.WORLD, MeanAggregator(), SimulatedLink(), [0, 0], lambda block: layout, 30.0, pin_memory=True
    )
    shared_tensors = [torch.arange(6.0), torch.arange(4.0) + 10, torch.tensor([0.0, 1.0])]  # the flags come last
    handed_back = []
    total, flags, release = transport._settled(layout, shared_tensors, lambda: handed_back.append(True))
    assert pinned_requests == [True] and handed_back == [True]
    assert torch.equal(total["a"], torch.arange(6.0).view(2, 3)) and torch.equal(total["b"], torch.arange(4.0) + 10)
    assert torch.equal(flags, torch.tensor([0.0, 1.0]))
    assert total["a"].untyped_storage().data_ptr() == flags.untyped_storage().data_ptr()  # one pinned vector
    release()
    assert handed_back == [True]  # pinned memory is torch's cache's to reuse, not the shared set's


def test_in_memory_the_sum_is_pinned_when_the_deltas_are(monkeypatch):
    # Deltas staged from a GPU are in pinned host memory: the in-memory sum is pinned too (torch caches pinned
    # buffers, so no new pages each round, and the boundary's upload does not block the host).
    pinned_requests = pin_requests(monkeypatch)
    transport = InMemoryTransport(MeanAggregator(), SimulatedLink())
    uploads = RoundUploads(0, 0, {0: {"w": torch.ones(3)}, 1: {"w": torch.ones(3)}}, {0: 1.0, 1: 1.0})
    transport.exchange(uploads, threading.Event())
    assert pinned_requests == [False]  # pageable deltas, a pageable sum
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)
    result = transport.exchange(uploads, threading.Event())
    assert pinned_requests == [False, True]
    assert torch.equal(result.aggregate["w"], torch.ones(3))


# ----------------------------------------------------------------- 6: the comm thread's device


def test_the_comm_thread_makes_the_training_gpu_its_current_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append((threading.current_thread().name, device)))
    worker = CommWorker(InMemoryTransport(MeanAggregator(), SimulatedLink()), 10.0, device=GPU_1)
    try:
        worker.submit(RoundUploads(0, 0, {0: {"w": torch.ones(2)}}, {0: 1.0}))
        worker.wait(0)
    finally:
        worker.shutdown()
    assert calls == [("parablock-comm", GPU_1)]


def test_one_process_gives_its_comm_thread_the_training_device():
    strategy = FederatedBlockStrategy(num_clients=2, device="cuda:1")
    assert strategy.root_device == GPU_1
    plan = RoundPlan(2, 2, 0, BlockSchedule("sequential", 2, 0), [0, 0], world_size=1, rank=0)
    exchange = ClientExchange(None, plan, ExchangeSpec(), 1.0, strategy.root_device)
    exchange.open(member=0, members=1)
    assert exchange._worker.device == GPU_1


# ----------------------------------------------------------------- 8: smaller points


def test_cuda_without_an_index_means_the_first_gpu():
    assert FederatedBlockStrategy(num_clients=2, device="cuda").root_device == torch.device("cuda", 0)
    assert FederatedBlockStrategy(num_clients=2, device="cpu").root_device == torch.device("cpu")


class FakeEvent:
    created: list[dict] = []

    def __init__(self, **kwargs) -> None:
        FakeEvent.created.append(kwargs)

    def record(self, stream=None) -> None:
        pass


def test_turn_timing_events_sleep_instead_of_spinning_a_core(monkeypatch):
    FakeEvent.created = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    timer = turn_timer.TurnTimer(torch.device("cuda", 0))
    timer.start()
    timer.stop(0)
    assert FakeEvent.created == [{"enable_timing": True, "blocking": True}] * 2
    assert device_copies.cuda_event() is not None and FakeEvent.created[-1] == {"enable_timing": False, "blocking": True}


class ToCalls(TorchFunctionMode):
    """Every ``Tensor.to`` call's ``non_blocking`` flag, for the tensors in ``watched``."""

    def __init__(self, watched: list[torch.Tensor]) -> None:
        super().__init__()
        self.watched = {id(t) for t in watched}
        self.non_blocking: list[bool] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and id(args[0]) in self.watched:
            self.non_blocking.append(bool(kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


def test_a_turn_uploads_its_clients_pending_deltas_without_blocking_the_host():
    federation = two_layer_federation(offload=True)
    pending = {n: torch.full_like(p, 1e-2) for n, p in federation.model.named_parameters() if n.startswith("1.")}
    federation.unaggregated[0] = 1
    federation.clients[0].pending[0] = BlockDelta(0, 1, pending)
    with ToCalls(list(pending.values())) as calls:
        federation.start_turn(0, round_index=1, block=0)
    federation.end_turn()
    assert calls.non_blocking and all(calls.non_blocking)


def test_the_aggregate_is_uploaded_without_blocking_the_host():
    federation = two_layer_federation()
    federation.unaggregated[0] = 1
    aggregate = {n: torch.full_like(p, 1e-2) for n, p in federation.model.named_parameters() if n.startswith("1.")}
    with ToCalls(list(aggregate.values())) as calls:
        federation.apply_aggregate(0, aggregate)
    assert calls.non_blocking == [True, True]


# ----------------------------------------------------------------- 3: checkpoints


class OnGpu1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (what a CPU build can offer); ``.cpu()`` gives a plain one."""

    @property
    def device(self) -> torch.device:
        return GPU_1

    def cpu(self, *args, **kwargs) -> torch.Tensor:
        return torch.Tensor(self.as_subclass(torch.Tensor)).clone()


def test_checkpoint_state_reaches_the_gather_on_the_host(monkeypatch, nccl_default_group):
    federation = two_layer_federation()
    on_gpu = torch.ones(4, 4).as_subclass(OnGpu1)
    federation.unaggregated[0] = 0
    federation.clients[1].pending[0] = BlockDelta(0, 0, {"0.weight": on_gpu})
    gathered = []

    def gather_object(obj, object_gather_list=None, dst=0, group=None):
        gathered.append((obj, group))
        object_gather_list[0] = obj
        object_gather_list[1] = {"pending": {}, "optimizers": {}, "residuals": {}}

    monkeypatch.setattr(dist, "gather_object", gather_object)
    checkpoint = FederationCheckpoint()
    checkpoint.setup(distributed=True)
    assert nccl_default_group[-1]["backend"] == "gloo"  # the object gather never stages on a GPU
    schedule = type("Schedule", (), {"state_dict": lambda self: {}})()
    exchange = ClientExchange(federation, None, ExchangeSpec(), 1.0, torch.device("cpu"))
    entry = checkpoint.entry(federation, exchange, federation.partition, schedule, [0, 1], world_size=2, settings={})
    sent, group = gathered[0]
    tensor = sent["pending"][1][0]["tensors"]["0.weight"]
    assert type(tensor) is torch.Tensor and tensor.device.type == "cpu" and group is dist.group.WORLD
    assert torch.equal(entry["pending"][1][0]["tensors"]["0.weight"], torch.ones(4, 4))
    assert federation_checkpoint._to_host(on_gpu).device.type == "cpu"


@pytest.mark.parametrize("offload, home", [(False, "meta"), (True, "cpu")])
def test_restored_deltas_land_on_the_models_device_or_the_host_when_offloaded(offload, home):
    federation = two_layer_federation(offload=offload, device="meta")  # "meta": a device that is not the host
    saved = {
        "version": 3,
        "unaggregated": {0: 1},
        "pending": {0: {0: {"block": 1, "tensors": {"1.weight": torch.ones(4, 4, dtype=torch.float64)}}}},
        "residuals": {0: {"1.weight": torch.zeros(4, 4)}},
        "optimizers": {},
    }
    federation.load_state_dict(saved)
    exchange = ClientExchange(federation, None, ExchangeSpec(), 1.0, torch.device("cpu"))
    exchange.load_state_dict(saved)
    restored = federation.clients[0].pending[0].tensors["1.weight"]
    assert restored.device.type == home and restored.dtype == torch.float32
    assert exchange.residuals[0]["1.weight"].device.type == home


# ----------------------------------------------------------------- 5: idle turns


def test_an_idle_turn_lives_on_the_training_device():
    turns = Turns(two_layer_federation(), torch.device("meta"), plan=None, trainable=set())  # no rounds
    assert all(p.device.type == "meta" for group in turns.idle_optimizer.param_groups for p in group["params"])


def test_an_idle_step_under_a_grad_scaler_gives_a_zero_gradient_and_leaves_the_model_alone():
    # 16-mixed steps through GradScaler, which raises "No inf checks were recorded" for an optimizer
    # whose parameters have no gradient.
    federation = two_layer_federation()
    before = {n: p.detach().clone() for n, p in federation.model.named_parameters()}
    turns = Turns(federation, torch.device("cpu"), plan=None, trainable=set())
    turns.current = RoundState(0, 0, participants=[], turns=[None])  # a round in which this rank only waits
    optimizer = turns.start_turn(0)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(turns.idle_loss()).backward()
    scaler.step(optimizer)
    scaler.update()
    turns.end_turn()
    (idle,) = optimizer.param_groups[0]["params"]
    assert idle.grad is not None and torch.equal(idle.grad, torch.zeros_like(idle))
    assert all(torch.equal(p, before[n]) for n, p in federation.model.named_parameters())
    assert all(p.grad is None for p in federation.model.parameters())
