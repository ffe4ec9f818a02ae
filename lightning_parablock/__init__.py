"""ParaBlock for PyTorch Lightning: federated block-coordinate fine-tuning with overlapped communication.

The public names below are imported on first use, so ``import lightning_parablock.core`` (torch only) or the
``parablock`` command's start-up do not pay for Lightning, transformers and peft before they need them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from lightning_parablock import _moved

_moved.install()  # the module paths of before the layers (lightning_parablock.strategy ...), for one more release

_HOME = {
    "Aggregator": "lightning_parablock.aggregation.aggregator",
    "MeanAggregator": "lightning_parablock.aggregation.mean",
    "MedianAggregator": "lightning_parablock.aggregation.median",
    "TrimmedMeanAggregator": "lightning_parablock.aggregation.trimmed_mean",
    "StackingAggregator": "lightning_parablock.aggregation.stacking",
    "ParaBlockCallback": "lightning_parablock.callbacks.parablock",
    "BF16Codec": "lightning_parablock.comm.codecs",
    "Codec": "lightning_parablock.comm.codecs",
    "Int8Codec": "lightning_parablock.comm.codecs",
    "TopKCodec": "lightning_parablock.comm.codecs",
    "CommunicationError": "lightning_parablock.comm.transport",
    "ByProcesses": "lightning_parablock.comm.by_processes",
    "TransportChoice": "lightning_parablock.comm.transport",
    "SimulatedLink": "lightning_parablock.comm.link",
    "Block": "lightning_parablock.core.blocks",
    "BlockPartition": "lightning_parablock.core.blocks",
    "partition_by_patterns": "lightning_parablock.core.blocks",
    "partition_decoder": "lightning_parablock.core.blocks",
    "BlockSchedule": "lightning_parablock.core.schedule",
    "METHODS": "lightning_parablock.methods.registry",
    "Method": "lightning_parablock.methods.registry",
    "method": "lightning_parablock.methods.registry",
    "CausalLMModule": "lightning_parablock.module",
    "ExchangeSpec": "lightning_parablock.strategies.exchange_spec",
    "FedCyBGDStrategy": "lightning_parablock.strategies.fedcybgd",
    "FederatedBlockStrategy": "lightning_parablock.strategies.federated_block",
    "FLoRAStrategy": "lightning_parablock.strategies.flora",
    "RoundRecord": "lightning_parablock.telemetry.timeline",
    "RunSummary": "lightning_parablock.telemetry.timeline",
    "load_timeline": "lightning_parablock.telemetry.timeline",
    "modelled_wallclock": "lightning_parablock.telemetry.timeline",
}

__version__ = "0.1.0"
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'lightning_parablock' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))


_LIGHTNING_FACING = "lightning_parablock.callbacks.parablock"
"""Importing it registers ``Trainer(strategy="federated_block")`` and makes ``ParaBlockCallback`` a known
``Callback`` subclass (LightningCLI's short forms): what ``import lightning_parablock`` did before its names were
lazy, done as soon as Lightning itself is loaded."""


class _WhenLightningLoads(importlib.abc.MetaPathFinder):
    """Imports :data:`_LIGHTNING_FACING` right after ``lightning.pytorch`` has loaded, whichever comes first."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "lightning.pytorch":
            return None
        sys.meta_path.remove(self)  # the real spec, from the other finders
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            load(module)
            if not _part_of_the_package_is_loading():  # that import brings what it needs, and registers later
                importlib.import_module(_LIGHTNING_FACING)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _part_of_the_package_is_loading() -> bool:
    """Whether a module of this package is being imported right now (Lightning loads from inside it): importing
    the callback then would find that module half made."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name.startswith(f"{__name__}.")
    )


if "lightning.pytorch" in sys.modules:
    importlib.import_module(_LIGHTNING_FACING)
elif not any(isinstance(finder, _WhenLightningLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _WhenLightningLoads())


if TYPE_CHECKING:
    from lightning_parablock.aggregation.aggregator import Aggregator
    from lightning_parablock.aggregation.mean import MeanAggregator
    from lightning_parablock.aggregation.median import MedianAggregator
    from lightning_parablock.aggregation.stacking import StackingAggregator
    from lightning_parablock.aggregation.trimmed_mean import TrimmedMeanAggregator
    from lightning_parablock.callbacks.parablock import ParaBlockCallback
    from lightning_parablock.comm.by_processes import ByProcesses
    from lightning_parablock.comm.codecs import BF16Codec, Codec, Int8Codec, TopKCodec
    from lightning_parablock.comm.link import SimulatedLink
    from lightning_parablock.comm.transport import CommunicationError, TransportChoice
    from lightning_parablock.core.blocks import Block, BlockPartition, partition_by_patterns, partition_decoder
    from lightning_parablock.core.schedule import BlockSchedule
    from lightning_parablock.methods.registry import METHODS, Method, method
    from lightning_parablock.module import CausalLMModule
    from lightning_parablock.strategies.exchange_spec import ExchangeSpec
    from lightning_parablock.strategies.fedcybgd import FedCyBGDStrategy
    from lightning_parablock.strategies.federated_block import FederatedBlockStrategy
    from lightning_parablock.strategies.flora import FLoRAStrategy
    from lightning_parablock.telemetry.timeline import RoundRecord, RunSummary, load_timeline, modelled_wallclock
