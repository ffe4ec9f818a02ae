"""Flower is an optional extra: choosing the Flower transport without it says what to install."""

from __future__ import annotations

import importlib.metadata
import sys

FLWR_SPEC = ">=1.42,<1.43"
INSTALL = "pip install 'lightning_parablock[flower]'"


def require_flwr() -> str:
    """The installed flwr version; an ImportError saying what to install when it is missing or another minor."""
    if sys.version_info < (3, 11):
        raise ImportError(
            f"The Flower transport needs Python >= 3.11 (flwr 1.42 does), this is {sys.version.split()[0]}."
        )
    try:
        version = importlib.metadata.version("flwr")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"The Flower transport needs flwr{FLWR_SPEC}: {INSTALL}") from None
    if not version.startswith("1.42."):
        raise ImportError(
            f"The Flower transport is built and tested against flwr{FLWR_SPEC}, found flwr {version}: {INSTALL}"
        )
    return version
