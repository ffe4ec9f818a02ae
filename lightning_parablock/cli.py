"""The ``parablock`` command: LightningCLI with a run summary and the final global model saved.

``parablock fit --config recipes/tiny.yaml`` trains; afterwards it prints rounds, held-out
loss before and after, bytes moved, measured time and the exposed communication wait, and
writes the global model with ``save_pretrained`` to ``--output_dir``. ``parablock report
RUN_DIR`` prints the run's table and draws its figures (see :mod:`lightning_parablock.report`).
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Optional

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_parablock import report
from lightning_parablock.callback import ParaBlockCallback

_LOSS_KEY = "val/loss"


class ParaBlockCLI(LightningCLI):
    """LightningCLI whose ``fit`` reports what the federation did and saves the global model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--output_dir",
            type=Optional[str],
            default=None,
            help="Where `fit` writes the final global model (and tokenizer) with save_pretrained.",
        )

    def before_fit(self) -> None:
        self._loss_before = self._held_out_loss()

    def after_fit(self) -> None:
        loss_after = self._held_out_loss()
        callback = next((c for c in self.trainer.callbacks if isinstance(c, ParaBlockCallback)), None)
        lines = ["", "ParaBlock run summary"]
        if callback is not None:
            lines.append("  " + callback.summary().format())
        if self._loss_before is not None and loss_after is not None:
            lines.append(f"  held-out loss: {self._loss_before:.4f} before -> {loss_after:.4f} after")
        output_dir = self.config[self.subcommand].get("output_dir")
        if output_dir and self.trainer.is_global_zero:
            self._save(Path(output_dir))
            lines.append(f"  global model written to {output_dir}")
        if self.trainer.is_global_zero:
            print("\n".join(lines), flush=True)

    def _held_out_loss(self) -> Optional[float]:
        """The global model's validation loss, when the module and data have a validation loop."""
        datamodule = self.datamodule
        if datamodule is None or not _overrides(datamodule, "val_dataloader", LightningDataModule):
            return None
        if not _overrides(self.model, "validation_step", LightningModule):
            return None
        results: list[dict[str, Any]] = self.trainer.validate(self.model, datamodule=datamodule, verbose=False)
        return float(results[0][_LOSS_KEY]) if results and _LOSS_KEY in results[0] else None

    def _save(self, output_dir: Path) -> None:
        if not hasattr(self.model, "save_pretrained"):
            raise TypeError(
                f"--output_dir needs a module with `save_pretrained` (such as CausalLMModule), got"
                f" {type(self.model).__name__}."
            )
        tokenizer = getattr(self.datamodule, "tokenizer", None)
        # Written beside the target and moved in place, so a crash never leaves half a model there.
        staging = output_dir.with_name(f".{output_dir.name}.{uuid.uuid4().hex}.tmp")
        try:
            self.model.save_pretrained(staging, tokenizer=tokenizer)
            if output_dir.exists():
                shutil.rmtree(output_dir)
            os.replace(staging, output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _overrides(obj: object, method: str, base: type) -> bool:
    return getattr(type(obj), method, None) is not getattr(base, method, None)


def main(args: Optional[list[str]] = None) -> None:
    """``parablock report ...`` draws a finished run; anything else goes to LightningCLI (fit, validate ...)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["report"]:
        report.main(argv[1:])
        return
    ParaBlockCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # one optimizer object for all clients is what --optimizer would build; clients take
        # `--trainer.strategy.init_args.client_optimizer` or the module's configure_optimizers instead
        auto_configure_optimizers=False,
        parser_kwargs={"description": "ParaBlock for Lightning. Also: `parablock report RUN_DIR` draws a finished run."},
        args=None if args is None else argv,
    )


if __name__ == "__main__":
    main()
