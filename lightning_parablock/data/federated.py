"""Instruction data split across simulated clients: the datamodule that ``FederatedBlockStrategy`` reads.

The strategy takes the train ``DataLoader`` (a map-style dataset and a batch size) and asks
:meth:`FederatedDataModule.client_partition` which rows each client owns. Everything a paper's data setting
needs (which dataset, which prompt template, how skewed the clients are) is an argument here, so a recipe
states it in YAML.
"""

import math
import warnings
from dataclasses import asdict, replace
from typing import Any, Literal, Optional, Union, get_args

import lightning as L
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_parablock.argument_checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_optional_int,
    check_optional_text,
    check_positive,
)
from lightning_parablock.data.chat import MESSAGES
from lightning_parablock.data.formatting import SFTCollator
from lightning_parablock.data.loading import INPUT, INSTRUCTION, DataSource, load_examples
from lightning_parablock.data.packing import PackedCollator, PackedDataset
from lightning_parablock.data.partition import (
    cluster_labels,
    dirichlet_partition,
    format_partition_table,
    iid_partition,
    natural_partition,
    partition_with_flwr,
)
from lightning_parablock.data.plot import plot_partition
from lightning_parablock.data.prompts import PromptFormat, check_prompt_format
from lightning_parablock.data.sft_dataset import TokenizationReport, tokenize_dataset
from lightning_parablock.data.tokenizer import load_tokenizer

try:  # optional: flwr-datasets pins an older `datasets`, so it is not a dependency
    from flwr_datasets.partitioner import Partitioner
except ImportError:
    Partitioner = Any

PartitionKind = Literal["iid", "dirichlet", "natural", "cluster"]
PARTITION_KINDS: tuple[str, ...] = get_args(PartitionKind)


class NoEvaluationData(list):
    """No validation or test set: an empty list of loaders, for which Lightning runs nothing.

    A type of its own so that the warning Lightning gives about any loader of zero length ("Total length of
    `NoEvaluationData` across ranks is zero"), meant for a loader that came out empty by mistake, is filtered for
    this intended emptiness alone. The filter is (re)installed whenever one is made, not once at import: a test
    runner or a user's ``warnings.catch_warnings`` restores the filters it found.
    """

    def __init__(self) -> None:
        super().__init__()
        warnings.filterwarnings("ignore", message=r"Total length of `NoEvaluationData` across ranks is zero")


class FederatedDataModule(L.LightningDataModule):
    """Instruction data from the Hub or local files, prompt-masked, split across federated clients.

    Args:
        dataset: The training data, e.g. ``{path: vicgalle/alpaca-gpt4}``, a chat set with a ``messages`` or
            ShareGPT ``conversations`` column (rendered with the tokenizer's chat template, the loss on every
            assistant turn), ``{path: TIGER-Lab/MathInstruct,
            max_examples: 50000}`` or ``{data_files: my.jsonl, columns: {instruction: question, output: answer}}``.
        tokenizer: A name or folder for ``AutoTokenizer.from_pretrained``, or a tokenizer object.
        val_split: A split of ``dataset`` to validate on (e.g. ``test``); the global model's held-out loss.
        val_fraction: Else, the fraction of ``dataset`` held out (seeded) to validate on; 0 for none.
        eval_dataset: A held-out evaluation set, e.g. ``{path: openai/gsm8k, split: test}``: the test loader,
            and its raw rows as :attr:`eval_examples` for generation-based metrics.
        prompt_format: ``alpaca_lora`` (Alpaca-LoRA's template), ``stanford_alpaca`` (Stanford Alpaca's),
            ``question_answer`` (``Question: ...\nAnswer: ...``), ``chat`` (the tokenizer's chat template) or
            ``auto`` (chat when the tokenizer has a template); see :mod:`~lightning_parablock.data.prompts`. Evaluate
            in the same format. The loss never covers prompt tokens.
        max_length: Longest tokenized example; longer ones are cut from the right and counted. With ``packing``,
            the length of a packed row too.
        packing: Pack several short training examples into each row (position ids restart, attention never
            crosses examples, loss masking unchanged; see :mod:`~lightning_parablock.data.packing`), each client's
            shard on its own. Validation and test rows stay one example each. A client's sample count is then its
            number of packed rows.
        batch_size: Examples per batch (per client step, before gradient accumulation).
        eval_batch_size: Examples per validation/test batch; ``batch_size`` by default.
        partition: How clients split the training set: ``iid``; ``dirichlet`` (label skew with concentration
            ``alpha`` over ``label_column``); ``natural`` (one client per value of ``label_column``); ``cluster``
            (``dirichlet`` over ``num_clusters`` TF-IDF k-means clusters of the raw instructions and inputs, or of a
            conversation's user turns, stop words removed, for unlabeled text). Every split is drawn over the rows
            before tokenizing; rows dropped for length then leave their client, so a file, seed and ``num_clients``
            give the same split whatever the tokenizer or ``max_length``.
        alpha: Dirichlet concentration; small is skewed (0.1), large approaches iid.
        label_column: The data's column that ``dirichlet`` and ``natural`` split by (MathInstruct: ``source``, the
            preset's default).
        num_clusters: Topic clusters for ``cluster``.
        min_partition_size: Fewest examples a Dirichlet draw may give a client before it is redrawn.
        partitioner: A flwr-datasets ``Partitioner`` (needs ``flwr-datasets``); replaces ``partition``. It sees
            the training rows in the common schema plus the data's other columns.
        partition_plot: Write a clients × labels heatmap PNG of the split here.
        num_workers: DataLoader worker processes.
        num_proc: Processes for tokenizing with ``datasets.map``.
        cache_dir: The ``datasets`` cache; its default otherwise.
        seed: Seeds sampling, the validation hold-out, clustering and the partition.
    """

    def __init__(
        self,
        dataset: DataSource,
        tokenizer: Union[str, PreTrainedTokenizerBase],
        val_split: Optional[str] = None,
        val_fraction: float = 0.0,
        eval_dataset: Optional[DataSource] = None,
        prompt_format: PromptFormat = "alpaca_lora",
        max_length: int = 512,
        packing: bool = False,
        batch_size: int = 4,
        eval_batch_size: Optional[int] = None,
        partition: PartitionKind = "iid",
        alpha: float = 0.5,
        label_column: Optional[str] = None,
        num_clusters: int = 10,
        min_partition_size: int = 1,
        partitioner: Optional[Partitioner] = None,
        partition_plot: Optional[str] = None,
        num_workers: int = 0,
        num_proc: Optional[int] = None,
        cache_dir: Optional[str] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_choice("partition", partition, PARTITION_KINDS)
        check_float("val_fraction", val_fraction, minimum=0.0, maximum=1.0, max_open=True)
        if val_split is not None and val_fraction > 0:
            raise ValueError(f"Pass either `val_split` ({val_split!r}) or `val_fraction` ({val_fraction}), not both.")
        check_positive("alpha", alpha)
        check_prompt_format(prompt_format)
        for name, value in (("max_length", max_length), ("batch_size", batch_size), ("num_clusters", num_clusters)):
            check_int(name, value, minimum=1)
        check_optional_int("eval_batch_size", eval_batch_size, minimum=1)
        check_int("min_partition_size", min_partition_size, minimum=0)
        check_int("num_workers", num_workers, minimum=0)
        check_optional_int("num_proc", num_proc, minimum=1)
        check_int("seed", seed, minimum=0)
        check_bool("packing", packing)
        check_optional_text("label_column", label_column, "a column name of the data")
        check_optional_text("partition_plot", partition_plot, "a path for the PNG heatmap")
        # Checkpoints and hparams.yaml hold the sources as plain dicts; they come back as dicts.
        dataset = DataSource(**dataset) if isinstance(dataset, dict) else dataset
        eval_dataset = DataSource(**eval_dataset) if isinstance(eval_dataset, dict) else eval_dataset
        for name, source in (("dataset", dataset), ("eval_dataset", eval_dataset)):
            if source is not None and not isinstance(source, DataSource):
                raise TypeError(
                    f"`{name}` must be a DataSource (or a dict of its fields), e.g."
                    f" `DataSource(data_files='train.jsonl')`, got {source!r}."
                )
        self.save_hyperparameters(ignore=["tokenizer", "partitioner"])
        self.hparams.dataset = asdict(dataset)
        self.hparams.eval_dataset = asdict(eval_dataset) if eval_dataset is not None else None
        if isinstance(tokenizer, str):
            self.hparams.tokenizer = tokenizer
        self.source = dataset
        self.eval_source = eval_dataset
        self.tokenizer = load_tokenizer(tokenizer)
        self.partitioner = partitioner

        self.train_dataset: Optional[Dataset] = None
        self.packed_train: Optional[PackedDataset] = None
        """With ``packing``: the rows the train loader reads, repacked per client by :meth:`client_partition`."""
        self.val_dataset: Optional[Dataset] = None
        self.test_dataset: Optional[Dataset] = None
        self.train_examples: Optional[Dataset] = None
        """The training rows in the common schema, aligned with ``train_dataset``."""
        self._untokenized_train: Optional[Dataset] = None
        """The training rows before tokenizing dropped any: what every partition is drawn over."""
        self.eval_examples: Optional[Dataset] = None
        """The held-out rows in the common schema, aligned with ``test_dataset``: for generation-based metrics."""
        self.reports: dict[str, TokenizationReport] = {}
        """Per split (``train``, ``val``, ``test``): examples, how many were truncated, how many dropped."""
        self.client_indices: Optional[list[list[int]]] = None
        self.partition_table: Optional[str] = None
        self._labels: Optional[list[Any]] = None
        self._flwr_parts: Optional[list[list[int]]] = None

    # ------------------------------------------------------------------ data

    def prepare_data(self) -> None:
        """Download every source once (on one process); :meth:`setup` then reads the ``datasets`` cache."""
        for source in self._sources().values():
            load_examples(source, self.hparams.seed, self.hparams.cache_dir)

    def _sources(self) -> dict[str, DataSource]:
        sources = {"train": self.source}
        if self.hparams.val_split is not None:
            sources["val"] = replace(self.source, split=self.hparams.val_split, max_examples=None)
        if self.eval_source is not None:
            sources["test"] = self.eval_source
        return sources

    def setup(self, stage: Optional[str] = None) -> None:
        """Load, hold out, format and tokenize every split once; later calls are no-ops."""
        if self.train_dataset is not None:
            return
        hparams = self.hparams
        sources = self._sources()
        examples = {name: load_examples(s, hparams.seed, hparams.cache_dir) for name, s in sources.items()}
        if hparams.val_fraction > 0:
            rows = len(examples["train"])
            if math.ceil(hparams.val_fraction * rows) >= rows:  # how `train_test_split` sizes the held-out part
                raise ValueError(
                    f"`val_fraction={hparams.val_fraction}` holds out all {rows} example(s) of"
                    f" {self.source.describe()}, leaving none to train on; use a val_fraction of at most"
                    f" {rows - 1}/{rows}, or more data."
                )
            held_out = examples["train"].train_test_split(test_size=hparams.val_fraction, seed=hparams.seed)
            examples["train"], examples["val"] = held_out["train"], held_out["test"]
        tokenized = {}
        for split, rows in examples.items():
            where = sources.get(split, self.source).describe()  # a held-out fraction comes from the training data
            tokenized[split], report = tokenize_dataset(
                rows, self.tokenizer, hparams.max_length, hparams.prompt_format, split, hparams.num_proc, where
            )
            self.reports[split] = report
            if split == "train":
                self._untokenized_train = rows
            examples[split] = rows.select(report.kept) if report.dropped else rows
            rank_zero_info(f"[FederatedDataModule] {report.format()}")
        self.train_examples, self.eval_examples = examples["train"], examples.get("test")
        self.train_dataset, self.val_dataset, self.test_dataset = (
            tokenized["train"],
            tokenized.get("val"),
            tokenized.get("test"),
        )
        if len(self.train_dataset) == 0:
            raise ValueError(
                f"No training example of {self.source.describe()} is left after tokenizing with"
                f" max_length={hparams.max_length}; raise `max_length`."
            )
        if hparams.packing:
            self.packed_train = PackedDataset(self.train_dataset, hparams.max_length)

    @property
    def packing(self) -> bool:
        """Whether training rows are packed: ``CausalLMModule`` then checks at fit start that its model keeps
        packed examples apart."""
        return self.hparams.packing

    @property
    def num_samples(self) -> int:
        """Number of training examples, the set that :meth:`client_partition` splits."""
        self.setup()
        return len(self.train_dataset)

    # ------------------------------------------------------------- partition

    def labels(self) -> Optional[list[Any]]:
        """The label of every training example the partition skews by: the cluster id for ``cluster``, the
        ``label_column`` value otherwise (``None`` for an iid split of data without one)."""
        untokenized = self._untokenized_labels()
        if untokenized is None:
            return None
        return [untokenized[row] for row in self.reports["train"].kept]

    def _untokenized_labels(self) -> Optional[list[Any]]:
        """The labels of the training rows before tokenizing, which the partition is drawn over."""
        self.setup()
        if self._labels is None:
            rows = self._untokenized_train
            if self.hparams.partition == "cluster":
                texts = self._cluster_texts(rows)
                self._labels = cluster_labels(texts, self.hparams.num_clusters, self.hparams.seed)
            else:
                self._labels = self._column_labels(rows)
        return self._labels

    @staticmethod
    def _cluster_texts(rows: Dataset) -> list[str]:
        """What clustering reads: every user turn of a conversation, else the instruction and its input."""
        if MESSAGES in rows.column_names:
            return [" ".join(t["content"] for t in turns if t["role"] == "user") for turns in rows[MESSAGES]]
        return [f"{instruction} {input}" for instruction, input in zip(rows[INSTRUCTION], rows[INPUT])]

    def _label_column(self) -> Optional[str]:
        preset = self.source.preset
        return self.hparams.label_column or (preset.label_column if preset else None)

    def _label_name(self) -> str:
        return "cluster" if self.hparams.partition == "cluster" else str(self._label_column())

    def _column_labels(self, rows: Dataset) -> Optional[list[Any]]:
        column = self._label_column()
        available = rows.column_names
        needs_labels = self.hparams.partition in ("dirichlet", "natural")
        if column is None:
            if needs_labels:
                raise ValueError(
                    f"`partition={self.hparams.partition!r}` splits by a label: set `label_column` to one of the"
                    f" columns {available}, or use `partition='cluster'` for unlabeled text."
                )
            return None
        if column not in available:
            raise ValueError(
                f"`label_column={column!r}` is not a column of {self.source.describe()}; its columns are {available}."
            )
        return list(rows[column])

    def client_partition(self, num_clients: int) -> list[list[int]]:
        """Indices into the training set for each client, covering every example once; prints the split. With
        ``packing``, indices of the packed rows the train loader reads, each client's examples packed on their own.

        The split is drawn over the training rows before tokenizing; a row tokenizing dropped leaves its client.
        """
        self.setup()
        rows = self._untokenized_parts(num_clients)
        position = {row: index for index, row in enumerate(self.reports["train"].kept)}
        parts = [[position[row] for row in part if row in position] for part in rows]
        labels = self.labels()
        empty = [client for client, part in enumerate(parts) if not part]
        if empty:
            raise ValueError(
                f"Client(s) {empty} of {num_clients} got no training example from the {self._partition_name()}"
                " partition; every client needs data. Use fewer clients or a less skewed split."
            )
        self.client_indices = parts
        self.partition_table = format_partition_table(parts, labels)
        name = self._partition_name()
        rank_zero_info(f"[FederatedDataModule] {name} split of {self.num_samples} examples:\n{self.partition_table}")
        if self.hparams.partition_plot is not None and labels is not None:
            title = f"{name} split"
            plot_partition(parts, labels, self.hparams.partition_plot, title=title, label_name=self._label_name())
        if self.packed_train is not None:
            return self.packed_train.pack_shards(parts)
        return parts

    def _untokenized_parts(self, num_clients: int) -> list[list[int]]:
        """Each client's rows among the training rows before tokenizing."""
        hparams = self.hparams
        labels = self._untokenized_labels()
        if self.partitioner is not None:
            return self._flwr_partition(num_clients)
        if hparams.partition == "iid":
            return iid_partition(len(self._untokenized_train), num_clients, hparams.seed)
        if hparams.partition == "natural":
            return natural_partition(labels, num_clients)
        return dirichlet_partition(labels, num_clients, hparams.alpha, hparams.seed, hparams.min_partition_size)

    def _partition_name(self) -> str:
        if self.partitioner is not None:
            return type(self.partitioner).__name__
        if self.hparams.partition in ("dirichlet", "cluster"):
            return f"{self.hparams.partition}(alpha={self.hparams.alpha})"
        return self.hparams.partition

    def _flwr_partition(self, num_clients: int) -> list[list[int]]:
        """The partitioner's split, computed once: a Flower partitioner takes its dataset only once."""
        if not hasattr(self.partitioner, "load_partition"):
            raise ValueError(
                f"`partitioner` must be a flwr-datasets Partitioner (pip install flwr-datasets), got"
                f" {self.partitioner!r}."
            )
        if self._flwr_parts is None:
            self._flwr_parts = partition_with_flwr(self.partitioner, self._untokenized_train)
        if len(self._flwr_parts) != num_clients:
            raise ValueError(
                f"The partitioner makes {len(self._flwr_parts)} partitions but the federation has"
                f" num_clients={num_clients}; give it `num_partitions={num_clients}`."
            )
        return self._flwr_parts

    # ------------------------------------------------------------ dataloaders

    def train_dataloader(self) -> DataLoader:
        self.setup()
        if self.packed_train is not None:
            return DataLoader(
                self.packed_train,
                batch_size=self.hparams.batch_size,
                shuffle=False,
                num_workers=self.hparams.num_workers,
                collate_fn=PackedCollator(self.tokenizer.pad_token_id),
            )
        return self._loader(self.train_dataset, self.hparams.batch_size)

    def val_dataloader(self) -> Union[DataLoader, list]:
        """The held-out loss loader; an empty list (no validation) when there is no validation set."""
        self.setup()
        if self.val_dataset is None:
            return NoEvaluationData()
        return self._loader(self.val_dataset, self._eval_batch_size)

    def test_dataloader(self) -> Union[DataLoader, list]:
        """The ``eval_dataset`` loader; an empty list when there is none."""
        self.setup()
        if self.test_dataset is None:
            return NoEvaluationData()
        return self._loader(self.test_dataset, self._eval_batch_size)

    @property
    def _eval_batch_size(self) -> int:
        return self.hparams.eval_batch_size or self.hparams.batch_size

    def _loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.hparams.num_workers,
            collate_fn=SFTCollator(self.tokenizer.pad_token_id),
        )
