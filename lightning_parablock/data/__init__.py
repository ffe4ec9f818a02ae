"""Data for ParaBlock: instruction datasets from the Hub or local files, prompt-masked tokenization, federated
client splits and their pictures, and a local synthetic task with its tokenizer."""

from lightning_parablock.data.datamodule import SyntheticArithmeticDataModule
from lightning_parablock.data.federated import FederatedDataModule
from lightning_parablock.data.formatting import IGNORE_INDEX, SFTCollator, tokenize_for_sft
from lightning_parablock.data.loading import PRESETS, DataSource, load_examples
from lightning_parablock.data.partition import (
    cluster_labels,
    dirichlet_partition,
    format_partition_table,
    iid_partition,
    label_histogram,
    natural_partition,
    partition_with_flwr,
)
from lightning_parablock.data.plot import plot_partition
from lightning_parablock.data.prompts import (
    PROMPT_FORMATS,
    PromptFormat,
    conversation_prompt,
    format_prompt,
    stop_strings,
)
from lightning_parablock.data.sft_dataset import TokenizationReport, tokenize_dataset
from lightning_parablock.data.synthetic import make_arithmetic_dataset
from lightning_parablock.data.tokenizer import CHAR_VOCAB_SIZE, build_char_tokenizer, load_tokenizer

__all__ = [
    "CHAR_VOCAB_SIZE",
    "IGNORE_INDEX",
    "PRESETS",
    "PROMPT_FORMATS",
    "PromptFormat",
    "DataSource",
    "FederatedDataModule",
    "SFTCollator",
    "SyntheticArithmeticDataModule",
    "TokenizationReport",
    "build_char_tokenizer",
    "cluster_labels",
    "conversation_prompt",
    "dirichlet_partition",
    "format_partition_table",
    "format_prompt",
    "iid_partition",
    "label_histogram",
    "load_examples",
    "load_tokenizer",
    "make_arithmetic_dataset",
    "natural_partition",
    "partition_with_flwr",
    "plot_partition",
    "stop_strings",
    "tokenize_dataset",
    "tokenize_for_sft",
]
