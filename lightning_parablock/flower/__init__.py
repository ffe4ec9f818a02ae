"""ParaBlock across organizations: a Flower transport that keeps the overlap.

Each site runs its own long-lived trainer with :class:`~.site.FlowerSite` next to a Flower SuperNode; the
coordinator runs the SuperLink, and ``flwr run`` starts the server (:mod:`.server`), which runs the staleness
pipeline and aggregates with the library's own aggregator. Flower is an optional extra:
``pip install 'lightning_parablock[flower]'`` (Python >= 3.11). ``parablock flower-demo`` runs two sites on this
machine.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """``FlowerSite`` on first use (``lightning_parablock.flower.FlowerSite`` in a recipe), so that the server and
    the tests import the parts they need without the site's."""
    if name == "FlowerSite":
        from lightning_parablock.flower.site import FlowerSite

        return FlowerSite
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FlowerSite"]
