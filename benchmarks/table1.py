"""The paper's Table 1 and Figure 2 at tiny scale: all seven methods on one task, split, seed and model.

Trains the tiny Llama of recipes/tiny.yaml (from scratch) on the synthetic arithmetic task, split over the clients
by Dirichlet(0.5) over the problem kind (or iid), with every method of lightning_parablock.methods.registry: same seed,
same split, same model, same local steps and learning rate (LoRA methods: rank 8 adapters on every linear layer and
their own learning rate). A "round" is one where every client trains once; FedCyBGD's clients take turns, so its
round is as many epochs as there are clients. Prints one table: final validation loss, exact-match accuracy of
greedy answers on the validation problems, bytes per client, this process's measured time, and the modelled
federated wall-clock (clients in parallel; lightning_parablock.telemetry.timeline.modelled_wallclock) at 50/100/150 MB/s with
effective batch 4 and at 100 MB/s with effective batch 2/4/8 (the paper's Figure 2 grid; one run per batch size).
Writes the Figure-2-style bar chart and the validation-loss curves as PNGs and the numbers as JSON. Each method's
outcome is kept under ``--out``/outcomes and reused when present: a stopped run resumes, and processes given
different ``--methods`` and the same ``--out`` share one table (use a fresh ``--out`` for fresh numbers).

With ``--from-pretrained`` the paper's regime instead: the 4-layer, hidden-256 Llama of benchmarks/pretrain_tiny.py
(pretrained here on four problem kinds, cached) is fine-tuned on four kinds it has not seen, split by kind; its
embeddings stay frozen, so a block is one decoder layer (3.2 MB in fp32), and the learning rates are a fine-tuning
run's (blocks and Full FT 1e-3, LoRA 5e-3).

    python benchmarks/table1.py [--rounds 20] [--clients 10] [--local-steps 8] [--methods parablock,fedbcd,...]
                                [--partition dirichlet|iid] [--alpha 0.5] [--seed 0] [--schedule random]
                                [--from-pretrained] [--no-grid] [--out runs/table1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import TINY_CONFIG
from lightning import Callback, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from matplotlib.figure import Figure
from pretrain_tiny import FINETUNE_KINDS, QUICK, PretrainSettings, pretrained_checkpoint

from lightning_parablock import CausalLMModule, ParaBlockCallback, SimulatedLink
from lightning_parablock.core.schedule import SCHEDULE_KINDS
from lightning_parablock.data import SyntheticArithmeticDataModule, format_prompt
from lightning_parablock.data.synthetic import PROBLEM_KINDS, make_arithmetic_dataset
from lightning_parablock.eval.generation import generate_answers
from lightning_parablock.methods.registry import METHODS, method
from lightning_parablock.telemetry.timeline import RunSummary, modelled_wallclock

BANDWIDTHS = ("50MB/s", "100MB/s", "150MB/s")
BATCHES = (2, 4, 8)
MAIN_BATCH, MAIN_BANDWIDTH = 4, "100MB/s"
LATENCY = "20ms"  # as recipes/tiny.yaml
LEARNING_RATE = 3e-3  # as recipes/tiny.yaml
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
LORA_LEARNING_RATE = 1e-2
FINETUNE_LEARNING_RATE = 1e-3  # --from-pretrained: blocks and Full FT
FINETUNE_LORA_LEARNING_RATE = 5e-3
BLOCK_METHODS = ("parablock", "fedbcd")  # the methods --schedule applies to


@dataclass
class Outcome:
    method: str
    title: str
    final_val_loss: float
    accuracy: float
    bytes_per_client: float
    measured_seconds: float
    modelled_seconds: dict[str, float] = field(default_factory=dict)  # "<bandwidth> batch <b>" -> seconds
    curve: list[tuple[float, float]] = field(default_factory=list)  # (round, val loss)


class ValidationCurve(Callback):
    """The global model's validation loss after each validation during fit, by round of the paper's kind."""

    def __init__(self, epochs_per_round: int) -> None:
        self.epochs_per_round = epochs_per_round
        self.points: list[tuple[float, float]] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING and "val/loss" in trainer.callback_metrics:
            rounds = (trainer.current_epoch + 1) / self.epochs_per_round
            self.points.append((rounds, float(trainer.callback_metrics["val/loss"])))


def train(name: str, options: argparse.Namespace, batch_size: int, validate: bool) -> tuple[Any, ...]:
    spec = method(name)
    lora = spec.module_args(LORA)
    if options.from_pretrained:
        rate = FINETUNE_LORA_LEARNING_RATE if lora else FINETUNE_LEARNING_RATE
        module = CausalLMModule(model_name_or_path=str(options.checkpoint), learning_rate=rate, seed=options.seed, **lora)
    else:
        rate = LORA_LEARNING_RATE if lora else LEARNING_RATE
        module = CausalLMModule(config=TINY_CONFIG, learning_rate=rate, seed=options.seed, **lora)
    data = SyntheticArithmeticDataModule(
        num_examples=options.examples,
        val_examples=options.val_examples,
        batch_size=batch_size,
        partition=options.partition,
        alpha=options.alpha,
        seed=options.seed,
        kinds=task_kinds(options),
    )
    schedule = {"schedule": options.schedule} if name in BLOCK_METHODS else {}
    strategy = spec.strategy(
        num_clients=options.clients,
        local_steps=options.local_steps,
        include_embeddings=not options.from_pretrained,  # from scratch the embeddings (tied to the head) learn too
        seed=options.seed,
        **schedule,
    )
    epochs_per_round = spec.rounds(1, options.clients)
    callback = ParaBlockCallback.for_method(spec, weighting="samples", link=SimulatedLink(MAIN_BANDWIDTH, LATENCY))
    curve = ValidationCurve(epochs_per_round)
    trainer = Trainer(
        strategy=strategy,
        callbacks=[callback, curve],
        max_epochs=spec.rounds(options.rounds, options.clients),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=options.val_every * epochs_per_round,
        limit_val_batches=1.0 if validate else 0,
        default_root_dir=options.out / "runs" / f"{name}_batch{batch_size}",
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    return module, data, trainer, callback, curve, seconds


def task_kinds(options: argparse.Namespace) -> tuple[str, ...]:
    """The problem kinds of the task: those pretraining left out when fine-tuning, else the original five."""
    return FINETUNE_KINDS if options.from_pretrained else tuple(PROBLEM_KINDS)


def exact_match(module: CausalLMModule, data: SyntheticArithmeticDataModule, options: argparse.Namespace) -> float:
    """Share of validation problems whose greedy answer, up to its first whitespace, is the reference."""
    rows = make_arithmetic_dataset(options.examples + options.val_examples, options.seed, task_kinds(options))
    rows = rows.select(range(options.examples, options.examples + options.val_examples))
    answers = generate_answers(
        module.hf_model, data.tokenizer, rows["instruction"], prompt_fn=format_prompt, batch_size=50, max_new_tokens=6
    )
    hits = sum((a.split() or [""])[0] == reference for a, reference in zip(answers, rows["output"]))
    return hits / len(rows)


def final_val_loss(trainer: Trainer, module: CausalLMModule, data: SyntheticArithmeticDataModule) -> float:
    trainer.limit_val_batches = 1.0
    return float(trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"])


def benchmark(name: str, options: argparse.Namespace) -> Outcome:
    spec = method(name)
    module, data, trainer, callback, curve, seconds = train(name, options, MAIN_BATCH, validate=True)
    records = callback.records
    summary = RunSummary.of(records)
    final_loss = final_val_loss(trainer, module, data)  # after the final flush: the output model
    outcome = Outcome(
        method=name,
        title=spec.title,
        final_val_loss=final_loss,
        accuracy=exact_match(module, data, options),
        bytes_per_client=summary.bytes_moved / options.clients,
        measured_seconds=seconds,
        curve=[point for point in curve.points if point[0] < options.rounds] + [(options.rounds, final_loss)],
    )
    for bandwidth in BANDWIDTHS:
        link = SimulatedLink(bandwidth, LATENCY)
        outcome.modelled_seconds[f"{bandwidth} batch {MAIN_BATCH}"] = modelled_wallclock(records, link, spec.staleness)
    for batch in BATCHES if options.grid else ():
        if batch == MAIN_BATCH:
            continue
        _, _, _, timed, _, _ = train(name, options, batch, validate=False)
        link = SimulatedLink(MAIN_BANDWIDTH, LATENCY)
        modelled = modelled_wallclock(timed.records, link, spec.staleness)
        outcome.modelled_seconds[f"{MAIN_BANDWIDTH} batch {batch}"] = modelled
    return outcome


def format_table(outcomes: list[Outcome]) -> str:
    grid = [f"{b} batch {MAIN_BATCH}" for b in BANDWIDTHS]
    batches = (f"{MAIN_BANDWIDTH} batch {b}" for b in BATCHES)
    grid += [k for k in batches if k in outcomes[0].modelled_seconds and k not in grid]  # absent with --no-grid
    short = {key: key.replace("MB/s batch ", "/b") for key in grid}
    header = f"{'method':10} {'val loss':>8} {'acc':>6} {'MB/client':>10} {'measured':>9} " + " ".join(
        f"{short[k]:>9}" for k in grid
    )
    lines = [header, "-" * len(header)]
    for o in outcomes:
        modelled = " ".join(f"{o.modelled_seconds[k]:>8.1f}s" for k in grid)
        lines.append(
            f"{o.title:10} {o.final_val_loss:8.4f} {o.accuracy:6.1%} {o.bytes_per_client / 1e6:10.2f}"
            f" {o.measured_seconds:8.1f}s {modelled}"
        )
    lines.append(
        f"modelled: clients in parallel at <MB/s>/b<effective batch>, latency {LATENCY};"
        " measured: this process, clients one after another."
    )
    by_name = {o.method: o for o in outcomes}
    if "parablock" in by_name and "fedbcd" in by_name:
        gap = by_name["parablock"].final_val_loss / by_name["fedbcd"].final_val_loss - 1
        lines.append(f"ParaBlock's final val loss vs FedBCD's: {gap:+.2%} (within 2%: {abs(gap) <= 0.02})")
    return "\n".join(lines)


def plot(outcomes: list[Outcome], path: Path) -> None:
    """Figure 2 of the paper: modelled runtime per method across bandwidths and batch sizes; and the loss curves."""
    figure = Figure(figsize=(15, 4.2))  # no pyplot: the user's backend stays untouched
    axes = figure.subplots(1, 3)
    colors = {o.method: f"C{i}" for i, o in enumerate(outcomes)}
    width = 0.8 / len(outcomes)
    panels = (
        (axes[0], [f"{b} batch {MAIN_BATCH}" for b in BANDWIDTHS], list(BANDWIDTHS), f"effective batch {MAIN_BATCH}"),
        (axes[1], [f"{MAIN_BANDWIDTH} batch {b}" for b in BATCHES], [f"batch {b}" for b in BATCHES], MAIN_BANDWIDTH),
    )
    if f"{MAIN_BANDWIDTH} batch {BATCHES[0]}" not in outcomes[0].modelled_seconds:  # --no-grid
        panels = panels[:1]
        axes[1].set_visible(False)
    for axis, keys, labels, title in panels:
        for i, outcome in enumerate(outcomes):
            positions = [k + (i - (len(outcomes) - 1) / 2) * width for k in range(len(keys))]
            axis.bar(positions, [outcome.modelled_seconds[k] for k in keys], width, label=outcome.title,
                     color=colors[outcome.method])  # fmt: skip
        axis.set_xticks(range(len(keys)), labels)
        axis.set_ylabel("modelled wall-clock (s)")
        axis.set_title(f"Runtime, clients in parallel ({title})", fontsize=10)
    axes[0].legend(fontsize=8)
    for outcome in outcomes:
        if outcome.curve:
            style = "-" if outcome.method in ("parablock", "fedbcd") else ":"
            axes[2].plot(*zip(*outcome.curve), style, marker="o", markersize=3, label=outcome.title,
                         color=colors[outcome.method])  # fmt: skip
    axes[2].set_xlabel("round (every client trained once)")
    axes[2].set_ylabel("validation loss (global model)")
    axes[2].set_title("Convergence on the non-iid task", fontsize=10)
    axes[2].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds in which every client trains once")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--val-examples", type=int, default=200)
    parser.add_argument("--partition", choices=("dirichlet", "iid"), default="dirichlet", help="Dirichlet or iid")
    parser.add_argument("--alpha", type=float, default=0.5, help="the Dirichlet concentration over problem kinds")
    parser.add_argument("--seed", type=int, default=0, help="data, split, schedule, data order and LoRA init")
    parser.add_argument("--schedule", choices=SCHEDULE_KINDS, default="random", help="ParaBlock's and FedBCD's")
    parser.add_argument("--from-pretrained", action="store_true", help="fine-tune benchmarks/pretrain_tiny.py's model")
    parser.add_argument("--val-every", type=int, default=5, help="rounds between validations for the curves")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--out", type=Path, default=Path("runs/table1"))
    parser.add_argument(
        "--no-grid", dest="grid", action="store_false", help=f"skip the runs at batch {BATCHES[0]} and {BATCHES[-1]}"
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds, 3 clients, 2 local steps: a smoke run")
    return parser


def prepare(options: argparse.Namespace) -> argparse.Namespace:
    """Apply --quick and build (or find) the pretrained checkpoint, so that every run of a process shares it."""
    if options.quick:
        options.rounds, options.clients, options.local_steps, options.val_every = 2, 3, 2, 1
        options.examples, options.val_examples = 120, 20
    options.checkpoint = None
    if options.from_pretrained:
        options.checkpoint = pretrained_checkpoint(QUICK if options.quick else PretrainSettings())
    return options


def main() -> None:
    options = prepare(build_parser().parse_args())
    names = [n.strip() for n in options.methods.split(",") if n.strip()]
    for name in names:
        method(name)  # a clear error before anything trains
    options.out.mkdir(parents=True, exist_ok=True)

    outcomes = []
    finished = options.out / "outcomes"  # one JSON per method: a stopped run resumes, processes can share methods
    finished.mkdir(exist_ok=True)
    for name in names:
        path = finished / f"{name}.json"
        if path.exists():
            outcomes.append(Outcome(**json.loads(path.read_text())))
            continue
        outcomes.append(benchmark(name, options))
        path.write_text(json.dumps(asdict(outcomes[-1])))
        print(f"{name}: done ({outcomes[-1].measured_seconds:.1f} s measured)", flush=True)
    table = format_table(outcomes)
    print("\n" + table)
    figure = options.out / "table1_figure2.png"
    plot(outcomes, figure)
    (options.out / "table1.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    task = f"fine-tuning {options.checkpoint.name}" if options.from_pretrained else "from scratch"
    split = f"Dirichlet({options.alpha})" if options.partition == "dirichlet" else "iid"
    print(f"\nfigure: {figure}\ntorch {torch.__version__}, {task}, {split}, seed {options.seed}, schedule"
          f" {options.schedule}, {options.rounds} rounds, {options.clients} clients, {options.local_steps} local steps")


if __name__ == "__main__":
    main()
