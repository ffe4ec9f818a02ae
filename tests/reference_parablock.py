"""Independent plain-PyTorch reference ("oracle") for ParaBlock.

ParaBlock: federated block-coordinate fine-tuning with stale aggregation
(arXiv 2511.19959, Algorithm 2).  This module deliberately does NOT import
``lightning`` or ``lightning_parablock``: the tests use it to check the
Lightning implementation parameter by parameter.  It is written literally,
for clarity rather than speed:

* every client ``i`` holds a FULL local copy ``theta^i`` of the model;
* the server holds a separate global copy ``theta_g`` that starts equal to
  the initial model and only ever receives ``eta * Delta_r``;
* ``staleness`` ``s``: 0 = FedBCD (synchronous), 1 = ParaBlock, ``s >= 2``
  = multi-round staleness.

Round ``t`` (block ``b_t``, participants ``P_t`` = sorted keys of
``rounds[t].batches``):

1. compute (every ``i in P_t``): from its own ``theta^i``, train only block
   ``b_t`` for ``K`` local steps with a fresh optimizer (state reset at each
   block switch), each step over ``accumulate`` micro-batches;
   ``Delta^i_t = theta_K[b_t] - theta_0[b_t]`` (fp32), then
   ``theta^i[b_t] = theta_0[b_t] + eta * Delta^i_t``.
2. communicate (if ``t >= s``): ``Delta_{t-s} = sum_{i in P_{t-s}} w_i Delta^i_{t-s}``
   with ``w`` normalised over ``P_{t-s}`` (uniform or sample counts).
3. boundary: for EVERY client ``j``:
   ``theta^j[b_{t-s}] += eta * (Delta_{t-s} - Delta^j_{t-s})``
   (``Delta^j = 0`` if ``j`` did not participate in round ``t-s``), and
   ``theta_g[b_{t-s}] += eta * Delta_{t-s}``.

After the last round the pending rounds ``T-s .. T-1`` are flushed in
increasing order with the same boundary update.

Learning-rate schedule (optional ``lr_factor``): local step ``k`` of round
``t`` trains at ``lr_factor(t * K + k)`` times the optimizer's own rate, for
every participant alike (``K`` = local steps per round).

Only parameters are trained/aggregated; buffers (if any) stay local.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["RoundSpec", "ReferenceResult", "run_reference"]

Delta = Dict[str, torch.Tensor]  # parameter name -> fp32 update tensor


@dataclass
class RoundSpec:
    block: List[str]  # parameter names trained this round
    # participant client id -> its micro-batches for this round, in order
    # (len = K * accumulate)
    batches: Dict[int, List[Any]]


@dataclass
class ReferenceResult:
    global_model: torch.nn.Module
    client_models: List[torch.nn.Module]
    # after the boundary of round t: snapshots[t][j] = state_dict copy of client j
    snapshots: List[List[Dict[str, torch.Tensor]]]
    # after the boundary of round t: global_snapshots[t] = state_dict copy of theta_g
    global_snapshots: List[Dict[str, torch.Tensor]] = field(default_factory=list)


def _state_copy(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _local_compute(
    model: torch.nn.Module,
    block: List[str],
    batches: List[Any],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    optimizer_factory: Callable[[List[torch.nn.Parameter]], torch.optim.Optimizer],
    global_lr: float,
    accumulate: int,
    lr_at_step: Optional[Callable[[int], float]] = None,
) -> Delta:
    """Algorithm 2, client side of one round; returns Delta^i_t (fp32).

    ``lr_at_step(k)``: the factor on the optimizer's rate for local step ``k`` (``None``: the rate as built).
    """
    params = dict(model.named_parameters())
    block_set = set(block)
    # only block b_t receives gradients; every .grad is cleared before the round
    for name, p in params.items():
        p.requires_grad_(name in block_set)
        p.grad = None
    # block params in the model's parameter order
    block_params = [p for name, p in params.items() if name in block_set]
    theta0 = {n: params[n].detach().clone() for n in block}

    optimizer = optimizer_factory(block_params)  # fresh optimizer per round/block
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    model.train()
    for k, batch in enumerate(batches):  # K * accumulate micro-batches
        loss = loss_fn(model, batch) / accumulate
        loss.backward()
        if (k + 1) % accumulate == 0:  # one local step every `accumulate` micro-batches
            if lr_at_step is not None:
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * lr_at_step(k // accumulate)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    delta: Delta = {}
    with torch.no_grad():
        for n in block:
            p = params[n]
            delta[n] = p.detach().float() - theta0[n].float()  # Delta^i_t = theta_K - theta_0
            p.copy_((theta0[n].float() + global_lr * delta[n]).to(p.dtype))  # theta_0 + eta Delta
    for p in params.values():
        p.grad = None
    return delta


def _aggregate(deltas: Dict[int, Delta], block: List[str], weights: Sequence[float]) -> Delta:
    """Delta_r = sum_{i in P_r} w_i Delta^i_r, w normalised over P_r (sorted order)."""
    participants = sorted(deltas)
    total = float(sum(weights[i] for i in participants))
    agg: Delta = {}
    for n in block:
        acc = torch.zeros_like(deltas[participants[0]][n])
        for i in participants:
            acc = acc + (float(weights[i]) / total) * deltas[i][n]
        agg[n] = acc
    return agg


def _boundary(
    global_model: torch.nn.Module,
    clients: List[torch.nn.Module],
    block: List[str],
    agg: Delta,
    own: Dict[int, Delta],
    global_lr: float,
) -> None:
    """theta^j[b_r] += eta (Delta_r - Delta^j_r) for every j; theta_g[b_r] += eta Delta_r."""
    with torch.no_grad():
        for j, client in enumerate(clients):
            params = dict(client.named_parameters())
            for n in block:
                own_delta = own[j][n] if j in own else torch.zeros_like(agg[n])
                p = params[n]
                p.copy_((p.float() + global_lr * (agg[n] - own_delta)).to(p.dtype))
        gparams = dict(global_model.named_parameters())
        for n in block:
            p = gparams[n]
            p.copy_((p.float() + global_lr * agg[n]).to(p.dtype))


def run_reference(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    rounds: List[RoundSpec],
    num_clients: int,
    optimizer_factory: Callable[[List[torch.nn.Parameter]], torch.optim.Optimizer],
    staleness: int,
    global_lr: float = 1.0,
    accumulate: int = 1,
    client_weights: Optional[Sequence[float]] = None,
    lr_factor: Optional[Callable[[int], float]] = None,
) -> ReferenceResult:
    """Run ParaBlock (Algorithm 2) literally; ``model`` is deep-copied, never modified."""
    # ---- validation -------------------------------------------------------
    T = len(rounds)
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if staleness > T:
        raise ValueError(f"staleness {staleness} exceeds number of rounds {T}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    if client_weights is None:
        weights: Sequence[float] = [1.0] * num_clients  # uniform 1/|P|
    else:
        weights = list(client_weights)  # per-client sample counts
        if len(weights) != num_clients:
            raise ValueError("client_weights must have one entry per client")
        if any(w < 0 for w in weights):
            raise ValueError("client_weights must be non-negative")
    names = {n for n, _ in model.named_parameters()}
    for t, spec in enumerate(rounds):
        unknown = [n for n in spec.block if n not in names]
        if unknown:
            raise ValueError(f"round {t}: unknown parameter names in block: {unknown}")
        if len(set(spec.block)) != len(spec.block):
            raise ValueError(f"round {t}: duplicate parameter names in block")
        if not spec.batches:
            raise ValueError(f"round {t}: no participants")
        for i, b in spec.batches.items():
            if not 0 <= i < num_clients:
                raise ValueError(f"round {t}: client id {i} out of range")
            if len(b) % accumulate != 0:
                raise ValueError(f"round {t}: client {i} has {len(b)} micro-batches, "
                                 f"not a multiple of accumulate={accumulate}")
        if sum(weights[i] for i in spec.batches) <= 0:
            raise ValueError(f"round {t}: participants have zero total weight")

    # ---- initialisation: every client and the server hold a copy ------------
    global_model = copy.deepcopy(model)
    clients = [copy.deepcopy(model) for _ in range(num_clients)]
    client_deltas: List[Dict[int, Delta]] = []  # client_deltas[t][i] = Delta^i_t
    snapshots: List[List[Dict[str, torch.Tensor]]] = []
    global_snapshots: List[Dict[str, torch.Tensor]] = []

    def apply_round(r: int) -> None:
        # communicate: aggregate of round r, then boundary update on everyone
        agg = _aggregate(client_deltas[r], rounds[r].block, weights)
        _boundary(global_model, clients, rounds[r].block, agg, client_deltas[r], global_lr)

    for t, spec in enumerate(rounds):
        # compute: each participant trains block b_t from its own local model
        deltas: Dict[int, Delta] = {}
        for i in sorted(spec.batches):
            K = len(spec.batches[i]) // accumulate  # local steps of this round
            lr_at_step = None if lr_factor is None else (lambda k, t=t, K=K: lr_factor(t * K + k))
            deltas[i] = _local_compute(clients[i], spec.block, spec.batches[i], loss_fn,
                                       optimizer_factory, global_lr, accumulate, lr_at_step)
        client_deltas.append(deltas)
        # boundary of round t: apply the (stale) aggregate of round t - s
        if t >= staleness:
            apply_round(t - staleness)
        snapshots.append([_state_copy(c) for c in clients])
        global_snapshots.append(_state_copy(global_model))

    # flush: pending rounds T-s .. T-1 in increasing order
    for r in range(T - staleness, T):
        apply_round(r)

    for c in clients:  # leave returned client models fully trainable
        for p in c.parameters():
            p.requires_grad_(True)
    return ReferenceResult(global_model, clients, snapshots, global_snapshots)
