"""ParaBlock for PyTorch Lightning: federated block-coordinate fine-tuning with overlapped communication."""

from lightning_parablock.aggregate import Aggregator
from lightning_parablock.blocks import Block, BlockPartition, partition_by_patterns, partition_decoder
from lightning_parablock.callback import ParaBlockCallback
from lightning_parablock.comm import CommunicationError, SimulatedLink
from lightning_parablock.fedcybgd import FedCyBGDStrategy
from lightning_parablock.flora import FLoRAStrategy, StackingAggregator
from lightning_parablock.methods import METHODS, Method, method
from lightning_parablock.compress import BF16Codec, Codec, Int8Codec, TopKCodec
from lightning_parablock.module import CausalLMModule
from lightning_parablock.schedule import BlockSchedule
from lightning_parablock.strategy import FederatedBlockStrategy
from lightning_parablock.timeline import RoundRecord, RunSummary, load_timeline, modelled_wallclock

__version__ = "0.1.0"

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
