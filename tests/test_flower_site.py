"""A site's Trainer refuses what a Flower site cannot run, in one line and before any training; and a Flower site
in-process against a fake server trains what one process trains."""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from toy import ToyModule, toy_dataset, toy_loader

pytest.importorskip("flwr")

from flower_fakes import FakeGrid  # noqa: E402

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback, SimulatedLink  # noqa: E402
from lightning_parablock.aggregation import MeanAggregator, StackingAggregator  # noqa: E402
from lightning_parablock.comm.codecs import Codec  # noqa: E402
from lightning_parablock.flower import FlowerSite  # noqa: E402
from lightning_parablock.flower.server import FederationServer, ServerSettings, SiteFailed  # noqa: E402


@pytest.fixture
def short_dir():
    path = Path(tempfile.mkdtemp(prefix="pbs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def fit(callbacks, rounds: int = 2, module=None, **trainer_args) -> ToyModule:
    module = module or ToyModule()
    strategy = FederatedBlockStrategy(num_clients=4, local_steps=2, seed=3)
    trainer = quiet_trainer(strategy=strategy, callbacks=callbacks, max_epochs=rounds, **trainer_args)
    trainer.fit(module, toy_loader(toy_dataset()))
    return module


class OwnCodec(Codec):
    name = "mine"


@pytest.mark.parametrize(
    "parablock, trainer_args, error",
    [
        (dict(link=SimulatedLink("100MB/s", "20ms")), {}, "remove ParaBlockCallback's modelled `link`"),
        ({}, dict(max_steps=4), "leave `max_steps` unset"),
        (dict(aggregator=StackingAggregator()), {}, "it knows \\['MeanAggregator'"),
        (dict(compression=OwnCodec()), {}, "carries the library's codecs only"),
    ],
    ids=["link", "max_steps", "aggregator", "codec"],
)
def test_a_site_refuses_what_flower_cannot_run_before_training(short_dir, parablock, trainer_args, error):
    site = FlowerSite(site=0, num_sites=2, mailbox=str(short_dir / "s.sock"))
    with pytest.raises((MisconfigurationException, ValueError), match=error):
        fit([ParaBlockCallback(**parablock), site], **trainer_args)
    assert not (short_dir / "s.sock").exists()  # refused before the mailbox opened


def test_a_site_before_parablockcallback_or_not_among_the_callbacks_is_refused(short_dir):
    site = FlowerSite(site=0, num_sites=2, mailbox=str(short_dir / "s.sock"))
    with pytest.raises(MisconfigurationException, match="must come after ParaBlockCallback"):
        fit([site, ParaBlockCallback()])
    with pytest.raises(MisconfigurationException, match="not among the Trainer's callbacks"):
        fit([ParaBlockCallback(transport=FlowerSite(site=0, num_sites=2, mailbox=str(short_dir / "t.sock")))])


def test_bad_site_arguments_and_a_missing_flwr_say_what_to_do(short_dir, monkeypatch):
    with pytest.raises(ValueError, match="`site` is this site's index in 0..1"):
        FlowerSite(site=2, num_sites=2, mailbox="/tmp/x.sock")
    with pytest.raises(ValueError, match="longer than 107 bytes"):
        site = FlowerSite(site=0, num_sites=2, mailbox="/tmp/" + "x" * 120 + ".sock")
        fit([ParaBlockCallback(), site])

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(ImportError, match=r"pip install 'lightning_parablock\[flower\]'"):
        FlowerSite(site=0, num_sites=2, mailbox="/tmp/x.sock")


def test_a_checkpoint_of_another_site_is_refused():
    site = FlowerSite(site=1, num_sites=2, mailbox="/tmp/x.sock")
    site.load_state_dict({"site": 1, "num_sites": 2})
    with pytest.raises(MisconfigurationException, match="written by site 0 of 2; this is site 1 of 2"):
        site.load_state_dict({"site": 0, "num_sites": 2})


class FailsInRound(ToyModule):
    def __init__(self, round_index: int) -> None:
        super().__init__()
        self.round_index = round_index

    def training_step(self, batch, batch_idx):
        if self.trainer.current_epoch == self.round_index:
            raise RuntimeError("out of memory (simulated)")
        return super().training_step(batch, batch_idx)


def run_sites(short_dir, tmp_path, modules: dict[int, ToyModule], rounds: int = 3):
    """Two Lightning sites on threads of this process and the server loop over a fake Grid; what each raised."""
    sites = [FlowerSite(site=s, num_sites=2, mailbox=str(short_dir / f"s{s}.sock")) for s in range(2)]
    errors: dict[int, BaseException] = {}

    def train(site: FlowerSite) -> None:
        try:
            fit([ParaBlockCallback(aggregator=MeanAggregator()), site], rounds=rounds, module=modules[site.site])
        except BaseException as error:  # noqa: BLE001 - the test reads it
            errors[site.site] = error

    threads = [threading.Thread(target=train, args=(site,), daemon=True) for site in sites]
    for thread in threads:
        thread.start()
    grid = FakeGrid({
        10 + s: {"parablock-mailbox": str(short_dir / f"s{s}.sock"), "parablock-key": str(short_dir / f"s{s}.sock.key")}
        for s in range(2)
    })  # fmt: skip
    server = FederationServer(
        grid, ServerSettings(2, tmp_path / "server", wait_for_sites_s=60, poll_s=0.02), log=lambda _: None
    )
    try:
        server.run()
    finally:
        for thread in threads:
            thread.join(60)
    return errors


def test_a_site_that_raises_stops_the_other_naming_it_and_the_round(short_dir, tmp_path):
    modules = {0: ToyModule(), 1: FailsInRound(1)}
    with pytest.raises(SiteFailed, match="site 1 failed in round 1: RuntimeError: out of memory"):
        run_sites(short_dir, tmp_path, modules)


def test_two_site_trainers_in_process_train_what_one_process_trains(short_dir, tmp_path):
    """Two Lightning sites (threads of this process) and the server loop over a fake Grid, against one process of
    every client: bit-identical, as the end-to-end test checks over a real Flower deployment."""
    reference = fit([ParaBlockCallback(aggregator=MeanAggregator())], rounds=3)
    modules = {site: ToyModule() for site in range(2)}  # built here: the global RNG is not the threads' to share
    errors = run_sites(short_dir, tmp_path, modules)
    assert not errors, errors
    expected = dict(reference.named_parameters())
    for site, module in modules.items():
        for name, parameter in module.named_parameters():
            assert torch.equal(parameter, expected[name]), (site, name)


def test_a_sigtermed_site_tells_the_server_it_was_stopped_and_how_it_resumes(short_dir):
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lightning_parablock.flower.app.parablock_app import wire
    from lightning_parablock.flower.site_mailbox import SiteMailbox

    site = FlowerSite(site=1, num_sites=2, mailbox=str(short_dir / "s.sock"))
    site.mailbox = SiteMailbox(site.mailbox_path, site.key_file, 1)
    site.on_exception(SimpleNamespace(current_epoch=2), None, SIGTERMException())
    note = wire.failure_note(short_dir / "s.sock")
    assert note == "site 1 was stopped by SIGTERM in round 2 (its last round-end checkpoint resumes it)"
    with pytest.raises(wire.MailboxRefused, match="stopped by SIGTERM in round 2"):  # what the next ClientApp says
        wire.call_site(str(short_dir / "s.sock"), site.key_file, {"kind": "exchange", "round": 3}, [], 5)
