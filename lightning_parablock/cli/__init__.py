"""The ``parablock`` command: checks before training, the run itself, its output folder and its report."""

from lightning_parablock.cli.command import ParaBlockCLI, main

__all__ = ["ParaBlockCLI", "main"]
