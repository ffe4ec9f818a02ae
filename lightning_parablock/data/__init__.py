"""Data for ParaBlock: a local synthetic instruction task, its tokenizer, and federated client splits."""

from lightning_parablock.data.datamodule import SyntheticArithmeticDataModule
from lightning_parablock.data.formatting import IGNORE_INDEX, SFTCollator, format_prompt, tokenize_for_sft
from lightning_parablock.data.partition import dirichlet_partition, iid_partition, label_histogram
from lightning_parablock.data.synthetic import make_arithmetic_dataset
from lightning_parablock.data.tokenizer import CHAR_VOCAB_SIZE, build_char_tokenizer

__all__ = [
    "CHAR_VOCAB_SIZE",
    "IGNORE_INDEX",
    "SFTCollator",
    "SyntheticArithmeticDataModule",
    "build_char_tokenizer",
    "dirichlet_partition",
    "format_prompt",
    "iid_partition",
    "label_histogram",
    "make_arithmetic_dataset",
    "tokenize_for_sft",
]
