"""Pieces of the multi-process federation that need no second process: placement, idle turns, merged
records, checkpoints from another world size, and the federation's state schema."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from toy import ToyModule, toy_dataset, toy_loader

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback
from lightning_parablock.core.planning import place_clients
from lightning_parablock.core.sampler import FederatedBatchSampler
from lightning_parablock.fault_tolerance.fault_watch import FaultWatch, is_lost_peer_error
from lightning_parablock.telemetry.timeline import RoundRecord, merge_rank_records, record_from_json


@pytest.mark.parametrize("num_clients, world_size", [(4, 2), (10, 3), (50, 8), (3, 4)])
def test_placement_is_seeded_balanced_and_covers_every_client(num_clients, world_size):
    placement = place_clients(num_clients, world_size, seed=5)
    assert placement == place_clients(num_clients, world_size, seed=5)
    assert len(placement) == num_clients and set(placement) <= set(range(world_size))
    shares = [placement.count(rank) for rank in range(world_size)]
    assert max(shares) - min(shares) <= 1
    assert place_clients(num_clients, 1, seed=5) == [0] * num_clients


def test_ranks_with_fewer_participants_pad_the_round_with_idle_turns():
    shards = [[0, 1], [2, 3], [4, 5], [6, 7]]
    participants = {0: [0, 1], 1: [0], 2: []}
    sampler = FederatedBatchSampler(
        shards,
        batch_size=2,
        batches_per_turn=3,
        participants=lambda r: participants[r],
        current_round=lambda: 0,
        turns_per_round=lambda r: 2,
        max_turns_per_round=2,
    )
    assert len(sampler) == 6
    for round_index, hosted in participants.items():
        plan = sampler.plan(round_index)
        assert [t.client for t in plan] == hosted + [None] * (2 - len(hosted))
        assert all(len(t.batches) == 3 for t in plan)
    assert len(list(sampler)) == 6


def test_merged_record_has_every_ranks_clients_and_the_slowest_ranks_time():
    rank0 = RoundRecord(round=3, block=1, participants=[0, 1, 2], compute_seconds={0: 1.0, 2: 0.5}, rank=0)
    rank1 = RoundRecord(round=3, block=1, participants=[0, 1, 2], compute_seconds={1: 2.0}, rank=1)
    rank0.wall_seconds, rank1.wall_seconds = 1.6, 2.1
    rank0.exposed_wait_seconds, rank1.exposed_wait_seconds = 0.3, 0.0
    merged = merge_rank_records([rank0, rank1])
    assert merged.compute_seconds == {0: 1.0, 1: 2.0, 2: 0.5}
    assert merged.client_rank == {0: 0, 2: 0, 1: 1}
    assert merged.wall_seconds == 2.1 and merged.exposed_wait_seconds == 0.3
    assert merged.ranks[1]["compute_seconds"] == 2.0
    assert merged.process_compute_seconds == 2.0  # the slowest rank's, not the sum over ranks
    assert rank0.process_compute_seconds == 1.5
    roundtrip = record_from_json(json.loads(json.dumps(asdict(merged))))
    assert roundtrip == merged


def fit(tmp_path, **kwargs):
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=4, local_steps=1, seed=3),
        callbacks=[ParaBlockCallback(staleness=1), ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        max_epochs=2,
        enable_checkpointing=True,
    )
    trainer.fit(ToyModule(), toy_loader(toy_dataset()), **kwargs)
    return trainer


def test_a_checkpoint_of_another_world_size_is_refused_naming_both(tmp_path):
    fit(tmp_path)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["federation"]["world_size"] == 1 and checkpoint["federation"]["version"] == 3
    checkpoint["federation"]["world_size"] = 2
    checkpoint["federation"]["placement"] = place_clients(4, 2, seed=3)
    torch.save(checkpoint, tmp_path / "two_ranks.ckpt")
    with pytest.raises(MisconfigurationException, match=r"written by 2 process\(es\).*this run has 1 process\(es\)"):
        fit(tmp_path / "again", ckpt_path=str(tmp_path / "two_ranks.ckpt"), weights_only=True)


def test_a_checkpoint_of_schema_version_1_still_resumes(tmp_path):
    fit(tmp_path)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    federation = checkpoint["federation"]
    for key in ("version", "unaggregated", "world_size", "placement"):
        federation.pop(key)
    torch.save(checkpoint, tmp_path / "v1.ckpt")
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=4, local_steps=1, seed=3),
        callbacks=[ParaBlockCallback(staleness=1)],
        max_epochs=3,
    )
    trainer.fit(ToyModule(), toy_loader(toy_dataset()), ckpt_path=str(tmp_path / "v1.ckpt"), weights_only=True)
    assert trainer.strategy.federation.pending_rounds() == []


def test_a_checkpoint_of_a_newer_schema_is_refused(tmp_path):
    fit(tmp_path)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    checkpoint["federation"]["version"] = 99
    torch.save(checkpoint, tmp_path / "v99.ckpt")
    with pytest.raises(ValueError, match="schema version 99.*up to 3"):
        fit(tmp_path / "again", ckpt_path=str(tmp_path / "v99.ckpt"), weights_only=True)


def _chained() -> RuntimeError:
    try:
        try:
            raise ConnectionResetError("peer gone")
        except ConnectionResetError as error:
            raise RuntimeError("the exchange of round 3 failed") from error
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    ("error", "lost_peer"),
    [
        (RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242"), True),
        (dist.DistBackendError("NCCL communicator was aborted on rank 0"), True),
        (TimeoutError("a collective did not finish within comm_timeout=5.0s."), True),
        (_chained(), True),
        (RuntimeError("simulated failure on rank 1"), False),
        (ValueError("labels and logits differ in length"), False),
    ],
    ids=["gloo", "nccl", "timeout", "chained", "own-runtime-error", "own-value-error"],
)
def test_only_a_lost_peer_error_waits_for_the_peers_own_cause(one_rank_group, monkeypatch, error, lost_peer):
    # A rank whose own code raised publishes its cause at once; one that lost a peer first waits a moment
    # for the peer's cause, which is what the user needs to read.
    assert is_lost_peer_error(error) is lost_peer
    watch = FaultWatch(poll_s=0.05)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert not watch.report_peer_fault(error, wait_s=0.3)
    watch.stop()
    assert bool(slept) is lost_peer
