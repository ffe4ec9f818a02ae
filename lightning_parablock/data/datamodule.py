"""The synthetic arithmetic task as a LightningDataModule that also knows how to split itself across clients."""

import hashlib
from collections.abc import Sequence
from typing import Literal, Optional, get_args

import lightning as L
from datasets import Dataset
from torch.utils.data import DataLoader

from lightning_parablock.argument_checks import check_choice, check_int, check_positive
from lightning_parablock.data.formatting import SFTCollator, tokenize_for_sft
from lightning_parablock.data.partition import dirichlet_partition, iid_partition
from lightning_parablock.data.prompts import format_prompt
from lightning_parablock.data.synthetic import PROBLEM_KINDS, check_kinds, make_arithmetic_dataset
from lightning_parablock.data.tokenizer import build_char_tokenizer

SyntheticPartition = Literal["iid", "dirichlet"]


class SyntheticArithmeticDataModule(L.LightningDataModule):
    """Alpaca-formatted, prompt-masked arithmetic problems tokenized with the local character tokenizer.

    The train loader is a plain sequential ``DataLoader``: the federated strategy swaps in its own sampler,
    drawing each client's batches from :meth:`client_partition`.

    Args:
        num_examples: Training examples.
        val_examples: Validation examples, drawn after the training ones from the same seeded stream.
        batch_size: Examples per batch, for both loaders.
        max_length: Longest tokenized sequence; an example that would be cut raises in :meth:`setup`.
        partition: How :meth:`client_partition` splits the training set: ``"iid"`` or ``"dirichlet"``
            (label skew over the problem kind, the ``source`` column).
        alpha: Dirichlet concentration; smaller means more skewed clients. Only used with ``"dirichlet"``.
        seed: Seeds both the data and the partition.
        kinds: Which problem kinds to draw from (``source`` values; see
            :mod:`~lightning_parablock.data.synthetic`); by default the five of the original task.
    """

    def __init__(
        self,
        num_examples: int = 4000,
        val_examples: int = 200,
        batch_size: int = 8,
        max_length: int = 48,
        partition: SyntheticPartition = "dirichlet",
        alpha: float = 0.5,
        seed: int = 0,
        kinds: Sequence[str] = tuple(PROBLEM_KINDS),
    ) -> None:
        super().__init__()
        check_kinds(kinds)
        kinds = tuple(kinds)
        check_int("num_examples", num_examples, minimum=1)
        check_int("val_examples", val_examples, minimum=0)
        check_int("batch_size", batch_size, minimum=1)
        check_int("max_length", max_length, minimum=1)
        check_choice("partition", partition, get_args(SyntheticPartition))
        check_positive("alpha", alpha)
        check_int("seed", seed, minimum=0)
        self.save_hyperparameters()
        self.tokenizer = build_char_tokenizer()
        self.train_dataset: Optional[Dataset] = None
        self.val_dataset: Optional[Dataset] = None
        self._train_sources: list[str] = []

    def setup(self, stage: Optional[str] = None) -> None:
        """Build and tokenize both splits once; later calls are no-ops."""
        if self.train_dataset is not None:
            return
        hparams = self.hparams
        raw = make_arithmetic_dataset(hparams.num_examples + hparams.val_examples, hparams.seed, hparams.kinds)
        kinds = hashlib.sha256(",".join(hparams.kinds).encode()).hexdigest()[:12]  # datasets allows 64 characters
        sizes = f"{hparams.num_examples}-{hparams.val_examples}-{hparams.seed}-{hparams.max_length}"
        tokenized = raw.map(self._tokenize, remove_columns=raw.column_names, new_fingerprint=f"sft-{sizes}-{kinds}")
        self._check_not_truncated(raw, tokenized)
        indices = list(range(len(tokenized)))
        self.train_dataset = tokenized.select(indices[: hparams.num_examples])
        self.val_dataset = tokenized.select(indices[hparams.num_examples :])
        self._train_sources = list(raw["source"])[: hparams.num_examples]

    def _tokenize(self, example: dict[str, str]) -> dict[str, list[int]]:
        prompt = format_prompt(example["instruction"])
        return tokenize_for_sft(prompt, example["output"], self.tokenizer, self.hparams.max_length)

    def _check_not_truncated(self, raw: Dataset, tokenized: Dataset) -> None:
        for index, labels in enumerate(tokenized["labels"]):
            if labels[-1] != self.tokenizer.eos_token_id:
                raise ValueError(
                    f"`max_length={self.hparams.max_length}` cuts off the response of example {index}"
                    f" ({raw[index]['instruction']!r}); raise `max_length` so every response and its eos fit."
                )

    @property
    def num_samples(self) -> int:
        """Number of training examples, the set that :meth:`client_partition` splits."""
        self.setup()
        return len(self.train_dataset)

    def client_partition(self, num_clients: int) -> list[list[int]]:
        """Indices into the training set for each client, covering every example exactly once."""
        self.setup()
        if self.hparams.partition == "iid":
            return iid_partition(len(self.train_dataset), num_clients, self.hparams.seed)
        return dirichlet_partition(self._train_sources, num_clients, self.hparams.alpha, self.hparams.seed)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_dataset)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_dataset)

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=False,
            collate_fn=SFTCollator(self.tokenizer.pad_token_id),
        )
