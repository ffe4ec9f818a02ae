"""A federation on several processes, launched as users launch it: ``python distributed_run.py --devices 2``.

Lightning's launcher re-runs this script once per extra rank. Rank 0 writes the final global model
(and the timeline's location) to ``--out``. Fault options make one rank raise, stall or wait to be
killed, or get SLURM's requeue signal, for the fault tests; ``--slurm`` runs the processes as srun
starts them (the test starts each with its ``SLURM_*`` variables). ``--method`` trains one of the Table 1 methods instead: FLoRA on a tiny
Llama with LoRA, the others on the toy model, all with SGD.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors import signal_connector
from toy import ToyModule, toy_dataset, toy_loader

from lightning_parablock import (
    CausalLMModule,
    FederatedBlockStrategy,
    MeanAggregator,
    MedianAggregator,
    ParaBlockCallback,
    SimulatedLink,
    TrimmedMeanAggregator,
)
from lightning_parablock import method as method_settings
from lightning_parablock.data import SyntheticArithmeticDataModule


class Fault(Callback):
    """In ``round``, make ``rank`` raise, stall its exchange, receive SIGTERM or SIGKILL, or announce itself and sleep (to be
    killed)."""

    def __init__(self, kind: str, rank: int, at_round: int, marker: Path | None) -> None:
        self.kind, self.rank, self.at_round, self.marker = kind, rank, at_round, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch != self.at_round or batch_idx != 1:
            return
        if self.kind == "killed" and trainer.is_global_zero and self.marker is not None:
            self.marker.write_text(json.dumps({"pid": os.getpid()}))
            time.sleep(600)
        if trainer.global_rank != self.rank:
            return
        if self.kind == "sigterm":  # as SLURM preempts: the job's first process is told to stop
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.kind == "requeue":  # SLURM's `--signal=SIGUSR1@90`, here to one rank only
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        if self.kind == "sigkill":  # lost without a word: the kernel's OOM killer, a node gone
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "raise":
            raise RuntimeError(f"simulated failure on rank {self.rank}")
        if self.kind == "stall":
            transport = trainer.strategy.client_exchange._worker.transport
            real_exchange = transport.exchange

            def stalled(*args, **kwargs):
                time.sleep(600)
                return real_exchange(*args, **kwargs)

            transport.exchange = stalled

    def on_exception(self, trainer, pl_module, exception):
        # Where each rank stopped, for the test to compare: the batches started so far in this round.
        started = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        print(
            f"[rank {trainer.global_rank}] stopped by {type(exception).__name__} in round {trainer.current_epoch}"
            f" after {started} batches",
            flush=True,
        )


RULES = {"mean": MeanAggregator, "median": MedianAggregator, "trimmed_mean": TrimmedMeanAggregator}


def train(
    out: Path,
    devices: int = 2,
    num_clients: int = 4,
    staleness: int = 1,
    rounds: int = 4,
    optimizer: str = "sgd",
    clients_per_round: int | None = None,
    weighting: str = "uniform",
    aggregator: str = "mean",
    latency: str = "0s",
    comm_timeout: float = 120.0,
    compression: str = "none",
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    ckpt_path: Path | None = None,
    slurm: bool = False,
    fault: Fault | None = None,
    method: str | None = None,
    accelerator: str = "cpu",
    lr_schedule: str = "constant",
) -> dict:
    """Train the toy federation; rank 0 saves and returns the final global model and the timeline records."""
    torch.set_num_threads(1)
    callback = ParaBlockCallback(
        staleness=staleness,
        link=SimulatedLink(latency=latency),
        aggregator=RULES[aggregator](weighting=weighting) if aggregator == "mean" else RULES[aggregator](),
        comm_timeout=comm_timeout,
        compression=compression,
    )
    if method is not None:
        return _train_method(out, method, devices, num_clients, rounds, comm_timeout)
    callbacks: list[Callback] = [callback] + ([fault] if fault is not None else [])
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, every_n_epochs=1, save_last=True, save_top_k=-1))
    strategy = FederatedBlockStrategy(
        num_clients=num_clients,
        local_steps=2,
        clients_per_round=clients_per_round,
        seed=3,
        lr_schedule=lr_schedule,
        warmup_steps=0 if lr_schedule == "constant" else 3,
    )
    trainer = Trainer(
        strategy=strategy,
        accelerator=accelerator,
        devices=devices,
        callbacks=callbacks,
        max_epochs=rounds,
        logger=False,
        enable_checkpointing=checkpoint_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out.parent,
        plugins=[_slurm_with_requeue_printed()] if slurm else None,
    )
    module = ToyModule(optimizer=optimizer)
    trainer.fit(module, toy_loader(toy_dataset()), ckpt_path=ckpt_path or ("last" if resume else None))
    result = {
        "params": {name: p.detach().clone() for name, p in module.named_parameters()},
        "records": [asdict(r) for r in callback.records],
    }
    if trainer.is_global_zero:
        torch.save(result, out)
    return result


def _slurm_with_requeue_printed() -> SLURMEnvironment:
    """SLURM with auto-requeue, its processes started by the test as srun would; `scontrol` is printed, not run."""

    def call(command, **_):
        print(f"requeue: {command}", flush=True)
        return 0

    signal_connector.call = call
    return SLURMEnvironment(auto_requeue=True)


TINY_LLAMA = {
    "model_type": "llama", "vocab_size": 128, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip


def _train_method(out: Path, name: str, devices: int, num_clients: int, rounds: int, comm_timeout: float) -> dict:
    """A Table 1 method with SGD: FLoRA on a tiny Llama with LoRA, the others on the toy model; ``rounds`` cycles."""
    spec = method_settings(name)
    callback = ParaBlockCallback.for_method(spec, comm_timeout=comm_timeout)
    strategy = spec.strategy(
        num_clients=num_clients, local_steps=2, seed=3, client_optimizer=partial(torch.optim.SGD, lr=0.05)
    )
    trainer = Trainer(
        strategy=strategy, accelerator="cpu", devices=devices, callbacks=[callback],
        max_epochs=spec.rounds(rounds, num_clients), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out.parent,
    )  # fmt: skip
    if spec.lora:
        lora = {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0}
        module = CausalLMModule(config=TINY_LLAMA, seed=0, **spec.module_args(lora))
        data = SyntheticArithmeticDataModule(num_examples=32, val_examples=8, batch_size=4, max_length=48, seed=0)
        trainer.fit(module, datamodule=data)
    else:
        module = ToyModule()
        trainer.fit(module, toy_loader(toy_dataset()))
    result = {
        "params": {n: p.detach().clone() for n, p in module.named_parameters()},
        "records": [asdict(r) for r in callback.records],
    }
    if trainer.is_global_zero:
        torch.save(result, out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--staleness", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--clients_per_round", type=int, default=None)
    parser.add_argument("--weighting", default="uniform")
    parser.add_argument("--aggregator", default="mean")
    parser.add_argument("--latency", default="0s")
    parser.add_argument("--comm_timeout", type=float, default=120.0)
    parser.add_argument("--compression", default="none")
    parser.add_argument("--checkpoint_dir", type=Path, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ckpt_path", type=Path, default=None)
    parser.add_argument("--slurm", action="store_true", help="processes started as srun does, SLURM_* set")
    parser.add_argument("--fault", default=None, choices=["raise", "stall", "killed", "sigkill", "sigterm", "requeue"])
    parser.add_argument("--fault_rank", type=int, default=1)
    parser.add_argument("--fault_round", type=int, default=2)
    parser.add_argument("--marker", type=Path, default=None)
    parser.add_argument("--method", default=None)
    parser.add_argument("--lr_schedule", default="constant")
    parser.add_argument("--accelerator", default="cpu", help="gpu: NCCL for the default group (benchmarks/gpu_check.sh)")
    args = vars(parser.parse_args())
    kind, rank, at_round, marker = (args.pop(k) for k in ("fault", "fault_rank", "fault_round", "marker"))
    train(**args, fault=Fault(kind, rank, at_round, marker) if kind else None)


if __name__ == "__main__":
    main()
