"""`parablock report` over a folder of runs: which one it read, the run's own link, rounds, validation loss."""

import io

import pytest
from helpers import quiet_trainer
from toy import ToyModule, toy_dataset, toy_loader

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback
from lightning_parablock.callbacks.round_line import format_round_line, print_round_line
from lightning_parablock.cli import main
from lightning_parablock.telemetry.report import parse_rounds
from lightning_parablock.telemetry.timeline import RoundRecord, save_timeline

PNG = b"\x89PNG\r\n\x1a\n"


def records(rounds=6):
    out = []
    for t in range(rounds):
        exchanged = {"exchanged_round": t - 1, "upload_bytes": {0: 500_000, 1: 500_000}, "download_bytes": 500_000} if t else {}
        out.append(RoundRecord(t, t % 2, [0, 1], {0: 1.0, 1: 1.5}, {0: 3.0 - 0.1 * t, 1: 3.1 - 0.1 * t}, **exchanged))
    return out


def two_runs(root):
    meta = {"staleness": 1, "link": {"bandwidth": "10MB/s", "latency": "5ms"}}
    for version in ("version_0", "version_1"):
        save_timeline(root / version / "parablock_timeline.json", records(), meta)
    (root / "version_1" / "metrics.csv").write_text(
        "epoch,step,train_loss,val_loss\n0,0,,3.5\n1,4,2.9,\n1,4,,2.8\n5,12,,2.1\n6,12,,2.1\n"
    )


def test_report_reads_the_chosen_run_names_it_and_the_others_and_its_link(tmp_path, capsys):
    two_runs(tmp_path)
    main(["report", str(tmp_path), "--run", "version_1", "--rounds", "2-4", "--output_dir", str(tmp_path / "fig")])
    out = capsys.readouterr().out
    assert f"timeline: {tmp_path / 'version_1' / 'parablock_timeline.json'}" in out
    assert str(tmp_path / "version_0") in out and "--run" in out  # the other run, and how to choose it
    assert "this run's link: 10MB/s, latency 5ms" in out
    assert "validation loss 3.5000 after 0 rounds -> 2.1000 after 6" in out
    for name in ("gantt.png", "runtime_vs_bandwidth.png", "loss.png"):
        assert (tmp_path / "fig" / name).read_bytes()[:8] == PNG


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(["--run", "version_7"], "--run 'version_7' matches none"), (["--run", "version"], "matches 2"),
     (["--rounds", "9-12"], "selects none of the run's rounds 0-5"), (["--rounds", "late"], "--rounds 'late'")],
)  # fmt: skip
def test_report_names_a_run_or_rounds_it_cannot_find(tmp_path, capsys, arguments, message):
    two_runs(tmp_path)
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path), *arguments])
    assert message in capsys.readouterr().err


def test_rounds_are_ranges_single_rounds_or_all():
    assert parse_rounds("0-7") == (0, 7) and parse_rounds("5") == (5, 5) and parse_rounds("all") == (0, None)


class NotATerminal(io.StringIO):
    def isatty(self):
        return False


def test_a_log_that_is_not_a_terminal_gets_one_line_per_round(tmp_path, capsys):
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=2, local_steps=1),
        callbacks=[ParaBlockCallback(staleness=1)],
        max_epochs=3,
    )
    trainer.fit(ToyModule(), toy_loader(toy_dataset()))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[parablock] round")]
    assert [line.split()[2] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all(" loss " in line and "compute" in line and "exposed wait" in line for line in lines)
    # the timeline went to the run's own folder, not the bare working directory (the test runs in tmp_path)
    assert not (tmp_path / "parablock_timeline.json").exists()
    assert (tmp_path / "parablock_runs" / "version_0" / "parablock_timeline.json").is_file()


def test_the_round_line_is_skipped_under_a_progress_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    class Trainer:
        is_global_zero, max_epochs, progress_bar_callback = True, 3, object()

    record = records(1)[0]
    stream, terminal = NotATerminal(), Terminal()
    print_round_line(Trainer(), record, stream)
    print_round_line(Trainer(), record, terminal)
    assert stream.getvalue() == format_round_line(record, 3) + "\n" and terminal.getvalue() == ""
    assert format_round_line(record, 3).startswith("[parablock] round 1/3  block 0  loss 3.0500  compute 2.50s")


def corrupted(root, edit):
    """One run's timeline with ``edit`` applied to its JSON."""
    import json

    path = root / "version_0" / "parablock_timeline.json"
    save_timeline(path, records(), {"staleness": 1, "num_clients": 2, "link": {"bandwidth": "10MB/s", "latency": "5ms"}})
    payload = json.loads(path.read_text())
    edit(payload)
    path.write_text(json.dumps(payload))
    return path


IMPOSSIBLE = [
    (lambda p: p["records"][2].update(wall_seconds=-3.0), "record 2 (round 2): `wall_seconds` is -3.0, not a finite number of seconds >= 0"),
    (lambda p: p["records"][1]["compute_seconds"].update({"0": "fast"}), "record 1 (round 1): `compute_seconds` of client 0 is 'fast'"),
    (lambda p: p["records"][0].update(participants=[]), "record 0 (round 0): `participants` is empty"),
    (lambda p: p.update(num_clients=0), "`num_clients` is 0; a run has a whole number >= 1 there"),
    (lambda p: p["records"][3].update(upload_bytes={"0": 1.5}), "record 3 (round 3): `upload_bytes` of client 0 is 1.5"),
    (lambda p: p["records"][4].update(round="four"), "record 4 (round four): `round` is 'four', not a whole number"),
    (lambda p: p["records"][5].update(speed=1), "record 5 has unknown field(s) ['speed']"),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "message"), IMPOSSIBLE, ids=[m.split(": ")[-1][:30] for _, m in IMPOSSIBLE])
def test_a_timeline_with_impossible_values_is_refused_naming_record_and_field(tmp_path, capsys, edit, message):
    path = corrupted(tmp_path, edit)
    before = path.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path), "--output_dir", str(tmp_path / "fig")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{path}: " in err and message in err, err
    assert err.startswith("parablock: error:")  # the error first, no usage text
    assert path.read_bytes() == before and not (tmp_path / "fig").exists()
