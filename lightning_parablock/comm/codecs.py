"""What a client's delta looks like on the wire: fp32, bf16, int8 with scales, or top-k with error feedback.

A codec turns one fp32 tensor into a payload of smaller tensors and back into fp32; the bytes a client
sends are the payload's bytes, scales and indices included. Only the upload is encoded: the server
decodes every delta to fp32 before aggregating (a rule that sums reads an fp32 or bf16 payload as it is, into an
fp32 sum), and the aggregate it returns is fp32.

Top-k sends the largest entries of Δ^i plus what earlier rounds left unsent (error feedback): the
residual is the client's own state, kept per parameter by the client exchange
(:mod:`~lightning_parablock.strategies.client_exchange`) and checkpointed with the federation, so over rounds
everything a client trained reaches the server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Literal, Union, get_args

import torch
from torch import Tensor

from lightning_parablock.argument_checks import check_choice, check_float, check_int
from lightning_parablock.core.sizes import nbytes_of


_READ_EXACTLY_INTO_FP32 = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes that an fp32 sum adds as their fp32 values (a float64 delta would be added in float64, then rounded)."""


@dataclass
class EncodedTensor:
    """One tensor as sent: ``payload`` decodes with ``codec`` to fp32 of ``shape``."""

    codec: "Codec"
    shape: torch.Size
    payload: dict[str, Tensor]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.payload)

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "EncodedTensor":
        """On ``device``; payloads already there are shared, not copied (nothing writes to a sent delta)."""
        payload = {k: v.to(device, non_blocking=non_blocking) for k, v in self.payload.items()}
        return EncodedTensor(self.codec, self.shape, payload)

    def decode(self) -> Tensor:
        return self.codec.decode(self)

    def summand(self) -> Tensor:
        """The values as a sum reads them (:meth:`Codec.summand`)."""
        return self.codec.summand(self)


EncodedDelta = dict[str, EncodedTensor]


class Codec:
    """Encodes fp32 tensors for the upload; ``error_feedback`` codecs keep what they did not send."""

    name = "none"
    error_feedback = False

    def encode(self, tensor: Tensor) -> EncodedTensor:
        return EncodedTensor(self, tensor.shape, {"values": tensor.detach()})

    def decode(self, encoded: EncodedTensor) -> Tensor:
        return encoded.payload["values"].float()

    def summand(self, encoded: EncodedTensor) -> Tensor:
        """The values for a rule that adds them into an fp32 sum: the payload itself where decoding is only a cast
        to fp32 (fp32, bf16: adding a bf16 tensor into fp32 reads it exactly, with no fp32 copy of the delta in
        new memory), else the decoded tensor."""
        if type(self).decode is Codec.decode and encoded.payload["values"].dtype in _READ_EXACTLY_INTO_FP32:
            return encoded.payload["values"]
        return self.decode(encoded)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        """The same encoding (its ``repr`` names every setting)."""
        return type(other) is type(self) and repr(other) == repr(self)

    def __hash__(self) -> int:
        return hash(repr(self))


class BF16Codec(Codec):
    """Rounds to bf16: half the bytes, about 3 significant digits."""

    name = "bf16"

    def encode(self, tensor: Tensor) -> EncodedTensor:
        return EncodedTensor(self, tensor.shape, {"values": tensor.detach().to(torch.bfloat16)})


Int8Granularity = Literal["row", "block"]


class Int8Codec(Codec):
    """Symmetric int8 with one fp32 scale per row (first dimension) or per ``block_size`` consecutive values.

    Each value is off by at most half its scale, i.e. ``max|row or block| / 254``.
    """

    name = "int8"

    def __init__(self, granularity: Int8Granularity = "row", block_size: int = 256) -> None:
        self.granularity = check_choice("granularity", granularity, get_args(Int8Granularity))
        self.block_size = check_int("block_size", block_size, minimum=1)

    def _groups(self, tensor: Tensor) -> Tensor:
        flat = tensor.detach().float().reshape(-1)
        if self.granularity == "row":
            rows = tensor.shape[0] if tensor.dim() > 1 else 1
            return flat.reshape(rows, -1)
        padded = torch.nn.functional.pad(flat, (0, -flat.numel() % self.block_size))
        return padded.reshape(-1, self.block_size)

    def encode(self, tensor: Tensor) -> EncodedTensor:
        groups = self._groups(tensor)
        scale = groups.abs().amax(dim=1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        quantized = torch.round(groups / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return EncodedTensor(self, tensor.shape, {"q": quantized, "scale": scale})

    def decode(self, encoded: EncodedTensor) -> Tensor:
        values = encoded.payload["q"].float() * encoded.payload["scale"][:, None]
        return values.reshape(-1)[: encoded.shape.numel()].reshape(encoded.shape)

    def __repr__(self) -> str:
        return f"Int8Codec(granularity={self.granularity!r}, block_size={self.block_size})"


class TopKCodec(Codec):
    """The ``fraction`` largest-magnitude entries (int32 index + fp32 value each), with error feedback."""

    name = "topk"
    error_feedback = True

    def __init__(self, fraction: float = 0.1) -> None:
        check_float("fraction", fraction, minimum=0.0, maximum=1.0, min_open=True)
        self.fraction = fraction

    def encode(self, tensor: Tensor) -> EncodedTensor:
        flat = tensor.detach().float().reshape(-1)
        k = max(1, math.ceil(self.fraction * flat.numel()))
        indices = flat.abs().topk(k, sorted=False).indices
        return EncodedTensor(self, tensor.shape, {"indices": indices.to(torch.int32), "values": flat[indices]})

    def decode(self, encoded: EncodedTensor) -> Tensor:
        values = encoded.payload["values"]
        flat = torch.zeros(encoded.shape.numel(), dtype=torch.float32, device=values.device)
        flat[encoded.payload["indices"].long()] = values.float()
        return flat.reshape(encoded.shape)

    def __repr__(self) -> str:
        return f"TopKCodec(fraction={self.fraction})"


_NAMED = {
    "none": Codec,
    "bf16": BF16Codec,
    "int8": lambda: Int8Codec("row"),
    "int8-block": lambda: Int8Codec("block"),
    "topk": TopKCodec,
}


def make_codec(compression: Union[str, Codec, None]) -> Codec:
    """A codec from a name (``"none"``, ``"bf16"``, ``"int8"``, ``"int8-block"``, ``"topk"``) or itself."""
    if compression is None:
        return Codec()
    if isinstance(compression, Codec):
        return compression
    if compression not in _NAMED:
        raise ValueError(
            f"Unknown compression {compression!r}. Use one of {sorted(_NAMED)}, or a codec such as"
            " `Int8Codec(granularity='block', block_size=64)` or `TopKCodec(fraction=0.01)`."
        )
    return _NAMED[compression]()


def encode_delta(codec: Codec, delta: Mapping[str, Tensor], residual: MutableMapping[str, Tensor]) -> EncodedDelta:
    """Encode one client's delta; with error feedback, send Δ + residual and keep what was not sent."""
    if not codec.error_feedback:
        return {name: codec.encode(tensor) for name, tensor in delta.items()}
    encoded = {}
    for name, tensor in delta.items():
        carried = residual.get(name)
        total = tensor.float() if carried is None else tensor.float() + carried.to(tensor.device)
        encoded[name] = codec.encode(total)
        residual[name] = total - encoded[name].decode()
    return encoded


def as_encoded(delta: Mapping[str, Union[Tensor, EncodedTensor]]) -> EncodedDelta:
    """A delta as sent: raw tensors travel as they are."""
    plain = Codec()
    return {n: t if isinstance(t, EncodedTensor) else plain.encode(t) for n, t in delta.items()}


def decode_delta(delta: Mapping[str, EncodedTensor]) -> dict[str, Tensor]:
    return {name: encoded.decode() for name, encoded in delta.items()}


def summands_of(delta: Mapping[str, EncodedTensor]) -> dict[str, Tensor]:
    """A delta as a rule that sums reads it (:meth:`Codec.summand`): decoded only where decoding is more than a cast."""
    return {name: encoded.summand() for name, encoded in delta.items()}


def encoded_nbytes(delta: Mapping[str, EncodedTensor]) -> int:
    return sum(encoded.nbytes for encoded in delta.values())
