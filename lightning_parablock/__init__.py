"""ParaBlock for PyTorch Lightning: federated block-coordinate fine-tuning with overlapped communication."""

from lightning_parablock import _moved
from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.aggregation.stacking import StackingAggregator
from lightning_parablock.callbacks.parablock import ParaBlockCallback
from lightning_parablock.comm.codecs import BF16Codec, Codec, Int8Codec, TopKCodec
from lightning_parablock.comm.exchange import CommunicationError
from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.core.blocks import Block, BlockPartition, partition_by_patterns, partition_decoder
from lightning_parablock.core.schedule import BlockSchedule
from lightning_parablock.methods.registry import METHODS, Method, method
from lightning_parablock.module import CausalLMModule
from lightning_parablock.strategies.fedcybgd import FedCyBGDStrategy
from lightning_parablock.strategies.federated_block import FederatedBlockStrategy
from lightning_parablock.strategies.flora import FLoRAStrategy
from lightning_parablock.telemetry.timeline import RoundRecord, RunSummary, load_timeline, modelled_wallclock

__version__ = "0.1.0"

_moved.install()  # the module paths of before the layers (lightning_parablock.strategy ...), for one more release

__all__ = [
    "Aggregator",
    "BF16Codec",
    "Block",
    "BlockPartition",
    "BlockSchedule",
    "CausalLMModule",
    "Codec",
    "CommunicationError",
    "FLoRAStrategy",
    "FedCyBGDStrategy",
    "FederatedBlockStrategy",
    "METHODS",
    "Method",
    "Int8Codec",
    "ParaBlockCallback",
    "RoundRecord",
    "RunSummary",
    "SimulatedLink",
    "StackingAggregator",
    "TopKCodec",
    "load_timeline",
    "method",
    "modelled_wallclock",
    "partition_by_patterns",
    "partition_decoder",
]
