"""The ServerApp: runs the federation's rounds (:mod:`lightning_parablock.flower.server`) where the SuperLink runs.

The coordinator installs ``lightning_parablock[flower]`` (the server aggregates with the library's own aggregator,
so its result is bit-identical to a single process's); the sites' SuperNodes never import this module.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from lightning_parablock.flower.server import FederationServer, ServerSettings

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    FederationServer(grid, ServerSettings.from_run_config(context.run_config)).run()
