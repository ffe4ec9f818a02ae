"""The communication thread under a process-wide half-precision default dtype.

Lightning's ``HalfPrecision.forward_context`` sets the default dtype around every training step, for every
thread; the exchange runs on the communication thread meanwhile. Every tensor it creates must name its dtype:
a byte count of 262148 would read 262144 in bf16 and overflow to inf in fp16.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from lightning_parablock.aggregation import MeanAggregator, MedianAggregator
from lightning_parablock.comm.codecs import make_codec
from lightning_parablock.comm.distributed import CollectiveTransport
from lightning_parablock.comm.in_memory import InMemoryTransport
from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.comm.transport import RoundUploads
from lightning_parablock.comm.worker import CommWorker

NUMEL = 65537  # 262148 bytes in fp32: not a bf16 number, and over fp16's largest (65504)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def deltas() -> dict[int, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return {c: {"w": torch.randn(NUMEL, generator=generator, dtype=torch.float32) * 1e-3} for c in (0, 1)}


def run_on_thread(worker: CommWorker, dtype: torch.dtype, sent: dict, weights: dict[int, float]):
    """Submit under ``dtype`` as the default (the worker thread sees it while it works) and collect."""
    try:
        with default_dtype(dtype):
            worker.submit(RoundUploads(0, 0, sent, weights))
            return worker.wait(0)
    finally:
        worker.shutdown()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("aggregator", [MeanAggregator(), MedianAggregator()], ids=["mean", "median"])
def test_the_collective_exchange_keeps_byte_counts_and_weights_exact_under_a_half_default_dtype(
    one_rank_group, dtype, aggregator
):
    sent = deltas()
    weights = {0: 262147.0, 1: 1.0}  # sample counts that bf16 would round
    layout = lambda block: [("w", torch.Size([NUMEL]))]  # noqa: E731
    worker = CommWorker(CollectiveTransport(dist.group.WORLD, aggregator, SimulatedLink(), [0, 0], layout, 30.0), 30.0)
    result = run_on_thread(worker, dtype, sent, weights)
    expected = aggregator(sent, weights).aggregate["w"]
    assert result.upload_bytes == {0: 4 * NUMEL, 1: 4 * NUMEL}
    assert result.aggregate["w"].dtype == torch.float32
    torch.testing.assert_close(result.aggregate["w"], expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("compression", ["none", "bf16", "int8", "int8-block", "topk"])
def test_the_in_memory_exchange_is_the_same_under_a_half_default_dtype(dtype, compression):
    codec = make_codec(compression)
    encoded = {c: {n: codec.encode(t) for n, t in d.items()} for c, d in deltas().items()}
    weights = {0: 262147.0, 1: 1.0}
    in_memory = lambda: CommWorker(InMemoryTransport(MeanAggregator(), SimulatedLink()), 30.0)  # noqa: E731
    reference = run_on_thread(in_memory(), torch.float32, encoded, weights)
    result = run_on_thread(in_memory(), dtype, encoded, weights)
    assert result.upload_bytes == reference.upload_bytes
    assert result.aggregate["w"].dtype == torch.float32
    assert torch.equal(result.aggregate["w"], reference.aggregate["w"])
