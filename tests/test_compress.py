"""Compressed uploads: round-trip error, bytes counted as sent, error feedback, and exact resume of residuals."""

import math
import threading

import pytest
import torch
from helpers import quiet_trainer
from toy import ToyModule, toy_dataset, toy_loader

from lightning_parablock import (
    BF16Codec,
    FederatedBlockStrategy,
    Int8Codec,
    ParaBlockCallback,
    SimulatedLink,
    TopKCodec,
)
from lightning_parablock.aggregation import MeanAggregator
from lightning_parablock.comm.codecs import Codec, encode_delta, encoded_nbytes, make_codec
from lightning_parablock.comm.in_memory import InMemoryTransport
from lightning_parablock.comm.transport import RoundUploads


def sample(shape=(6, 50), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * torch.logspace(-3, 0, shape[-1])


def test_bf16_round_trip_is_within_bf16_rounding_and_halves_the_bytes():
    x = sample()
    encoded = BF16Codec().encode(x)
    assert encoded.nbytes == x.numel() * 2
    assert ((encoded.decode() - x).abs() <= x.abs() * 2**-8).all()


@pytest.mark.parametrize("granularity, groups", [("row", 6), ("block", math.ceil(300 / 64))])
def test_int8_round_trip_error_is_at_most_half_a_step_of_its_scale(granularity, groups):
    x = sample()
    codec = Int8Codec(granularity, block_size=64)
    encoded = codec.encode(x)
    assert encoded.nbytes == x.numel() * 1 + groups * 4 + (-x.numel() % 64 if granularity == "block" else 0)
    error = (encoded.decode() - x).abs()
    if granularity == "row":
        bound = x.abs().amax(dim=1, keepdim=True) / 254
    else:
        padded = torch.nn.functional.pad(x.reshape(-1), (0, -x.numel() % 64)).reshape(-1, 64)
        bound = (padded.abs().amax(dim=1, keepdim=True) / 254).expand(-1, 64).reshape(-1)[: x.numel()].reshape(x.shape)
    assert (error <= bound * (1 + 1e-6)).all()
    assert encoded.decode().dtype == torch.float32 and encoded.decode().shape == x.shape


def test_int8_keeps_zero_rows_and_one_dimensional_tensors():
    codec = Int8Codec()
    assert torch.equal(codec.encode(torch.zeros(3, 4)).decode(), torch.zeros(3, 4))
    bias = torch.tensor([0.5, -1.0, 0.25])
    assert torch.allclose(codec.encode(bias).decode(), bias, atol=1 / 254)


def test_topk_sends_the_largest_entries_with_their_indices():
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, 0.0, -0.3, 0.05, 0.4, 1.0, 0.0])
    encoded = TopKCodec(fraction=0.3).encode(x)
    assert encoded.nbytes == 3 * (4 + 4)  # int32 index + fp32 value each
    assert torch.equal(encoded.decode(), torch.tensor([0, -5.0, 0, 3.0, 0, 0, 0, 0, 1.0, 0]))


def test_topk_error_feedback_delivers_the_whole_delta_over_rounds():
    codec = TopKCodec(fraction=0.1)
    residual = {}
    deltas = [{"w": sample(seed=s)} for s in range(30)]
    sent = torch.zeros(6, 50)
    for delta in deltas:
        sent += encode_delta(codec, delta, residual)["w"].decode()
    total = sum(d["w"] for d in deltas)
    # what was sent plus what is still held back is exactly what was trained
    torch.testing.assert_close(sent + residual["w"], total, rtol=0, atol=1e-5)
    assert residual["w"].abs().max() < total.abs().max()


def test_unknown_compression_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="Unknown compression 'fp8'.*'int8-block'"):
        ParaBlockCallback(compression="fp8")
    assert isinstance(make_codec(None), Codec) and make_codec("int8-block").granularity == "block"


def test_exchange_counts_the_encoded_bytes_and_aggregates_decoded_fp32():
    codec = Int8Codec()
    deltas = {c: {"w": sample(seed=c), "b": sample((7,), seed=10 + c)} for c in range(3)}
    encoded = {c: encode_delta(codec, d, {}) for c, d in deltas.items()}
    transport = InMemoryTransport(MeanAggregator(), SimulatedLink("1MB/s"))
    result = transport.exchange(RoundUploads(0, 0, encoded, {c: 1.0 for c in deltas}), threading.Event())
    assert result.upload_bytes == {c: encoded_nbytes(e) for c, e in encoded.items()}
    assert result.upload_bytes[0] == 6 * 50 + 6 * 4 + 7 + 4
    expected = sum(e["w"].decode() for e in encoded.values()) / 3
    assert result.aggregate["w"].dtype == torch.float32
    torch.testing.assert_close(result.aggregate["w"], expected)
    assert result.download_bytes == (300 + 7) * 4


def fit(compression, rounds=4, ckpt_path=None, tmp_path=None, staleness=1):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = ToyModule(optimizer="adamw", lr=0.02, num_layers=2)  # two blocks: residuals are sent again soon
    strategy = FederatedBlockStrategy(num_clients=3, local_steps=2, seed=1, schedule="sequential")
    callback = ParaBlockCallback(staleness=staleness, compression=compression)
    callbacks = [callback]
    if tmp_path is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, save_last=True))
    trainer = quiet_trainer(
        strategy=strategy, callbacks=callbacks, max_epochs=rounds, enable_checkpointing=tmp_path is not None
    )
    trainer.fit(module, toy_loader(toy_dataset()), ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    return module, strategy, callback


def test_a_run_with_topk_counts_encoded_bytes_and_keeps_residuals():
    module, strategy, callback = fit("topk")
    plain_block_bytes = [r for r in fit("none")[2].records if r.upload_bytes]
    compressed = [r for r in callback.records if r.upload_bytes]
    assert len(compressed) == len(plain_block_bytes)
    for ours, plain in zip(compressed, plain_block_bytes):
        assert ours.block == plain.block
        # a block of the toy is one 8x8 Linear: 64 + 8 values; 10% → 7 + 1 entries of 8 bytes
        assert all(n < plain.upload_bytes[c] / 4 for c, n in ours.upload_bytes.items())
    assert any(strategy.client_exchange.residuals.values())


def test_residuals_resume_bit_exactly(tmp_path):
    straight, _, _ = fit("topk", rounds=5)
    fit("topk", rounds=3, tmp_path=tmp_path)
    checkpoint = str(tmp_path / "epoch=2-step=18.ckpt")
    saved = torch.load(checkpoint, weights_only=True)["federation"]
    assert saved["version"] == 3 and saved["residuals"]
    resumed, _, _ = fit("topk", rounds=5, ckpt_path=checkpoint, tmp_path=tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Int8Codec("block", block_size=2.5), r"`block_size` must be an integer, got 2.5 \(float\)"),
        (lambda: Int8Codec("block", block_size=True), r"`block_size` must be an integer, got True \(bool\)"),
        (lambda: Int8Codec("block", block_size="64"), r"`block_size` must be an integer, got '64' \(str\)"),
        (lambda: Int8Codec("block", block_size=0), r"`block_size` must be a positive integer, got 0"),
        (lambda: Int8Codec("column"), r"`granularity` must be 'row' or 'block', got 'column'"),
        (lambda: TopKCodec(fraction=True), r"`fraction` must be a number, got True \(bool\)"),
        (lambda: TopKCodec(fraction="0.5"), r"`fraction` must be a number, got '0.5' \(str\)"),
        (lambda: TopKCodec(fraction=0.0), r"`fraction` must be in \(0, 1\], got 0.0"),
        (lambda: TopKCodec(fraction=float("nan")), r"`fraction` must be a finite number, got nan"),
    ],
)
def test_bad_codec_settings_are_refused_naming_them(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()
