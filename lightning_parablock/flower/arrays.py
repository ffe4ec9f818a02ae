"""Tensors on the mailbox wire: a round's uploads and aggregate as named raw arrays, checked on the way in.

An upload array is named ``client/parameter/payload`` (``3/model.layers.0.mlp.up_proj.weight/values``): a client's
delta, tensor by tensor, as its codec encoded it (fp32 values, bf16 values, int8 with scales, or top-k indices and
values), so compressed deltas travel compressed and the bytes counted are the encoded ones. An aggregate array is
named by its parameter and is fp32. Whoever receives arrays (the server from a site, a site from the server)
checks every name, dtype and shape against what the round's block and the codec allow before anything is summed
or applied: a SuperLink can run any app on a site, and a bad shape would broadcast silently in ``add_``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_parablock.comm.codecs import (
    BF16Codec,
    Codec,
    EncodedDelta,
    EncodedTensor,
    Int8Codec,
    TopKCodec,
    make_codec,
)
from lightning_parablock.flower.app.parablock_app.wire import WireArray, WireError

BlockLayout = Sequence[tuple[str, torch.Size]]

TORCH_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "bool": torch.bool,
}  # fmt: skip
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}

PAYLOADS = {
    "none": {"values": "float32"},
    "bf16": {"values": "bfloat16"},
    "int8": {"q": "int8", "scale": "float32"},
    "topk": {"indices": "int32", "values": "float32"},
}
"""The payload each of the library's codecs (by ``Codec.name``) sends per tensor: the only ones a server checks and
decodes."""
_LIBRARY_CODECS = (Codec, BF16Codec, Int8Codec, TopKCodec)


def tensor_to_wire(name: str, tensor: Tensor) -> WireArray:
    """``tensor`` as a wire array (a host copy of its bytes)."""
    host = tensor.detach().to("cpu").contiguous()
    if host.dtype not in DTYPE_NAMES:
        raise WireError(f"tensor {name!r} has dtype {host.dtype}, which the mailbox does not carry")
    data = host.reshape(-1).view(torch.uint8).numpy().tobytes() if host.numel() else b""
    return WireArray(name, DTYPE_NAMES[host.dtype], tuple(host.shape), data)


def wire_to_tensor(array: WireArray) -> Tensor:
    """A host tensor over the array's bytes (no copy when they are writable)."""
    dtype = TORCH_DTYPES[array.dtype]
    if not array.data:
        return torch.empty(array.shape, dtype=dtype)
    buffer = array.data if isinstance(array.data, bytearray) else bytearray(array.data)
    return torch.frombuffer(buffer, dtype=dtype).reshape(array.shape)


# ----------------------------------------------------------------------------------------------- uploads


def codec_on_the_wire(codec: Codec) -> str:
    """The name a server decodes ``codec``'s payloads by; a codec of one's own is refused (the server could not
    check or decode it)."""
    if type(codec) not in _LIBRARY_CODECS or codec.name not in PAYLOADS:
        raise ValueError(
            f"The Flower transport carries the library's codecs only ({sorted(PAYLOADS)}, by"
            f" `ParaBlockCallback(compression=...)`), got {codec!r}: the server must check and decode every payload."
        )
    return codec.name


def uploads_to_wire(deltas: Mapping[int, EncodedDelta]) -> list[WireArray]:
    """Every hosted sender's encoded delta as named arrays, clients in order."""
    return [
        tensor_to_wire(f"{client}/{name}/{key}", payload)
        for client in sorted(deltas)
        for name, encoded in deltas[client].items()
        for key, payload in encoded.payload.items()
    ]


def _check_payload(codec: str, where: str, payload: Mapping[str, WireArray], shape: torch.Size) -> None:
    """The payload's keys, dtypes and shapes are what ``codec`` makes of a tensor of ``shape``."""
    expected = PAYLOADS[codec]
    if set(payload) != set(expected):
        raise WireError(f"{where}: payload {sorted(payload)} is not the {codec} codec's {sorted(expected)}")
    for key, dtype in expected.items():
        if payload[key].dtype != dtype:
            raise WireError(f"{where}: payload {key!r} is {payload[key].dtype}, the {codec} codec sends {dtype}")
    numel = shape.numel()
    dims = {key: list(array.shape) for key, array in payload.items()}
    if codec in ("none", "bf16"):
        ok = dims["values"] == list(shape)
    elif codec == "int8":
        q, scale = dims["q"], dims["scale"]
        ok = len(q) == 2 and scale == q[:1] and numel <= q[0] * q[1] < numel + max(q[1], 1)
    else:
        ok = len(dims["indices"]) == 1 and dims["indices"] == dims["values"] and 1 <= dims["values"][0] <= max(numel, 1)
    if not ok:
        raise WireError(f"{where}: payload shapes {dims} do not encode a tensor of shape {list(shape)} with {codec}")


def uploads_from_wire(
    arrays: Sequence[WireArray], clients: Sequence[int], codec_name: str, layout: BlockLayout, where: str
) -> dict[int, dict[str, Tensor]]:
    """The fp32 deltas of ``clients`` from their encoded arrays, each checked against ``layout`` and the codec.

    Exactly the arrays of ``clients``, ``layout``'s parameters and the codec's payload are accepted; the decode is the
    codec's own, as in the in-memory exchange, so the aggregate is bit-identical to it.
    """
    shapes = dict(layout)
    grouped: dict[int, dict[str, dict[str, WireArray]]] = {client: {} for client in clients}
    for array in arrays:
        client_text, _, rest = array.name.partition("/")
        name, _, key = rest.rpartition("/")
        if not client_text.isdigit() or int(client_text) not in grouped:
            raise WireError(f"{where}: array {array.name!r} is not from one of the clients {sorted(clients)}")
        if name not in shapes:
            raise WireError(f"{where}: array {array.name!r} names no parameter of the round's block")
        grouped[int(client_text)].setdefault(name, {})[key] = array
    codec = make_codec(codec_name)
    deltas: dict[int, dict[str, Tensor]] = {}
    for client, tensors in grouped.items():
        if set(tensors) != set(shapes):
            missing = sorted(set(shapes) - set(tensors))
            raise WireError(f"{where}: client {client} sent no {missing[:3]}{'...' if len(missing) > 3 else ''}")
        delta = {}
        for name, shape in layout:
            label = f"{where}: client {client}'s {name!r}"
            _check_payload(codec_name, label, tensors[name], shape)
            payload = {key: wire_to_tensor(array) for key, array in tensors[name].items()}
            if codec_name == "topk" and payload["indices"].numel():
                low, high = int(payload["indices"].min()), int(payload["indices"].max())
                if low < 0 or high >= shape.numel():
                    raise WireError(f"{label}: top-k indices span {low}..{high}, outside 0..{shape.numel() - 1}")
            delta[name] = EncodedTensor(codec, shape, payload).decode()
        deltas[client] = delta
    return deltas


def encoded_nbytes_on_wire(arrays: Sequence[WireArray], client: int) -> int:
    """The bytes one client's encoded delta takes (what its upload costs)."""
    prefix = f"{client}/"
    return sum(len(array.data) for array in arrays if array.name.startswith(prefix))


# ----------------------------------------------------------------------------------------------- aggregate


def aggregate_to_wire(aggregate: Mapping[str, Tensor]) -> list[WireArray]:
    return [tensor_to_wire(name, tensor.to(torch.float32)) for name, tensor in aggregate.items()]


def aggregate_from_wire(arrays: Sequence[WireArray], layout: BlockLayout, where: str) -> dict[str, Tensor]:
    """The fp32 aggregate of a block, refused unless it is exactly ``layout``'s parameters, in fp32, of their shapes."""
    received = {array.name: array for array in arrays}
    expected = [name for name, _ in layout]
    if list(received) != expected:
        raise WireError(f"{where}: the aggregate holds {list(received)[:4]}..., expected the block's {expected[:4]}...")
    for name, shape in layout:
        array = received[name]
        if array.dtype != "float32" or list(array.shape) != list(shape):
            raise WireError(
                f"{where}: the aggregate's {name!r} is {array.dtype} {list(array.shape)},"
                f" expected float32 {list(shape)}"
            )
    return {name: wire_to_tensor(received[name]) for name, _ in layout}
