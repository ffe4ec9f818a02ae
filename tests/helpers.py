"""Run a toy federation through Lightning and through the plain-PyTorch reference on the same plan."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch
from lightning import Trainer
from reference_parablock import RoundSpec, run_reference
from torch.utils.data import default_collate
from toy import ToyModule, toy_dataset, toy_loader, toy_loss

from lightning_parablock import FederatedBlockStrategy, MeanAggregator, ParaBlockCallback

TINY_RECIPE = Path(__file__).parents[1] / "recipes" / "tiny.yaml"


def tiny_recipe_args(tmp_path: Path, *extra: str, output_dir: Optional[Path] = None) -> list[str]:
    """CLI arguments (after the subcommand) of the tiny recipe cut to 2 rounds of 64 examples, in ``tmp_path``."""
    return [
        "--config", str(TINY_RECIPE),
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.max_epochs", "2",
        "--data.init_args.num_examples", "64",
        "--data.init_args.val_examples", "16",
        "--output_dir", "null" if output_dir is None else str(output_dir),
        *extra,
    ]  # fmt: skip


def slurm_variables(rank: int = 0, tasks: int = 1) -> dict[str, str]:
    """What srun sets for one of ``tasks`` processes of job 4242 on this machine (SLURMEnvironment reads them)."""
    return {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "parablock", "SLURM_NODELIST": "127.0.0.1", "SLURM_NODEID": "0",
        "SLURM_NTASKS": str(tasks), "SLURM_NTASKS_PER_NODE": str(tasks), "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
    }  # fmt: skip


def quiet_trainer(**kwargs: Any) -> Trainer:
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


def lightning_and_reference(
    staleness: int,
    num_clients: int,
    optimizer: str = "sgd",
    rounds: int = 4,
    local_steps: int = 2,
    accumulate: int = 1,
    clients_per_round: Optional[int] = None,
    weighting: str = "uniform",
    global_lr: float = 1.0,
    schedule: str = "random",
    dataset=None,
    extra_callbacks=(),
    lr_options: Optional[dict[str, Any]] = None,
    lr_factor=None,
):
    """Train the toy module under the strategy, then replay the same plan through the reference loop.

    ``lr_options`` (the strategy's learning-rate schedule) and ``lr_factor`` (the same schedule, written out for the
    reference: position -> factor) go together.
    """
    module = ToyModule(optimizer=optimizer)
    initial = copy.deepcopy(module)
    dataset = dataset if dataset is not None else toy_dataset()
    strategy = FederatedBlockStrategy(
        num_clients=num_clients,
        local_steps=local_steps,
        clients_per_round=clients_per_round,
        global_lr=global_lr,
        schedule=schedule,
        seed=3,
        **(lr_options or {}),
    )
    callback = ParaBlockCallback(staleness=staleness, aggregator=MeanAggregator(weighting=weighting))
    trainer = quiet_trainer(
        strategy=strategy,
        callbacks=[callback, *extra_callbacks],
        max_epochs=rounds,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(module, toy_loader(dataset))

    specs = []
    for t in range(rounds):
        block = list(strategy.partition[strategy.plan.block_of(t)].param_names)
        batches = {
            turn.client: [default_collate([dataset[i] for i in batch]) for batch in turn.batches]
            for turn in strategy.batch_sampler.plan(t)
        }
        specs.append(RoundSpec(block=block, batches=batches))
    if optimizer == "sgd":
        factory = lambda params: torch.optim.SGD(params, lr=initial.lr, momentum=0.5)  # noqa: E731
    else:
        factory = lambda params: torch.optim.AdamW(params, lr=initial.lr, weight_decay=0.01)  # noqa: E731
    weights = [c.num_samples for c in strategy.federation.clients.values()] if weighting == "samples" else None
    reference = run_reference(
        initial, toy_loss, specs, num_clients, factory, staleness, global_lr, accumulate, client_weights=weights,
        lr_factor=lr_factor,
    )
    return module, reference, strategy, callback


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    b_params = dict(b.named_parameters())
    return max((p.detach() - b_params[n].detach()).abs().max().item() for n, p in a.named_parameters())
