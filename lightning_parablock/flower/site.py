"""``FlowerSite``: this trainer is one site of a federation whose server is Flower's.

Organizations that fine-tune together do not share a torch.distributed job: each runs its own trainer behind its
own firewall, next to a Flower SuperNode that talks to the coordinator's SuperLink. The trainer stays one
long-lived process (model, optimizers, pending deltas, data, checkpoints and the communication thread live here);
the SuperNode's per-message ClientApp only carries messages between the server and this process's mailbox (a Unix
socket and a key file, :mod:`.site_mailbox`). Clients are placed on sites as they are on ranks, so ``num_sites``
sites of ``N / num_sites`` clients train the same federation as one process of ``N`` clients, bit for bit.

``FlowerSite`` is both the run's transport (``ParaBlockCallback(transport=site)``, or it takes the exchange at its
setup when it comes after ``ParaBlockCallback`` in the callbacks) and a callback (the handshake, the round times,
telling the server of a failure, the last records). Before round 0 the site answers the server's handshake (its
settings, a hash of its trainable weights, the round it resumes at) and waits to be accepted. A site that fails
tells the server, which stops the others; a site the server stops raises
:class:`~.site_mailbox.FederationStopped` at its next batch, naming the failed site and round.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from typing_extensions import override

from lightning_parablock.argument_checks import check_int
from lightning_parablock.comm.link import parse_duration
from lightning_parablock.comm.transport import BlockLayout, ExchangeContext, TransportChoice
from lightning_parablock.flower import plug
from lightning_parablock.flower.app.parablock_app.wire import wall_clock
from lightning_parablock.flower.requirement import require_flwr
from lightning_parablock.flower.site_mailbox import FederationStopped, SiteMailbox, federation_stop
from lightning_parablock.flower.site_transport import FlowerSiteTransport

if TYPE_CHECKING:
    import lightning.pytorch as pl


class FlowerSite(TransportChoice, Callback):
    """This process is site ``site`` of ``num_sites``; its SuperNode's ClientApps reach it at ``mailbox``.

    Add it to the Trainer's callbacks after ``ParaBlockCallback`` (with a ``FederatedBlockStrategy`` of one process),
    start the trainer, then the site's SuperNode with the ``--node-config`` the trainer prints.

    Args:
        site: this site's index, ``0 <= site < num_sites``; it decides which clients this site hosts.
        num_sites: sites in the federation.
        mailbox: the Unix socket the SuperNode's ClientApps connect to (at most 107 bytes; its folder must exist).
        key_file: the key a ClientApp must prove it holds; created (mode 0600) if missing. Default: ``mailbox`` +
            ``.key``. A SuperNode run as another account needs read access to it (its group, say).
        handshake_timeout: how long to wait for the server's handshake (``flwr run`` may come later), in seconds or
            as a string such as ``"600s"``.
    """

    def __init__(
        self,
        site: int,
        num_sites: int,
        mailbox: str,
        key_file: Optional[str] = None,
        handshake_timeout: float | str = 1800.0,
    ) -> None:
        require_flwr()
        self.num_sites = check_int("num_sites", num_sites, minimum=1)
        self.site = check_int("site", site, minimum=0)
        if self.site >= self.num_sites:
            raise ValueError(
                f"`site` is this site's index in 0..{self.num_sites - 1} (num_sites={num_sites}), got {site}."
            )
        self.mailbox_path = Path(os.fspath(mailbox))
        self.key_file = Path(os.fspath(key_file)) if key_file is not None else Path(f"{self.mailbox_path}.key")
        self.handshake_timeout = parse_duration(handshake_timeout, "handshake_timeout")
        self.mailbox: Optional[SiteMailbox] = None
        self.transport: Optional[FlowerSiteTransport] = None
        self._fit_trainer: Optional["pl.Trainer"] = None
        self._layout: Optional[Callable[[int], BlockLayout]] = None
        self._codec_name = "none"
        self._comm_timeout = 1800.0
        self._sent_records = 0
        self._round_times: dict[int, dict[str, float]] = {}
        self._unsent_times: set[int] = set()

    # ------------------------------------------------------------------------------------ the transport

    def membership(self, rank: int, world_size: int) -> tuple[int, int]:
        """Clients are placed on sites as on ranks: this site hosts those placed on ``site`` of ``num_sites``."""
        return self.site, self.num_sites

    def build(self, context: ExchangeContext) -> FlowerSiteTransport:
        """The transport of this site's communication thread, once the strategy knows the model's blocks."""
        if self.mailbox is None:
            raise MisconfigurationException(
                "FlowerSite is the exchange's transport but not among the Trainer's callbacks: add the same FlowerSite"
                " to `callbacks` after ParaBlockCallback."
            )
        self._layout = context.block_layout
        self.transport = FlowerSiteTransport(self.mailbox, context.block_layout, self._codec_name, self._telemetry)
        return self.transport

    def __repr__(self) -> str:
        return f"FlowerSite(site={self.site}, num_sites={self.num_sites}, mailbox={str(self.mailbox_path)!r})"

    # --------------------------------------------------------------------------------------------- set-up

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        spec = plug.take_the_exchange(trainer, self)
        self._fit_trainer = trainer
        self._codec_name = plug.codec_name(spec)
        self._comm_timeout = spec.comm_timeout
        self.mailbox = SiteMailbox(self.mailbox_path, self.key_file, self.site)
        print(
            f"parablock: site {self.site} of {self.num_sites} listens on {self.mailbox_path}; start its SuperNode with"
            f' --node-config \'parablock-mailbox="{self.mailbox_path}" parablock-key="{self.key_file}"\'',
            flush=True,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"site": self.site, "num_sites": self.num_sites}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A checkpoint holds its own site's clients only: another site's would resume the wrong ones."""
        saved = (state_dict.get("site"), state_dict.get("num_sites"))
        if saved != (self.site, self.num_sites):
            raise MisconfigurationException(
                f"The checkpoint was written by site {saved[0]} of {saved[1]}; this is site {self.site} of"
                f" {self.num_sites}. Resume each site from its own checkpoints."
            )

    def describe_silence(self) -> str:
        """What the server last sent this site, for a timeout's message."""
        return self.mailbox.describe_silence() if self.mailbox is not None else "The site's mailbox is closed."

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The handshake, before round 0 (or the round this site resumes at): blocks until the server accepts."""
        assert self.mailbox is not None and self._layout is not None
        hello = plug.hello(trainer, self.site, self.num_sites, self._layout)
        self.mailbox.publish_hello(hello)
        print(
            f"parablock: site {self.site} waits for the Flower server's handshake (round {hello['next_round']})",
            flush=True,
        )
        try:
            started = self.mailbox.wait_started(self.handshake_timeout)
        except TimeoutError as error:
            raise MisconfigurationException(f"Site {self.site}: {error}") from None
        if started.header.get("round") != hello["next_round"]:
            raise FederationStopped(
                f"the server starts at round {started.header.get('round')}, site {self.site} at round"
                f" {hello['next_round']}"
            )

    # ------------------------------------------------------------------------------------------- rounds

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._stamp(trainer.current_epoch, "started_at")

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if self.mailbox is not None and self.mailbox.stopped is not None:
            raise FederationStopped(self.mailbox.stopped)  # another site failed: stop now, not at this round's end

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._stamp(trainer.current_epoch, "ended_at")

    def _stamp(self, round_index: int, what: str) -> None:
        self._round_times.setdefault(round_index, {})[what] = wall_clock()
        self._unsent_times.add(round_index)

    def _telemetry(self) -> dict[str, Any]:
        """What goes up with the next uploads: the round records and round times not sent yet."""
        records = plug.round_records(self._fit_trainer) if self._fit_trainer is not None else []
        fresh, self._sent_records = records[self._sent_records :], len(records)
        times = {str(r): dict(self._round_times[r]) for r in sorted(self._unsent_times)}
        self._unsent_times = set()
        return {"records": fresh, "round_times": times}

    # ----------------------------------------------------------------------------------------- the end

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if self.mailbox is None or federation_stop(exception) is not None:
            return
        round_index = trainer.current_epoch
        if isinstance(exception, SIGTERMException):
            reason = (
                f"site {self.site} was stopped by SIGTERM in round {round_index} (its last round-end checkpoint"
                " resumes it)"
            )
        else:
            cause = f"{type(exception).__name__}: {exception}" if str(exception) else type(exception).__name__
            reason = f"site {self.site} failed in round {round_index}: {cause}".splitlines()[0]
        self.mailbox.fail(reason)
        self.mailbox.close(drain_s=5.0)  # the ClientApp waiting now takes the reason to the server before we exit
        self.mailbox = None

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit" or self.mailbox is None:
            return
        try:
            if self.mailbox.stopped is None and self.transport is not None:  # a failed site never gets here
                deliveries = self.transport.deliveries()
                self.mailbox.finish({"site": self.site, "deliveries": deliveries, **self._telemetry()})
                self.mailbox.wait_final_taken(self._comm_timeout)
        finally:
            self.mailbox.close()
            self.mailbox = None
