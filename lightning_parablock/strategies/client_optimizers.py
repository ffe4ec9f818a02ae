"""Each client's optimizer: built by ``client_optimizer``, or by the module's ``configure_optimizers``, afresh.

Clients train independently, so no two of them may ever share an optimizer object (and its state). LightningCLI's
``--optimizer`` makes ``configure_optimizers`` hand back one shared object on every call: that is refused before
training, and ``client_optimizer`` is the way to give clients their optimizer from a recipe.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Optional

from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.optim import Optimizer

from lightning_parablock._compat import init_optimizers_and_lr_schedulers

if TYPE_CHECKING:
    import lightning.pytorch as pl


class ClientOptimizers:
    """Builds a new optimizer for a client's turn from the parameters it trains.

    Args:
        client_optimizer: builds an optimizer from parameters; ``None`` asks the module's ``configure_optimizers``
            (which must return exactly one new optimizer, and no LR scheduler, on every call).
    """

    def __init__(self, client_optimizer: Optional[OptimizerCallable]) -> None:
        if client_optimizer is not None and not callable(client_optimizer):
            raise TypeError(
                "`client_optimizer` must be a callable that builds an optimizer from parameters, e.g."
                f" `functools.partial(torch.optim.AdamW, lr=1e-4)`, got {client_optimizer!r}."
            )
        self.client_optimizer = client_optimizer
        self._module: Optional[pl.LightningModule] = None
        self._last_from_module: Optional[weakref.ref[Optimizer]] = None
        self._lent_configure_optimizers = False

    def attach(self, module: "pl.LightningModule") -> None:
        """Use ``module``; a module without ``configure_optimizers`` is lent one that builds nothing until
        :meth:`detach`.

        With ``client_optimizer`` the module needs none, but Lightning's own checks still ask for it.
        """
        self.detach()
        self._module = module
        if self.client_optimizer is not None and not is_overridden("configure_optimizers", module):
            module.configure_optimizers = _no_module_optimizer
            self._lent_configure_optimizers = True

    def detach(self) -> None:
        """Give the module back as it came: without the ``configure_optimizers`` lent by :meth:`attach`."""
        if self._lent_configure_optimizers and self._module is not None:
            if vars(self._module).get("configure_optimizers") is _no_module_optimizer:
                del self._module.configure_optimizers
            self._lent_configure_optimizers = False

    def check(self) -> None:
        """Fail before training if ``configure_optimizers`` would hand every client one shared optimizer."""
        if self.client_optimizer is None:
            self._from_module()
            self._from_module()
            self._last_from_module = None

    def new(self, params: list[nn.Parameter]) -> Optimizer:
        """A fresh optimizer over ``params`` (the block a client trains, or its fp32 masters)."""
        if self.client_optimizer is not None:
            return self.client_optimizer(params)
        return self._from_module()

    def _from_module(self) -> Optimizer:
        assert self._module is not None, "ClientOptimizers.attach was not called"
        optimizers, schedulers = init_optimizers_and_lr_schedulers(self._module)
        if schedulers:
            raise MisconfigurationException(
                f"FederatedBlockStrategy needs `configure_optimizers` to return one optimizer and no LR scheduler (got"
                f" {len(schedulers)}): a scheduler would follow one client's optimizer, not the federation's rounds."
                " Schedule the clients' learning rate on the strategy instead:"
                " `FederatedBlockStrategy(lr_schedule='cosine', warmup_steps=..., min_lr_ratio=...)` (or 'linear';"
                " `warmup_ratio=` for a fraction of the run)."
            )
        if len(optimizers) != 1:
            raise MisconfigurationException(
                f"FederatedBlockStrategy needs `configure_optimizers` to return exactly one optimizer (got"
                f" {len(optimizers)}): clients restart their optimizer every round."
            )
        optimizer = optimizers[0]
        if self._last_from_module is not None and optimizer is self._last_from_module():
            raise MisconfigurationException(
                "`configure_optimizers` returns the same optimizer object on every call (LightningCLI's"
                " `--optimizer` does this), so all clients would share one optimizer state. Build a new"
                " optimizer on every call, or pass `client_optimizer=` to FederatedBlockStrategy."
            )
        self._last_from_module = weakref.ref(optimizer)
        return optimizer


def _no_module_optimizer() -> None:
    """``configure_optimizers`` of a module whose clients take ``client_optimizer``."""
