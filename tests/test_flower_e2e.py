"""End to end over a real SuperLink, 2 SuperNodes and 2 sites of the tiny recipe on 127.0.0.1.

Each test runs in a folder of its own with a hard timeout, and every process it started (SuperLink, SuperNodes
and their ClientApps, the sites, ``flwr run``) is ended afterwards, passed or failed.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("flwr")

from helpers import TINY_RECIPE  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from lightning_parablock.flower.demo import LocalFederation, site_recipe  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.flower]

ROUNDS, CLIENTS = 3, 4
SMALL = {
    "strategy.local_steps": 2, "data.num_examples": 64, "data.val_examples": 16, "data.batch_size": 4,
    "trainer.check_val_every_n_epoch": 1000,
}  # fmt: skip
_FIT = "import sys; from lightning_parablock.cli import main; main(sys.argv[1:])"


@pytest.fixture(autouse=True)
def _sigterm_ends_the_test():
    """``make test-flower``'s bound sends SIGTERM: end the test by an exception, so every process it started is
    ended by its ``with`` block instead of outliving pytest."""

    def stop(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def folder():
    path = Path(tempfile.mkdtemp(prefix="pbf-", dir="/tmp"))  # short: the sites' sockets live here
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def recipe() -> dict:
    return yaml.safe_load(TINY_RECIPE.read_text())


def model_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


def test_two_sites_train_bit_for_bit_what_one_process_trains_and_hide_the_exchange(folder, recipe):
    single_config = folder / "single.yaml"
    single_config.write_text(yaml.safe_dump(site_recipe(recipe, folder, None, 2, ROUNDS, CLIENTS, 120.0, SMALL)))
    with LocalFederation(folder, recipe, 2, ROUNDS, CLIENTS, comm_timeout=120.0, overrides=SMALL) as federation:
        federation.start()
        single = federation.flower.start("single", [sys.executable, "-c", _FIT, "fit", "--config", str(single_config)])
        result = federation.wait(timeout_s=240)
        single.wait(timeout=60)
    logs = "\n".join(result.site_log(s)[-1500:] for s in range(2))
    assert result.site_codes == [0, 0] and result.server_code == 0 and single.returncode == 0, logs

    one_process = model_weights(folder / "single" / "model")
    for site in range(2):
        weights = model_weights(folder / f"site{site}" / "model")
        assert weights.keys() == one_process.keys()
        unequal = [name for name in weights if not torch.equal(weights[name], one_process[name])]
        assert not unequal, f"site {site} differs from one process in {unequal[:5]}"

    timeline = json.loads(result.timeline.read_text())
    assert [r["round"] for r in timeline["records"] if not r["flush"]] == list(range(ROUNDS))
    assert all(set(r["ranks"]) == {"0", "1"} for r in timeline["records"])  # every site's share, merged
    exchanges = {row["round"]: row["sites"] for row in timeline["flower"]["exchanges"]}
    for site in ("0", "1"):
        times = timeline["flower"]["round_times"][site]
        for t in range(ROUNDS - 1):  # round t's exchange is in flight while round t + 1 computes
            stamps = exchanges[t][site]["stamps"]
            overlap = min(stamps["received_at"], times[str(t + 1)]["ended_at"]) - max(
                stamps["ready_at"], times[str(t + 1)]["started_at"]
            )
            assert overlap > 0, (site, t, stamps, times)
            assert exchanges[t][site]["latency"] > 0
    assert any(f"round {ROUNDS - 1} block" in line for line in result.server_lines), result.server_lines


def test_a_killed_site_ends_the_other_naming_it(folder, recipe):
    comm_timeout = 60.0
    with LocalFederation(folder, recipe, 2, 8, CLIENTS, comm_timeout=comm_timeout, overrides=SMALL) as federation:
        federation.start()
        deadline = time.monotonic() + 180
        while not any("round 0 block" in line for line in federation.server_lines):
            assert time.monotonic() < deadline, "the federation never finished round 0"
            assert all(p.poll() is None for p in federation.sites), "a site ended early"
            time.sleep(0.5)
        federation.kill_site(1)  # SIGKILL: lost without a word
        killed_at = time.monotonic()
        federation.sites[0].wait(timeout=comm_timeout + 120)
        stopped_after = time.monotonic() - killed_at
        result = federation.wait(timeout_s=60)
    site_log = result.site_log(0)
    round_seconds = max(
        float(line.split(" round ")[-1].rstrip("s")) for line in site_log.splitlines() if "exposed wait" in line
    )
    assert result.site_codes[0] == 6, site_log[-2000:]  # stopped by the server, one line
    assert "parablock: error: the federation stopped: site 1 failed in round" in site_log
    assert stopped_after <= comm_timeout + round_seconds, (stopped_after, round_seconds)
    assert any("stopping the federation: site 1 failed" in line for line in result.server_lines), result.server_lines
