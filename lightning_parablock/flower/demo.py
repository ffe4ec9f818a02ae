"""``parablock flower-demo``: a federation of sites over a real SuperLink and SuperNodes on this machine.

It starts a SuperLink and one SuperNode per site on 127.0.0.1 (insecure: one machine only), one ``parablock fit``
per site (the tiny recipe, its clients split over the sites), and ``flwr run``, and prints the server's line per
round. Each site writes its run (logs, model) under the demo's folder; the server writes the federation's timeline,
which ``parablock report FOLDER/server`` reads. :class:`LocalFederation` is the same thing for the tests and the
benchmark.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from lightning_parablock.flower.local import LocalFlower, end_process_tree

DEFAULT_RECIPE = Path(__file__).parents[2] / "recipes" / "tiny.yaml"
_FIT = "import sys; from lightning_parablock.cli import main; main(sys.argv[1:])"


def site_recipe(
    recipe: dict[str, Any],
    folder: Path,
    site: Optional[int],
    num_sites: int,
    rounds: int,
    num_clients: int,
    comm_timeout: float,
    overrides: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """``recipe`` as site ``site`` of ``num_sites`` runs it (``site=None``: the same federation in one process).

    The modelled link goes (Flower's is real), a ``FlowerSite`` joins the callbacks, rounds, clients and folders are
    set; ``overrides`` maps ``trainer.x``, ``strategy.x``, ``data.x``, ``model.x`` or ``callback.x`` to a value.
    """
    config = copy.deepcopy(recipe)
    name = "single" if site is None else f"site{site}"
    trainer = config.setdefault("trainer", {})
    trainer.update(max_epochs=rounds, default_root_dir=str(folder / name), enable_progress_bar=False)
    if isinstance(trainer.get("logger"), dict):
        trainer["logger"].setdefault("init_args", {})["save_dir"] = str(folder / name)
    callbacks = trainer.setdefault("callbacks", [])
    parablock = next(c for c in callbacks if str(c.get("class_path", "")).endswith("ParaBlockCallback"))
    parablock.setdefault("init_args", {}).pop("link", None)
    parablock["init_args"]["comm_timeout"] = comm_timeout
    if site is not None:
        mailbox = folder / f"s{site}.sock"
        callbacks.append(
            {"class_path": "lightning_parablock.flower.FlowerSite",
             "init_args": {"site": site, "num_sites": num_sites, "mailbox": str(mailbox)}}
        )  # fmt: skip
    trainer["strategy"].setdefault("init_args", {})["num_clients"] = num_clients
    config["output_dir"] = str(folder / name / "model")
    sections = {
        "trainer": trainer,
        "strategy": trainer["strategy"]["init_args"],
        "data": config.get("data", {}).setdefault("init_args", {}),
        "model": config.get("model", {}).setdefault("init_args", {}),
        "callback": parablock["init_args"],
    }
    for key, value in (overrides or {}).items():
        section, _, option = key.partition(".")
        sections[section][option] = value
    return config


@dataclass
class FederationResult:
    """What a local federation did: each site's and the server's exit status and output."""

    folder: Path
    site_codes: list[Optional[int]]
    server_code: Optional[int]
    server_lines: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def site_log(self, site: int) -> str:
        return (self.folder / "flower" / f"site{site}.log").read_text(errors="replace")

    @property
    def timeline(self) -> Path:
        return self.folder / "server" / "parablock_timeline.json"


class LocalFederation:
    """Sites of a recipe, their SuperNodes, a SuperLink and ``flwr run``, all on this machine, in ``folder``.

    Args:
        folder: where everything goes (short: the sites' Unix sockets live here, at most 107 bytes a path).
        recipe: the recipe (a dict as read from YAML) every site runs.
        num_sites, rounds, num_clients, comm_timeout: the federation.
        overrides: per-option changes of the recipe (see :func:`site_recipe`).
        log: where progress and the server's lines go.
    """

    def __init__(
        self,
        folder: Path,
        recipe: dict[str, Any],
        num_sites: int = 2,
        rounds: int = 3,
        num_clients: int = 4,
        comm_timeout: float = 120.0,
        overrides: Optional[dict[str, Any]] = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.folder = Path(folder)
        self.num_sites = num_sites
        self.log = log
        self.comm_timeout = comm_timeout
        self.folder.mkdir(parents=True, exist_ok=True)
        self.configs = []
        for site in range(num_sites):
            config = site_recipe(recipe, self.folder, site, num_sites, rounds, num_clients, comm_timeout, overrides)
            path = self.folder / f"site{site}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            self.configs.append(path)
        self.flower = LocalFlower(self.folder / "flower", log=log)
        self.sites: list[subprocess.Popen] = []
        self.server: Optional[subprocess.Popen] = None
        self.server_lines: list[str] = []
        self._reader: Optional[threading.Thread] = None
        self._started_at = 0.0

    def mailbox(self, site: int) -> Path:
        return self.folder / f"s{site}.sock"

    def start(self) -> "LocalFederation":
        """The SuperLink, the SuperNodes, the sites' trainers, then ``flwr run``; returns at once."""
        self._started_at = time.monotonic()
        self.flower.start_superlink()
        for site in range(self.num_sites):
            mailbox = self.mailbox(site)
            node_config = {"parablock-mailbox": str(mailbox), "parablock-key": f"{mailbox}.key"}
            self.flower.start_supernode(f"supernode{site}", node_config)
        for site in range(self.num_sites):
            self.sites.append(
                self.flower.start(
                    f"site{site}", [sys.executable, "-c", _FIT, "fit", "--config", str(self.configs[site])]
                )
            )
        self.server = self.flower.run_app(
            {"num-sites": self.num_sites, "output-dir": str(self.folder / "server"), "wait-for-sites": 600.0}
        )
        self._reader = threading.Thread(target=self._read_server, daemon=True)
        self._reader.start()
        return self

    def _read_server(self) -> None:
        assert self.server is not None and self.server.stdout is not None
        with open(self.folder / "server.log", "w") as copy_to:
            for line in self.server.stdout:
                copy_to.write(line)
                copy_to.flush()
                if "[parablock]" in line:
                    text = line[line.index("[parablock]") :].rstrip()
                    self.server_lines.append(text)
                    self.log(text)

    def wait(self, timeout_s: float) -> FederationResult:
        """Until the server and every site ended, or ``timeout_s`` passed (then they are ended)."""
        deadline = time.monotonic() + timeout_s
        for process in [*self.sites, self.server]:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        if self._reader is not None:
            self._reader.join(timeout=5)
        return FederationResult(
            self.folder,
            [p.poll() for p in self.sites],
            None if self.server is None else self.server.poll(),
            list(self.server_lines),
            time.monotonic() - self._started_at,
        )

    def kill_site(self, site: int) -> None:
        """SIGKILL site ``site``'s trainer (and what it started): lost without a word."""
        end_process_tree(self.sites[site], grace_s=0.0)

    def stop(self) -> None:
        self.flower.stop()

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: Sequence[str], parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> None:
    """``parablock flower-demo [--rounds N] [--sites N] [--clients N] [--dir DIR] [--recipe PATH]``."""
    parser = parser_class(prog="parablock flower-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recipe", type=Path, default=DEFAULT_RECIPE, help="the recipe every site runs (default: recipes/tiny.yaml)"
    )
    parser.add_argument("--sites", type=int, default=2, help="sites (default: %(default)s)")
    parser.add_argument(
        "--clients", type=int, default=4, help="clients in all, split over the sites (default: %(default)s)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds (default: %(default)s)")
    parser.add_argument("--method", default=None, help="parablock (default: the recipe's) or fedbcd, ...")
    parser.add_argument("--examples", type=int, default=400, help="training examples in all (default: %(default)s)")
    parser.add_argument("--comm_timeout", type=float, default=120.0, help="seconds (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=900.0, help="end everything after this many seconds")
    parser.add_argument("--dir", type=Path, default=None, help="where the demo writes (default: a new folder in /tmp)")
    options = parser.parse_args(list(argv))
    from lightning_parablock.flower.requirement import require_flwr

    try:
        require_flwr()
    except ImportError as error:
        parser.error(str(error))
    if not options.recipe.is_file():
        parser.error(f"--recipe {str(options.recipe)!r} does not exist; pass a recipe such as recipes/tiny.yaml.")
    if options.sites < 1 or options.clients < options.sites or options.rounds < 1:
        parser.error(
            "need --sites >= 1, --clients >= --sites and --rounds >= 1,"
            f" got {options.sites}, {options.clients}, {options.rounds}."
        )
    folder = options.dir or Path(tempfile.mkdtemp(prefix="parablock-flower-", dir="/tmp"))
    recipe = yaml.safe_load(options.recipe.read_text())
    if options.method:
        recipe["method"] = options.method
    print(
        f"parablock flower-demo: {options.sites} sites x {options.clients // options.sites}+ clients, {options.rounds}"
        f" rounds, in {folder}. Everything listens on 127.0.0.1 WITHOUT TLS (--insecure): fine on one machine, never"
        " across a network (see the README for the coordinator with TLS and node authentication).",
        flush=True,
    )
    overrides = {"data.num_examples": options.examples, "data.val_examples": max(16, options.examples // 10)}
    with LocalFederation(
        folder, recipe, options.sites, options.rounds, options.clients, options.comm_timeout, overrides
    ) as federation:
        result = federation.start().wait(options.timeout)
    for site, code in enumerate(result.site_codes):
        summary = [line for line in result.site_log(site).splitlines() if "bytes moved" in line or "error" in line]
        shown = summary[-1].strip() if summary else f"see {folder / 'flower' / f'site{site}.log'}"
        print(f"site {site}: exit status {code}; {shown}")
    print(f"server: exit status {result.server_code}; log {folder / 'server.log'}")
    print(f"the federation's timeline: parablock report {folder / 'server'}  ({result.seconds:.0f}s in all)")
    if result.server_code != 0 or any(code != 0 for code in result.site_codes):
        sys.exit(1)
