"""The Flower server's loop against a fake Grid: the real ClientApp relays each message to a real site mailbox,
whose fake trainer exchanges synthetic deltas through the real site transport (see ``flower_fakes``)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

import threading  # noqa: E402

from flower_fakes import FakeGrid, FakeSite, client_delta, hello  # noqa: E402

from lightning_parablock.aggregation import MeanAggregator, MedianAggregator  # noqa: E402
from lightning_parablock.comm.in_memory import InMemoryTransport  # noqa: E402
from lightning_parablock.comm.link import SimulatedLink  # noqa: E402
from lightning_parablock.comm.transport import CommunicationError, RoundUploads  # noqa: E402
from lightning_parablock.core.planning import place_clients  # noqa: E402
from lightning_parablock.flower.handshake import HandshakeRefused  # noqa: E402
from lightning_parablock.flower.server import STATE_FILENAME, FederationServer, ServerSettings, SiteFailed  # noqa: E402
from lightning_parablock.flower.site_mailbox import FederationStopped  # noqa: E402
from lightning_parablock.telemetry.timeline import load_timeline  # noqa: E402

NUM_SITES, NUM_CLIENTS = 2, 4


@pytest.fixture
def federation(tmp_path):
    folder = Path(tempfile.mkdtemp(prefix="pb-", dir="/tmp"))
    sites: list[FakeSite] = []

    def start(
        rounds=3,
        staleness=1,
        aggregator=None,
        hellos=None,
        delta=client_delta,
        fail=None,
        comm_timeout=30.0,
        start_epoch=0,
    ):
        aggregator = aggregator or MeanAggregator()
        placement = place_clients(NUM_CLIENTS, NUM_SITES, seed=0)
        for site in range(NUM_SITES):
            info = hello(site, NUM_SITES, placement, rounds, staleness, aggregator, comm_timeout=comm_timeout)
            info.update((hellos or {}).get(site, {}))
            fail_in_round = fail[1] if fail and fail[0] == site else None
            fake = FakeSite(folder, site, placement, rounds, staleness, info, delta, fail_in_round, start_epoch)
            sites.append(fake.start())
        grid = FakeGrid({10 + site.site: site.node_config for site in sites})
        lines: list[str] = []
        settings = ServerSettings(NUM_SITES, tmp_path / "server", wait_for_sites_s=30, poll_s=0.02)
        return FederationServer(grid, settings, log=lines.append), grid, sites, lines

    yield start
    for site in sites:
        site.close()
    shutil.rmtree(folder, ignore_errors=True)


def in_memory_aggregate(round_index: int, aggregator, delta=client_delta):
    """What one process of every client would aggregate: the in-memory transport on the same deltas."""
    deltas = {c: delta(c, round_index) for c in range(NUM_CLIENTS)}
    weights = {c: float(c + 1) for c in range(NUM_CLIENTS)}
    uploads = RoundUploads(round_index, round_index % 2, deltas, weights)
    return InMemoryTransport(aggregator, SimulatedLink()).exchange(uploads, threading.Event())


def finished(sites) -> None:
    for site in sites:
        site.thread.join(30)
        assert not site.thread.is_alive()


@pytest.mark.parametrize(
    "staleness, aggregator",
    [(0, MeanAggregator()), (1, MeanAggregator(weighting="samples", clip_norm=2.0)), (2, MedianAggregator())],
    ids=["fedbcd-mean", "parablock-clipped-mean", "stale2-median"],
)
def test_one_message_per_site_per_round_and_the_aggregate_equals_the_in_memory_exchange(
    federation, staleness, aggregator
):
    rounds = 4
    server, grid, sites, lines = federation(rounds=rounds, staleness=staleness, aggregator=aggregator)
    server.run()
    finished(sites)
    counts = grid.messages_per_node()
    for node in grid.get_node_ids():
        assert counts[(node, "train.hello")] == 1
        assert counts[(node, "train.exchange")] == rounds  # one per round, the flush's included
        assert counts[(node, "train.final")] == 1
    for site in sites:
        assert site.error is None
        assert sorted(site.results) == list(range(rounds))  # every round, the flushed ones too
        for round_index, result in site.results.items():
            expected = in_memory_aggregate(round_index, aggregator)
            assert all(torch.equal(result.aggregate[n], expected.aggregate[n]) for n in expected.aggregate)
            assert result.upload_bytes == expected.upload_bytes
    assert any("round 3 block 1: 4 clients from 2 sites" in line for line in lines), lines
    _, records = load_timeline(server.settings.output_dir / "parablock_timeline.json")  # readable by `report`
    assert json.loads((server.settings.output_dir / STATE_FILENAME).read_text()) == {"next_round": rounds}


def _poisoned(bad_client: int, bad_round: int):
    def delta(client: int, round_index: int):
        values = client_delta(client, round_index)
        if (client, round_index) == (bad_client, bad_round):
            values["block.bias"][1] = float("nan")
        return values

    return delta


def test_a_non_finite_client_is_left_out_and_every_site_is_told(federation):
    aggregator = MeanAggregator(nonfinite="skip")
    delta = _poisoned(bad_client=2, bad_round=1)
    server, grid, sites, lines = federation(rounds=3, aggregator=aggregator, delta=delta)
    server.run()
    finished(sites)
    expected = in_memory_aggregate(1, aggregator, delta)
    for site in sites:
        assert site.results[1].skipped_clients == [2] == expected.skipped_clients
        assert all(torch.equal(site.results[1].aggregate[n], expected.aggregate[n]) for n in expected.aggregate)
    assert any("left clients [2] out" in line for line in lines)


def test_a_non_finite_delta_under_raise_stops_every_site_naming_the_client(federation):
    server, grid, sites, lines = federation(rounds=3, delta=_poisoned(bad_client=2, bad_round=1))
    placement = place_clients(NUM_CLIENTS, NUM_SITES, seed=0)
    with pytest.raises(SiteFailed, match=rf"site {placement[2]} failed in round 1: Client 2 sent a non-finite delta"):
        server.run()
    finished(sites)
    for site in sites:
        assert isinstance(site.error, CommunicationError) and isinstance(site.error.__cause__, FederationStopped)
        assert "Client 2 sent a non-finite delta" in str(site.error)


def test_an_error_reply_ends_the_run_and_the_other_site_is_told(federation):
    server, grid, sites, lines = federation(rounds=4, fail=(1, 1))
    with pytest.raises(SiteFailed, match="site 1 failed in round 1: site 1 failed: RuntimeError: simulated failure"):
        server.run()
    finished(sites)
    assert isinstance(sites[0].error, CommunicationError)
    assert "site 1 failed in round 1" in str(sites[0].error)
    assert any(m.metadata.message_type == "train.abort" for m in grid.pushed)


def test_a_site_that_stops_answering_ends_the_run_within_comm_timeout(federation):
    server, grid, sites, lines = federation(rounds=3, comm_timeout=1.5)
    sites[1].worker.submit = lambda *args, **kwargs: None  # its uploads never go up
    sites[1].worker.wait = lambda round_index: __import__("time").sleep(60)
    with pytest.raises(SiteFailed, match=r"site 1 failed in round 0: no answer .*within 2s \(comm_timeout\)"):
        server.run()
    sites[0].thread.join(30)
    assert "site 1 failed in round 0" in str(sites[0].error)


@pytest.mark.parametrize(
    "changes, error",
    [
        (
            {"staleness": 2, "settings": {"method": "parablock", "staleness": 2}},
            "site 1 differs from site 0 in staleness",
        ),
        ({"settings": {"method": "fedbcd", "staleness": 1}}, "site 1 differs from site 0 in setting 'method'"),
        ({"weights_sha256": "1" * 64}, "site 1's initial trainable weights"),
        ({"site": 0}, "both say they are site 0"),
        ({"num_sites": 3}, "site 1 runs a federation of 3 sites"),
    ],
    ids=["staleness", "method", "weights", "index", "num_sites"],
)
def test_the_handshake_refuses_a_mismatch_naming_the_site_and_the_field(federation, changes, error):
    server, grid, sites, lines = federation(hellos={1: changes})
    with pytest.raises(HandshakeRefused, match=error):
        server.run()
    finished(sites)
    for site in sites:
        assert "refused the handshake" in str(site.error)
    assert not any(m.metadata.message_type == "train.exchange" for m in grid.pushed)  # nobody trained


def test_a_resume_needs_the_sites_and_the_server_to_agree_on_the_round(federation, tmp_path):
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / STATE_FILENAME).write_text(json.dumps({"next_round": 5}))
    server, grid, sites, lines = federation()
    with pytest.raises(HandshakeRefused, match="the sites resume at round 0, the server's record .* at round 5"):
        server.run()
    finished(sites)


def test_a_resume_one_round_behind_the_servers_record_exchanges_that_round_again(federation, tmp_path):
    """Sites resumed from round 2's checkpoint (round 1 pending, s = 1); the server aggregated round 1 already."""
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / STATE_FILENAME).write_text(json.dumps({"next_round": 2}))
    resumed = {"next_round": 1, "resume_epoch": 2}
    server, grid, sites, lines = federation(rounds=4, hellos={0: resumed, 1: resumed}, start_epoch=2)
    server.run()
    finished(sites)
    for site in sites:
        assert site.error is None and sorted(site.results) == [1, 2, 3]
        for round_index, result in site.results.items():
            expected = in_memory_aggregate(round_index, MeanAggregator())
            assert all(torch.equal(result.aggregate[n], expected.aggregate[n]) for n in expected.aggregate)
    assert any("starting at round 1" in line for line in lines)
