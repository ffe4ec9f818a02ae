"""The ``parablock`` command: LightningCLI that checks before training, reports the run and saves the model.

``parablock fit --config recipes/tiny.yaml`` first checks what it can (arguments, data, tokenizer,
output folder, a checkpoint to resume; see :mod:`lightning_parablock.cli.preflight`) and refuses bad input
in one line with exit status 2. After training it prints rounds, held-out loss before and after, bytes
moved, measured time and the exposed communication wait, and writes the global model to
``--output_dir`` (see :mod:`lightning_parablock.cli.output_folder`). ``parablock report RUN_DIR`` prints the run's
table and draws its figures (see :mod:`lightning_parablock.telemetry.report`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional

from lightning import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_parablock._compat import InstantiatorFn
from lightning_parablock.callbacks.parablock import ParaBlockCallback
from lightning_parablock.cli import preflight
from lightning_parablock.cli.disk_full import disk_full_error, disk_full_message
from lightning_parablock.cli.hub import check_push_to_hub, push_folder
from lightning_parablock.cli.noise import quiet_dependency_noise
from lightning_parablock.cli.output_folder import OutputPlan, check_output_dir, save_model
from lightning_parablock.cli.passes import set_rounds_for_passes
from lightning_parablock.cli.recipe_method import apply_method, written_for_by_file
from lightning_parablock.flower.site_mailbox import federation_stop
from lightning_parablock.methods.registry import MethodName
from lightning_parablock.strategies.trainer_checks import check_trainer
from lightning_parablock.telemetry import report

USAGE_ERRORS = (ValueError, TypeError, OSError, MisconfigurationException)
"""Bad input found before training: printed as one line, exit status 2, no traceback."""
EXIT_USAGE = 2
EXIT_MODEL_ELSEWHERE = 3
"""Training finished, but the model is not in ``--output_dir`` (kept elsewhere; the line says where)."""
EXIT_DISK_FULL = 4
"""The disk filled up during training; the line names the last checkpoint written whole."""
EXIT_PUSH_FAILED = 5
"""The model is saved, but its upload to the Hub failed."""
EXIT_FEDERATION_STOPPED = 6
"""A Flower site was stopped by the server: another site failed (the line names it and the round)."""


def refuse(error: BaseException | str, status: int = EXIT_USAGE) -> NoReturn:
    """Print the library's own sentence as the first (and only) thing the user reads, and exit with ``status``
    (2: bad input, before training)."""
    message = error if isinstance(error, str) else str(error)
    print(f"parablock: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


_PARSER_KEY = re.compile(r'Parser key "([^"]+)":')
_UNION_NOISE = re.compile(
    r"^(Does not validate|Subtypes:|Errors:|Given value|Expected a <class '(str|NoneType)'>|Problem with given class_path)"
)


def concise_parse_error(message: str) -> str:
    """The option and the complaint of a jsonargparse error without the other Union subtypes' complaints, e.g.
    ``data.init_args.num_examples: Expected a <class 'int'>. Got value: 2.5``; other messages unchanged."""
    lines = [line.strip().lstrip("- ").strip() for line in message.splitlines()]
    keys = [found.group(1) for line in lines if (found := _PARSER_KEY.fullmatch(line))]
    details = [line for line in lines if line and not _PARSER_KEY.fullmatch(line) and not _UNION_NOISE.match(line)]
    if not keys or not details:
        return message
    given = next((line[len("Given value: ") :] for line in lines if line.startswith("Given value: ")), None)
    detail = details[0] if given is None or "Got value" in details[0] else f"{details[0]}. Got value: {given}"
    return f"`{'.init_args.'.join(keys)}`: {detail}"


class ConciseArgumentParser(LightningArgumentParser):
    """Parse errors as one line naming the option, instead of every Union subtype's complaint and the usage."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        refuse(f"{concise_parse_error(message)}\n(`{prog} --help` lists the options and their types.)")


class ConciseReportParser(argparse.ArgumentParser):
    """``parablock report``'s and ``evaluate``'s errors as one line, as ``fit``'s are, instead of argparse's usage
    text first."""

    def error(self, message: str) -> NoReturn:
        refuse(f"{message}\n(`{self.prog} --help` lists the options.)")


class _ConstructionErrors:
    """An instantiator that remembers the last error a class raised while jsonargparse built it.

    jsonargparse reports a constructor's error inside "does not validate against any of the Union subtypes",
    after the errors of every other subtype; this keeps the error itself to show first.
    """

    def __init__(self, cli: LightningCLI) -> None:
        self.model = InstantiatorFn(cli=cli, key="model")
        self.data = InstantiatorFn(cli=cli, key="data")
        self.last: Optional[tuple[type, Exception]] = None

    def __call__(self, class_type: type, *args: Any, applied_instantiation_links: dict, **kwargs: Any) -> Any:
        try:
            if issubclass(class_type, LightningModule):
                built = self.model(class_type, *args, applied_instantiation_links=applied_instantiation_links, **kwargs)
            elif issubclass(class_type, LightningDataModule):
                built = self.data(class_type, *args, applied_instantiation_links=applied_instantiation_links, **kwargs)
            else:
                built = class_type(*args, **kwargs)
        except Exception as error:
            self.last = (class_type, error)
            raise
        self.last = None  # a Union's other subtype built fine: that earlier error was not the failure
        return built


class ParaBlockCLI(LightningCLI):
    """LightningCLI whose ``fit`` checks everything it can first, reports what the federation did and saves
    the global model."""

    def __init__(self, *args: Any, parser_class: type[LightningArgumentParser] = ConciseArgumentParser, **kwargs: Any) -> None:
        super().__init__(*args, parser_class=parser_class, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--method",
            type=Optional[MethodName],
            default=None,
            help="The method of the paper's Table 1 to train with; it sets the strategy class, block_patterns, the"
            " callback's staleness and aggregator and the module's LoRA. What a config file with another `method:`"
            " line sets for its own method gives way (a note says so); your own conflicting settings are refused"
            " (see lightning_parablock.cli.recipe_method). With fedcybgd, epoch counts are cycles. Default: the"
            " config as written.",
        )
        parser.add_argument(
            "--passes",
            type=Optional[float],
            default=None,
            help="The run's length as passes over the training data: sets trainer.max_epochs (one epoch is one round)"
            " to the fewest rounds that read the training samples this many times, once the data are loaded."
            " Default: the config's max_epochs.",
        )
        parser.add_argument(
            "--output_dir",
            type=Optional[str],
            default=None,
            help="Where `fit` writes the final global model (and tokenizer); checked before training. A module"
            " without `save_pretrained` gets the Hugging Face model inside it saved, else its state dict.",
        )
        parser.add_argument(
            "--push_to_hub",
            type=Optional[str],
            default=None,
            help="After `fit`, upload the --output_dir folder (model, tokenizer, chat template) to this Hub repository,"
            " e.g. `me/llama32-1b-chat` (created private if new; needs `huggingface-cli login`).",
        )
        parser.add_argument(
            "--overwrite_output",
            type=bool,
            default=False,
            help="Replace a non-empty --output_dir that parablock did not write (its own outputs are replaced anyway).",
        )

    def _parse_ckpt_path(self) -> None:
        """The config stands: a checkpoint of another model is refused in :meth:`before_fit`, naming both shapes.

        (LightningCLI would silently replace the config's model arguments with the checkpoint's.)
        """

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("method"):
            try:
                notes = apply_method(config, config.method, written_for_by_file(config))
            except USAGE_ERRORS as error:
                refuse(error)
            for note in notes:
                print(f"parablock: {note}", file=sys.stderr, flush=True)
            config.method = None  # applied: the saved config.yaml holds the settings, re-running it repeats the run
        self._construction_errors = _ConstructionErrors(self)
        self.parser.add_instantiator(self._construction_errors, object, subclasses=True, prepend=True)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:
            last = self._construction_errors.last
            if last is not None:
                class_type, cause = last
                refuse(f"{class_type.__name__}: {cause}")
            if isinstance(error, USAGE_ERRORS):
                refuse(error)
            raise

    def before_fit(self) -> None:
        self._new_folders = [Path(folder) for folder in _run_dirs(self.trainer) if not Path(folder).exists()]
        try:
            self._output_plan = self._preflight()
            passes = self.config[self.subcommand].get("passes")
            if passes is not None:
                print(f"parablock: {set_rounds_for_passes(self.trainer, self.datamodule, passes)}", file=sys.stderr)
        except USAGE_ERRORS as error:
            refuse(error)
        try:  # the first time the model is built when nothing else needed it: a load failure is bad input too
            self._loss_before = self._held_out_loss()
        except USAGE_ERRORS as error:
            _remove_new_folders(self._new_folders, self.trainer)
            refuse(error)

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit``; an error of the setup (before the first batch) is refused in one line and the run
        folders this run created are removed, so a refused run leaves nothing behind. A disk that fills up during
        training ends in one line too (exit status 4), naming the checkpoint to resume from; a Flower site the server
        stopped ends in one line (exit status 6) naming the site that failed and the round."""
        started_at = time.time()
        try:
            self.trainer.fit(**kwargs)
        except Exception as error:
            stopped = federation_stop(error)
            if stopped is not None:  # a Flower site the server stopped: its reason names the failed site and round
                refuse(f"the federation stopped: {stopped}", status=EXIT_FEDERATION_STOPPED)
            if not isinstance(error, USAGE_ERRORS):
                raise
            if self.trainer.fit_loop.epoch_loop.batch_progress.total.ready > 0:
                full = disk_full_error(error)
                if full is None:
                    raise  # training had begun: the traceback is the user's to read
                if self.trainer.is_global_zero:
                    print(f"parablock: error: {disk_full_message(full, self.trainer, started_at)}", file=sys.stderr, flush=True)
                sys.exit(EXIT_DISK_FULL)
            _remove_new_folders(self._new_folders, self.trainer)
            refuse(error)

    def _preflight(self) -> Optional[OutputPlan]:
        """Checks before anything trains or is written (see :mod:`lightning_parablock.cli.preflight`)."""
        config = self.config[self.subcommand]
        trainer = self.trainer
        check_trainer(trainer, option_prefix="--trainer.")
        plan = None
        check_push_to_hub(config.get("push_to_hub"), config.get("output_dir"))
        if config.get("output_dir"):
            plan = check_output_dir(config["output_dir"], _run_dirs(trainer), self.model, config.get("overwrite_output"))
        preflight.prepare_data(self.datamodule)
        preflight.check_vocabulary(self.model, getattr(self.datamodule, "tokenizer", None))
        checkpoint = self._checked_checkpoint()
        if checkpoint is not None:  # "before" is the model being resumed; fit restores the same weights again
            self.model.load_state_dict(checkpoint["state_dict"])
        return plan

    def _checked_checkpoint(self) -> Optional[dict[str, Any]]:
        """The ``--ckpt_path`` checkpoint, refused when it holds another model than the config builds."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        checkpoint = preflight.load_resume_checkpoint(ckpt_path)
        if checkpoint is not None:
            self.model.trainer = self.trainer  # the model loads in the dtype this Trainer runs (validate, test too)
            with preflight.model_init_context(self.trainer):  # compared (and then resumed) whole
                self.model.configure_model()
            preflight.check_checkpoint_matches(checkpoint, ckpt_path, self.model)
        return checkpoint

    def before_validate(self) -> None:
        try:
            self._checked_checkpoint()
        except USAGE_ERRORS as error:
            refuse(error)

    before_test = before_validate

    def after_fit(self) -> None:
        loss_after = self._held_out_loss()
        callback = next((c for c in self.trainer.callbacks if isinstance(c, ParaBlockCallback)), None)
        lines = ["", "ParaBlock run summary"]
        if callback is not None:
            lines.append("  " + callback.summary().format())
        if self._loss_before is not None and loss_after is not None:
            lines.append(f"  held-out loss: {self._loss_before:.4f} before -> {loss_after:.4f} after")
        saved = None
        if self._output_plan is not None and self.trainer.is_global_zero:
            run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{_run_name(self.trainer)}"
            tokenizer = getattr(self.datamodule, "tokenizer", None)
            saved = save_model(self.model, tokenizer, self._output_plan, run_id, Path(self.trainer.default_root_dir))
            lines.append(f"  global model written to {saved.path} ({saved.contents})")
            if saved.note:
                lines.append(f"  note: {saved.note}")
            repo_id = self.config[self.subcommand].get("push_to_hub")
            if repo_id:
                try:
                    lines.append(f"  pushed to the Hub: {push_folder(saved.path, repo_id)}")
                except Exception as error:  # noqa: BLE001 - a network or login failure after a finished run
                    print("\n".join(lines), flush=True)
                    refuse(
                        f"the upload to the Hub repository {repo_id!r} failed ({type(error).__name__}: {error});"
                        f" the model is saved in {saved.path}: upload it with `huggingface-cli upload {repo_id}"
                        f" {saved.path}`.",
                        status=EXIT_PUSH_FAILED,
                    )
        if self.trainer.is_global_zero:
            print("\n".join(lines), flush=True)
        if saved is not None and saved.elsewhere:
            print(
                f"parablock: error: the model is not in --output_dir {str(self._output_plan.path)!r}: {saved.note}.",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(EXIT_MODEL_ELSEWHERE)

    def _held_out_loss(self) -> Optional[float]:
        """The global model's validation loss, when the module and data have a validation loop."""
        datamodule = self.datamodule
        if datamodule is None or not _overrides(datamodule, "val_dataloader", LightningDataModule):
            return None
        if not _overrides(self.model, "validation_step", LightningModule):
            return None
        results: list[dict[str, Any]] = self.trainer.validate(self.model, datamodule=datamodule, verbose=False)
        found = next((key for key in report.LOSS_KEYS if results and key in results[0]), None)
        return float(results[0][found]) if found else None


def _run_dirs(trainer: Trainer) -> list[str]:
    """The run's own folders, which the final model must never replace."""
    folders = [trainer.default_root_dir]
    for logger in trainer.loggers:
        folders += [folder for folder in (logger.save_dir, getattr(logger, "log_dir", None)) if folder]
    folders += [c.dirpath for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
    folders += [logger.root_dir for logger in trainer.loggers if getattr(logger, "root_dir", None)]
    return folders


def _remove_new_folders(folders: list[Path], trainer: Trainer) -> None:
    """Remove the run folders created since :meth:`ParaBlockCLI.before_fit`: a logger's own version folder with
    what it wrote there; any other folder only when left empty (another run may share it).

    Only the first process of each machine removes them: with several, every process reaches this with the same
    folders, and a second removal fails on what the first removed. One removed by another machine sharing the
    file system meanwhile is gone as wanted.
    """
    if trainer.local_rank != 0:
        return
    own = {Path(logger.log_dir) for logger in trainer.loggers if getattr(logger, "log_dir", None)}
    for folder in sorted(folders, key=lambda path: len(path.parts), reverse=True):
        if folder in own:
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.is_dir() and not any(folder.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                folder.rmdir()


def _run_name(trainer: Trainer) -> str:
    """The logger's version when there is one (``version_3``), else this process's id."""
    version = trainer.logger.version if trainer.logger is not None else None
    if version is None:
        return f"pid{os.getpid()}"
    return f"version_{version}" if isinstance(version, int) else str(version)


def _overrides(obj: object, method: str, base: type) -> bool:
    return getattr(type(obj), method, None) is not getattr(base, method, None)


_OPTIMIZER_FLAGS = ("--optimizer", "--lr_scheduler")
DESCRIPTION = (
    "ParaBlock for Lightning. Commands: fit, validate, test, predict, report, evaluate and flower-demo. The first four"
    " are LightningCLI's (e.g. `parablock fit --config recipes/tiny.yaml`); `parablock report RUN_DIR` prints a"
    " finished run's table and draws its figures (`parablock report --help`); `parablock evaluate MODEL --data FILE`"
    " scores a saved model's answers to your own chat data (`parablock evaluate --help`); `parablock flower-demo` runs"
    " a federation of sites over a real Flower deployment on this machine (`parablock flower-demo --help`)."
)


def main(args: Optional[list[str]] = None) -> None:
    """``parablock report ...`` draws a finished run, ``parablock evaluate ...`` scores a saved model,
    ``parablock flower-demo`` runs a Flower federation on this machine; anything else goes to LightningCLI (fit,
    validate ...)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["report"]:
        report.main(argv[1:], parser_class=ConciseReportParser)
        return
    if argv[:1] == ["evaluate"]:
        from lightning_parablock.cli import evaluate  # loads transformers and datasets: only when asked for

        evaluate.main(argv[1:], parser_class=ConciseReportParser)
        return
    if argv[:1] == ["flower-demo"]:
        from lightning_parablock.flower import demo  # the optional extra: imported only when asked for

        demo.main(argv[1:], parser_class=ConciseReportParser)
        return
    flag = next((a for a in argv if a.split("=")[0].split(".")[0] in _OPTIMIZER_FLAGS), None)
    if flag is not None and flag.startswith("--lr_scheduler"):
        refuse(
            f"`{flag}` is not an option of parablock: a scheduler would follow one client's optimizer, not the"
            " federation's rounds. Schedule the clients' learning rate on the strategy:"
            " `--trainer.strategy.init_args.lr_schedule cosine` (or linear) with"
            " `--trainer.strategy.init_args.warmup_steps N` (or `warmup_ratio`) and"
            " `--trainer.strategy.init_args.min_lr_ratio`."
        )
    if flag is not None:
        refuse(
            f"`{flag}` is not an option of parablock: one optimizer object would be shared by every client. Give"
            " the clients' optimizer with `--trainer.strategy.init_args.client_optimizer` (e.g."
            " `--trainer.strategy.init_args.client_optimizer torch.optim.AdamW"
            " --trainer.strategy.init_args.client_optimizer.lr 1e-4`), or let the module's configure_optimizers"
            " build one per client."
        )
    quiet_dependency_noise()
    ParaBlockCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # one optimizer object for all clients is what --optimizer would build; clients take
        # `--trainer.strategy.init_args.client_optimizer` or the module's configure_optimizers instead
        auto_configure_optimizers=False,
        parser_kwargs={"prog": "parablock", "description": DESCRIPTION},
        args=None if args is None else argv,
    )



if __name__ == "__main__":
    main()
