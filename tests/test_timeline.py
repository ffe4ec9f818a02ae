"""The round timeline, the modelled federated wall-clock, and `parablock report`."""

import json

import pytest
from helpers import quiet_trainer
from toy import ToyModule, toy_dataset, toy_loader

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback, SimulatedLink
from lightning_parablock.cli import main
from lightning_parablock.telemetry.timeline import (
    RoundRecord,
    load_timeline,
    modelled_wallclock,
    overlap_efficiency,
    save_timeline,
)

# 1 MB/s, no latency: a client's exchange of `up` bytes with a 1 MB aggregate costs up/1e6 + 1 s.
LINK = SimulatedLink("1MB/s")


def hand_timeline():
    """Three rounds of two clients, exchanged with staleness 1, and the final flush."""
    return [
        RoundRecord(0, 0, [0, 1], {0: 2.0, 1: 3.0}),
        RoundRecord(1, 1, [0, 1], {0: 4.0, 1: 1.0}, exchanged_round=0, upload_bytes={0: 1_000_000, 1: 2_000_000}, download_bytes=1_000_000),
        RoundRecord(2, 0, [0, 1], {0: 1.0, 1: 1.0}, exchanged_round=1, upload_bytes={0: 1_000_000, 1: 1_000_000}, download_bytes=1_000_000),
        RoundRecord(2, 0, [], {}, exchanged_round=2, upload_bytes={0: 3_000_000, 1: 1_000_000}, download_bytes=1_000_000, flush=True),
    ]  # fmt: skip


def test_modelled_wallclock_of_parablock_overlaps_compute_with_the_previous_exchange():
    # round 0: max(3, -) = 3; round 1: max(4, comm of round 0 = max(2, 3) = 3) = 4;
    # round 2: max(1, comm of round 1 = 2) = 2; flush of round 2: max(4, 2) = 4.
    assert modelled_wallclock(hand_timeline(), LINK, staleness=1) == pytest.approx(3 + 4 + 2 + 4)


def test_modelled_wallclock_of_fedbcd_adds_each_clients_exchange_to_its_compute():
    # round 0: max(2 + 2, 3 + 3) = 6; round 1: max(4 + 2, 1 + 2) = 6; round 2: max(1 + 4, 1 + 2) = 5.
    assert modelled_wallclock(hand_timeline(), LINK, staleness=0) == pytest.approx(6 + 6 + 5)


def test_modelled_wallclock_with_two_rounds_of_staleness():
    # round 0: 3; round 1: 4 (no exchange yet); round 2: max(1, comm of round 0 = 3) = 3; flush rounds 1, 2: 2 + 4.
    assert modelled_wallclock(hand_timeline(), LINK, staleness=2) == pytest.approx(3 + 4 + 3 + 2 + 4)


def test_timeline_json_roundtrip(tmp_path):
    path = tmp_path / "run" / "parablock_timeline.json"
    save_timeline(path, hand_timeline(), {"staleness": 1})
    meta, records = load_timeline(path)
    assert meta == {"staleness": 1} and records == hand_timeline()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_a_run_writes_its_timeline_per_round_and_per_client(tmp_path):
    callback = ParaBlockCallback(staleness=1, link=SimulatedLink("10MB/s", "1ms"))
    strategy = FederatedBlockStrategy(num_clients=3, local_steps=2, clients_per_round=2)
    trainer = quiet_trainer(strategy=strategy, callbacks=[callback], max_epochs=3, default_root_dir=tmp_path)
    trainer.fit(ToyModule(), toy_loader(toy_dataset()))
    path = tmp_path / "parablock_runs" / "version_0" / "parablock_timeline.json"  # no logger: a run folder of its own
    assert callback.timeline_path(trainer) == path and not (tmp_path / "parablock_timeline.json").exists()
    meta, records = load_timeline(path)
    assert meta["staleness"] == 1 and meta["link"] == {"bandwidth": "10MB/s", "latency": "1ms"}
    assert [r.round for r in records] == [0, 1, 2, 2] and records[-1].flush
    for record in records[:3]:
        assert set(record.compute_seconds) == set(record.client_loss) == set(record.participants)
        assert all(seconds > 0 for seconds in record.compute_seconds.values())
    for record in records[1:]:
        assert set(record.upload_bytes) == set(records[record.exchanged_round].participants)
        assert record.download_bytes > 0 and record.link_seconds > 0.002
    assert 0 < overlap_efficiency(records) <= 1.5
    assert json.loads(path.read_text())["num_blocks"] == 4


def test_report_prints_the_table_and_writes_the_figures(tmp_path, capsys):
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=2, local_steps=1),
        callbacks=[ParaBlockCallback(staleness=1)],
        max_epochs=3,
        default_root_dir=tmp_path,
    )
    trainer.fit(ToyModule(), toy_loader(toy_dataset()))
    main(["report", str(tmp_path), "--bandwidth", "50MB/s,100MB/s,150MB/s", "--latency", "20ms"])
    out = capsys.readouterr().out
    assert "rounds                      3" in out and "overlap efficiency" in out
    for bandwidth in ("50MB/s, 20ms", "100MB/s, 20ms", "150MB/s, 20ms"):
        assert bandwidth in out
    for name in ("gantt.png", "runtime_vs_bandwidth.png", "loss.png"):
        assert (tmp_path / "parablock_runs" / "version_0" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_names_a_bad_bandwidth_or_a_missing_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path)])
    assert "No parablock_timeline.json" in capsys.readouterr().err
    save_timeline(tmp_path / "parablock_timeline.json", hand_timeline(), {"staleness": 1, "link": {"latency": 0}})
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path), "--bandwidth", "fast"])
    assert "'fast'" in capsys.readouterr().err


def test_per_round_summaries_reach_csv_and_tensorboard_with_the_round(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=2, local_steps=1),
        callbacks=[ParaBlockCallback(staleness=1)],
        max_epochs=4,
        logger=loggers,
    )
    trainer.fit(ToyModule(), toy_loader(toy_dataset()))
    rows = list(csv.DictReader(open(loggers[0].log_dir + "/metrics.csv")))
    round_rows = [r for r in rows if r.get("parablock/exposed_wait_s")]
    assert [int(r["epoch"]) for r in round_rows] == [0, 1, 2, 3]  # one row per round, the round as x-axis
    assert all(float(r["parablock/train_loss"]) > 0 for r in round_rows)
    events = EventAccumulator(loggers[1].log_dir)
    events.Reload()
    round_steps = [e.step for e in events.Scalars("parablock/bytes_moved")]
    assert len(round_steps) == 4
    epoch_at = {}
    for event in events.Scalars("epoch"):  # per-step client losses log the round at their steps too
        epoch_at[event.step] = event.value
    assert [epoch_at[step] for step in round_steps] == [0, 1, 2, 3]
    # the timeline sits beside the first logger's files
    assert (tmp_path / "csv" / "version_0" / "parablock_timeline.json").exists()


@pytest.mark.parametrize(("arguments", "message"), [(["--bandwidth", ","], "No bandwidth"), ([], "not a timeline")])
def test_report_refuses_an_empty_bandwidth_list_or_a_foreign_json(tmp_path, capsys, arguments, message):
    path = tmp_path / "parablock_timeline.json"
    if arguments:
        save_timeline(path, hand_timeline(), {"staleness": 1, "link": {"latency": 0}})
    else:
        path.write_text('{"records": [{"round": 0}]}')
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path), *arguments])
    assert message in capsys.readouterr().err


def test_modelled_wallclock_charges_the_probe_and_the_fetch_before_a_turn():
    # FedCyBGD-like: one client per round, staleness 0. Round 0: fetch nothing, compute 2, exchange 1 + 1 = 2 -> 4.
    # Round 1: fetch 3 MB = 3 s, compute 1, exchange 2 -> 6; both rounds' probes add 0.5 s each.
    records = [
        RoundRecord(0, 0, [0], {0: 2.0}, exchanged_round=0, upload_bytes={0: 1_000_000}, download_bytes=1_000_000,
                    probe_seconds=0.5, sync_download_bytes={0: 0}),
        RoundRecord(1, 1, [1], {1: 1.0}, exchanged_round=1, upload_bytes={1: 1_000_000}, download_bytes=1_000_000,
                    probe_seconds=0.5, sync_download_bytes={1: 3_000_000}),
    ]  # fmt: skip
    assert modelled_wallclock(records, LINK, 0) == pytest.approx(4 + 6 + 1)
    assert records[1].bytes_moved == 2_000_000 + 3_000_000


def test_old_timelines_without_probe_or_fetch_still_load(tmp_path):
    record = {"round": 0, "block": 0, "participants": [0], "compute_seconds": {"0": 1.0}, "client_loss": {},
              "upload_bytes": {}}  # fmt: skip
    (tmp_path / "t.json").write_text(json.dumps({"staleness": 1, "records": [record]}))
    _, records = load_timeline(tmp_path / "t.json")
    assert records[0].probe_seconds == 0.0 and records[0].sync_download_bytes == {}
