"""``parablock fit --passes P``: a run's length as passes over the training data instead of rounds.

One epoch is one round, and a round reads ``participants × local_steps × batch × accumulation`` samples, so the
rounds for ``P`` passes depend on the data's size, known only once the data are loaded: the Trainer's
``max_epochs`` is set here, before training, to the fewest rounds that read the data ``P`` times.
"""

from __future__ import annotations

from typing import Any

from lightning import LightningDataModule, Trainer

from lightning_parablock.core.run_length import passes_over_data
from lightning_parablock.strategies.federated_block import FederatedBlockStrategy


def set_rounds_for_passes(trainer: Trainer, datamodule: LightningDataModule, passes: float) -> str:
    """Set ``trainer``'s ``max_epochs`` to the rounds that read ``datamodule``'s training data ``passes`` times;
    the note that says so. ``ValueError`` when the run's length is set otherwise or the data's size is unknown."""
    strategy = trainer.strategy
    if not isinstance(strategy, FederatedBlockStrategy):
        raise ValueError(f"`--passes` needs a FederatedBlockStrategy, got {type(strategy).__name__}.")
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        raise ValueError(
            f"`--passes {passes}` sets the run's length, and so does `trainer.max_steps={trainer.max_steps}`: give one"
            " of them (`--trainer.max_steps -1` to drop the config's)."
        )
    loader = _train_loader(datamodule)
    num_samples, batch_size = len(loader.dataset), loader.batch_size
    accumulate = trainer.accumulate_grad_batches
    rounds = strategy.rounds_for_passes(passes, num_samples, batch_size, accumulate)
    trainer.fit_loop.max_epochs = rounds
    per_round = strategy.samples_per_round(batch_size, accumulate)
    return (
        f"--passes {passes:g} over {num_samples:,} training samples at {per_round:,} per round: trainer.max_epochs="
        f"{rounds} ({passes_over_data(rounds, per_round, num_samples):.2f} passes)"
    )


def _train_loader(datamodule: Any) -> Any:
    """The training loader of a datamodule whose data are loaded, with a sized dataset and a batch size."""
    try:
        loader = datamodule.train_dataloader()
        len(loader.dataset)
    except Exception as error:  # noqa: BLE001 - any reason the size is unknown gets the same way out
        raise ValueError(
            f"`--passes` needs the size of the training data before fit, which this datamodule does not give"
            f" ({type(error).__name__}: {error}); set the rounds with `--trainer.max_epochs` instead."
        ) from None
    if not loader.batch_size:
        raise ValueError(
            "`--passes` needs a training DataLoader with a `batch_size`; set `--trainer.max_epochs` instead."
        )
    return loader
